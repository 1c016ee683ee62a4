"""A run's inputs and saved state, rebuilt from its config and workdir: the public way in for tools.

`train.run` builds its stream and initial parameters with these functions, and `analysis/` (the
standalone NTK runner, the notebook) rebuilds them here, so both see the same class order, tasks,
init key (`config.init_key`) and backbone. `load_run` restores a checkpoint's evaluation
parameters {backbone, peft: {current, ema}, fusion} and prototypes without the trainer.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from ntkcl_jax import config as config_lib
from ntkcl_jax import plan as plan_lib
from ntkcl_jax.checkpoint import RunCheckpoints
from ntkcl_jax.data import TaskStream, cap_per_class, class_order, make_source
from ntkcl_jax.data.sources.registry import missing_data
from ntkcl_jax.models.ntkcl import ModelSpec, init_params
from ntkcl_jax.models.vit import load_augreg, missing_checkpoint
from ntkcl_jax.plan import DataPlan, RunPlan

__all__ = [
  "RunState",
  "build_stream",
  "build_streams",
  "initial_params",
  "load_run",
]


class MissingInputsError(FileNotFoundError):
  """A run's data or backbone weights are not on disk (raised before anything is written)."""


def missing_inputs(plan: RunPlan) -> list[str]:
  """What this run needs on disk and lacks: its dataset (both splits) and its backbone weights,
  one line each with the fix. Checks existence only (no image, label or weight is read), so a run
  can stop at start; a compile-only path, which reads neither, does not call it.
  """
  problems = []
  d = plan.data
  why = missing_data(d.name, d.data_dir or None)
  if why:
    problems.append(f"data ({d.name}, --config.data.data_dir={d.data_dir!r}): {why}")
  path = plan.backbone_path
  why = missing_checkpoint(path) if path else None
  if why:
    problems.append(f"backbone weights (--config.backbone.checkpoint_path): {why}")
  return problems


def check_inputs(plan: RunPlan) -> None:
  """Raises `MissingInputsError` listing everything `missing_inputs(plan)` finds."""
  problems = missing_inputs(plan)
  if problems:
    raise MissingInputsError(
      "this run's inputs are missing; nothing was written.\n"
      + "\n".join(f"  - {p}" for p in problems)
    )


def build_streams(data: DataPlan, seeds: Sequence[int]) -> list[TaskStream]:
  """One task stream per seed over the same sources: each seed's class order (SPEC 2.7).

  The sources of `data` (a run plan's `DataPlan`) are read once; the streams differ only in
  class order.
  """
  d = data
  data_dir = d.data_dir or None
  train = cap_per_class(make_source(d.name, "train", data_dir), d.max_train_per_class)
  test = cap_per_class(make_source(d.name, "test", data_dir), d.max_test_per_class)
  if train.num_classes != d.num_classes:
    raise ValueError(
      f"data.num_classes={d.num_classes} but dataset '{d.name}' has {train.num_classes} classes."
    )
  return [
    TaskStream(
      train,
      test,
      order=class_order(seed, d.num_classes),
      init_cls=d.init_cls,
      increment=d.increment,
      image_size=d.image_size,
      resize_size=d.resize_size,
      crop_scale=(d.crop_scale_min, 1.0),
      value_range=d.value_range,
    )
    for seed in seeds
  ]


def build_stream(config: ml_collections.ConfigDict) -> TaskStream:
  """Sources, class order (SPEC 2.7) and transforms for `config.data` and `config.seed`."""
  return build_streams(plan_lib.resolve(config).data, (config.seed,))[0]


def initial_params(
  config: ml_collections.ConfigDict,
  spec: ModelSpec,
  *,
  seed: int | None = None,
  backbone: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """The run's parameters at init: AugReg backbone (or random if no path) and the PEFT init.

  Args:
    seed: the run's seed (default `config.seed`); the init key is `config.init_key(seed)`.
    backbone: already loaded AugReg parameters (`load_augreg`) to reuse instead of reading
      `backbone.checkpoint_path` again (stacked seeds share one copy).
  Without `backbone.checkpoint_path` the backbone is random (from the same init key), which the
  trainer logs as a warning.
  """
  if backbone is None and config.backbone.checkpoint_path:
    backbone = load_augreg(config.backbone.checkpoint_path, spec.vit)
  seed = config.seed if seed is None else seed
  return init_params(spec, config_lib.init_key(seed), backbone)


@dataclasses.dataclass(frozen=True)
class RunState:
  """A run's state at one checkpoint, for evaluation and analysis.

  Attributes:
    config, spec, stream: the run's config, model spec and task stream (`build_stream`).
    num_tasks: tasks the run trains (`plan.RunPlan.num_tasks`).
    number: the checkpoint number.
    init: parameters at init (`initial_params`), without proxy head.
    params: evaluation parameters {backbone, peft: {current, ema}, fusion} at the checkpoint.
    prototypes: (C, D) host array; rows ≥ `num_seen` zero.
    tasks_done: tasks finished at the checkpoint (a mid-task checkpoint is inside task
      `tasks_done`). in_task: whether it is a mid-task checkpoint.
    num_seen: classes of the finished tasks, the valid prototype rows.
    accuracy_matrix: (num_tasks, num_tasks) R of the finished tasks, NaN elsewhere.
    meta: the checkpoint's JSON metadata.
  """

  config: ml_collections.ConfigDict
  spec: ModelSpec
  stream: TaskStream
  num_tasks: int
  number: int
  init: dict[str, Any]
  params: dict[str, Any]
  prototypes: np.ndarray
  tasks_done: int
  in_task: bool
  num_seen: int
  accuracy_matrix: np.ndarray
  meta: dict[str, Any]


def accuracy_matrix(stages: list[dict[str, Any]], num_tasks: int) -> np.ndarray:
  """R (T, T) from the stage rows so far; NaN above the diagonal and for stages not yet run."""
  R = np.full((num_tasks, num_tasks), np.nan)
  for t, s in enumerate(stages):
    R[t, : t + 1] = s["R_row"]
  return R


def load_run(
  config: ml_collections.ConfigDict,
  workdir: str | pathlib.Path,
  number: int | None = None,
  *,
  seed: int | None = None,
) -> RunState:
  """Restores checkpoint `number` (default: the latest) of the run of `config` in `workdir`.

  Only `method="ntkcl"` runs: the baselines train other parameter trees (a linear head, no
  fusion) or predict from other features (SimpleCIL's plain ViT CLS token). A stacked run's
  workdir (`config.seeds`) holds several runs: `seed` picks one (default: the first), and the
  returned `config` is that seed's single-run config (`config.seed_config`).

  Raises:
    FileNotFoundError: the workdir has no checkpoint.
    ValueError: `config.method` is not "ntkcl", or `seed` is not one of `config.seeds`.
  """

  plan = plan_lib.resolve(config)
  if plan.method != "ntkcl":
    raise ValueError(
      f"load_run rebuilds NTK-CL runs only; this workdir's method is {plan.method!r}."
    )
  spec = plan.spec
  workdir = pathlib.Path(workdir)
  ckpts = RunCheckpoints(workdir, async_save=False)
  try:
    number = ckpts.latest() if number is None else number
    if number is None:
      raise FileNotFoundError(f"No checkpoint under {workdir / 'checkpoints'}; train first.")
    state, meta = ckpts.restore_on_one_device(number)  # any topology the run was saved from
  finally:
    ckpts.close()
  progress = meta["progress"]
  stages = progress.get("stages")
  if config.seeds:  # a stacked run: seed i's slice of every array, its own stages
    seeds = config_lib.run_seeds(config)
    seed = seeds[0] if seed is None else int(seed)
    if seed not in seeds:
      raise ValueError(f"seed={seed} is not one of this stacked run's seeds {list(seeds)}.")
    i = seeds.index(seed)
    state = jax.tree_util.tree_map(lambda x: np.asarray(x)[i], state)
    stages = progress["seeds"][i]["stages"]
    config = config_lib.seed_config(config, seed)
  stream = build_streams(plan.data, (config.seed,))[0]
  total = plan.num_tasks
  init = initial_params(config, spec)
  trained = state["train"]["params"]
  params = {
    "backbone": init["backbone"],
    "peft": {"current": trained["peft"]["current"], "ema": state["ema"]},
    "fusion": trained["fusion"],
  }
  # `progress.task` is the task being trained (in_task) or the next one: either way the number of
  # finished tasks, whose classes the prototypes hold.
  done = int(progress["task"])
  return RunState(
    config=config,
    spec=spec,
    stream=stream,
    num_tasks=total,
    number=int(number),
    init=init,
    params=params,
    prototypes=np.asarray(state["prototypes"]),
    tasks_done=done,
    in_task=bool(progress["in_task"]),
    num_seen=sum(stream.task_range(t)[1] for t in range(done)),
    accuracy_matrix=accuracy_matrix(stages, total),
    meta=meta,
  )
