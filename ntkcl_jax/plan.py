"""The run plan: a validated config resolved once into one frozen dataclass (SPEC 8).

`resolve(config)` checks the `ConfigDict` (`config.check_schema`), looks the method up
(`methods.method_class`), and turns every fact the trainer and the methods need into plain
values: quirks, seeds and mesh-layout inputs, the model spec the method trains, loss weights,
widths, schedule and head settings. It reads the config only: no data, weights or devices, so
a compile-only tool can resolve a plan for hardware it does not have. Modules below `main` and
`train.run` read the plan, never the `ConfigDict`.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from ntkcl_jax import config as config_lib
from ntkcl_jax import methods
from ntkcl_jax.config import Quirks
from ntkcl_jax.data.class_order import task_splits
from ntkcl_jax.evaluate import NO_TOP5_DATASETS
from ntkcl_jax.losses import LossWeights
from ntkcl_jax.models.ntkcl import ModelSpec

__all__ = ["DataPlan", "RidgeSettings", "RunPlan", "resolve"]

HEADS = ("prototypes", "ridge")


@dataclasses.dataclass(frozen=True)
class DataPlan:
  """What the task streams are built from (`run_state.build_streams`).

  `init_cls` is the first task's class count as the method trains it (joint: all classes).
  """

  name: str
  data_dir: str
  num_classes: int
  init_cls: int
  increment: int
  max_train_per_class: int
  max_test_per_class: int
  image_size: int
  resize_size: int
  crop_scale_min: float
  value_range: str
  top5: bool  # whether the evaluation reports top-5 (SPEC 3: not on some benchmarks)

  @property
  def splits(self) -> list[tuple[int, int]]:
    """(k_t, s_t) of every task of the sequence (`TaskStream.splits`)."""
    return task_splits(self.num_classes, self.init_cls, self.increment)


@dataclasses.dataclass(frozen=True)
class RidgeSettings:
  """The closed-form ridge head (`analytic_heads.RidgeHead`): input features, M, λ split."""

  features: str = "m"
  projection_dim: int = 1024
  val_fraction: float = 0.2


@dataclasses.dataclass(frozen=True)
class OGDSettings:
  """The tangent-feature basis of `method=ntkcl_ogd` (`methods.ogd`): what enters it, its size."""

  samples: int = 64
  directions: int = 16
  energy: float = 0.97
  max_rank: int = 1024


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """Everything a run computes from, resolved from its config alone.

  Attributes:
    method: `config.method` as given (a registry short name or `pkg.module:Class`).
    seed: the single run's seed; seeds: the seeds this process trains; stacked: whether they
      are stacked (`config.seeds`); seed_axis_size: devices on the seed axis (0: auto).
    spec: the model the method trains (`Method.model_spec` of the configured one).
    config_hash: `config.config_hash` of the config (checkpoint meta, the NTK hook).
    adapt_tasks: `train.adapt_tasks` as given (-1: the method's default, `Method.adapt_tasks`).
  """

  method: str
  quirks: Quirks
  seed: int
  seeds: tuple[int, ...]
  stacked: bool
  seed_axis_size: int
  spec: ModelSpec
  loss_weights: LossWeights
  section_weights: tuple[float, ...]
  data: DataPlan
  ridge: RidgeSettings
  ogd: OGDSettings
  eval_head: str
  backbone_path: str
  batch_size: int
  eval_batch_size: int
  epochs: int
  lr: float
  weight_decay: float
  momentum: float
  use_ema: bool
  svd_k: int
  max_tasks: int
  adapt_tasks: int
  matmul_precision: str
  platform: str
  log_every_steps: int
  checkpoint_every_steps: int
  prefetch_batches: int
  tensorboard: bool
  config_hash: str

  @property
  def num_classes(self) -> int:
    """C: rows of the prototypes, columns of the ridge statistics."""
    return self.data.num_classes

  @property
  def head_width(self) -> int:
    """Columns of the per-task proxy head: the largest task (shapes fixed across tasks)."""
    return max(s for _, s in self.data.splits)

  @property
  def total_tasks(self) -> int:
    """Tasks of the whole sequence (Q5's "last task" is its last, also under `max_tasks`)."""
    return len(self.data.splits)

  @property
  def num_tasks(self) -> int:
    """Tasks the run trains: all, or the first `train.max_tasks` (≥ 0)."""
    return self.total_tasks if self.max_tasks < 0 else min(self.max_tasks, self.total_tasks)

  @property
  def shared_backbone(self) -> bool:
    """Whether every seed shares one loaded backbone (else each seed's random one)."""
    return bool(self.backbone_path)


def _data_plan(config: ml_collections.ConfigDict, one_task: bool) -> DataPlan:
  d = config.data
  return DataPlan(
    name=d.name,
    data_dir=d.data_dir,
    num_classes=d.num_classes,
    init_cls=d.num_classes if one_task else d.init_cls,
    increment=d.increment,
    max_train_per_class=d.max_train_per_class,
    max_test_per_class=d.max_test_per_class,
    image_size=config.backbone.image_size,
    resize_size=d.resize_size,
    crop_scale_min=d.crop_scale_min,
    value_range=d.value_range,
    top5=d.name not in NO_TOP5_DATASETS,
  )


def _check_heads(config: ml_collections.ConfigDict) -> None:
  if config.eval.head not in HEADS:
    raise ValueError(f"eval.head={config.eval.head!r}; valid: {HEADS}.")
  r = config.ridge
  if r.projection_dim < 0 or not 0.0 < r.val_fraction < 1.0:
    raise ValueError(
      f"ridge.projection_dim={r.projection_dim} must be >= 0 (0: no projection) and "
      f"ridge.val_fraction={r.val_fraction} in (0, 1)."
    )


def resolve(config: ml_collections.ConfigDict) -> RunPlan:
  """Validates `config` and resolves its plan.

  Raises:
    ValueError: naming the key, the value seen and what is valid (also for a method that cannot
      run these settings, e.g. stacked seeds with a closed-form head).
  """
  quirks = config_lib.check_schema(config)
  _check_heads(config)
  method_cls = methods.method_class(config.method)
  t = config.train
  plan = RunPlan(
    method=config.method,
    quirks=quirks,
    seed=int(config.seed),
    seeds=config_lib.run_seeds(config),
    stacked=bool(config.seeds),
    seed_axis_size=t.seed_axis_size,
    spec=method_cls.model_spec(config_lib.model_spec(config, quirks)),
    loss_weights=config_lib.loss_weights(config, quirks),
    section_weights=config_lib.section_weights(config),
    data=_data_plan(config, method_cls.one_task),
    ridge=RidgeSettings(**config.ridge.to_dict()),
    ogd=OGDSettings(**config.ogd.to_dict()),
    eval_head=config.eval.head,
    backbone_path=config.backbone.checkpoint_path,
    batch_size=t.batch_size,
    eval_batch_size=config.eval.batch_size,
    epochs=t.epochs,
    lr=t.lr,
    weight_decay=t.weight_decay,
    momentum=t.momentum,
    use_ema=t.use_ema,
    svd_k=config.loss.svd_k,
    max_tasks=t.max_tasks,
    adapt_tasks=t.adapt_tasks,
    matmul_precision=config.model.matmul_precision,
    platform=t.platform,
    log_every_steps=t.log_every_steps,
    checkpoint_every_steps=t.checkpoint_every_steps,
    prefetch_batches=t.prefetch_batches,
    tensorboard=t.tensorboard,
    config_hash=config_lib.config_hash(config),
  )
  method_cls.check_plan(plan)
  method = method_cls(plan)
  if plan.stacked and not method.supports_stacked_seeds:
    raise ValueError(
      f"--config.seeds={config.seeds!r} with method={plan.method!r}, "
      f"eval.head={plan.eval_head!r}: {method.why_not_stacked} Run each seed with "
      "--config.seed=<s> (experiments/compare.py does), e.g. "
      f"--config.seed={plan.seeds[0]}."
    )
  return plan
