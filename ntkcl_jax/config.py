"""Configuration schema, validation and the quirk table (SPEC 0 "Modes", 4, 8).

Only this module, `plan.py`, `main.py` and `train.py` read `ConfigDict`s; everything below them
takes the run plan (`plan.RunPlan`) built from the plain values here (`Quirks`, `ModelSpec`,
`LossWeights`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ntkcl_jax import seeds as seeds_lib
from ntkcl_jax.losses import LossWeights
from ntkcl_jax.models.ntkcl import REMAT_POLICIES, ModelSpec
from ntkcl_jax.models.vit import ViTSpec

# Each quirk of the released code (SPEC 4): key -> (reference value, corrected value).
QUIRKS: dict[str, tuple[Any, Any]] = {
  "fusion_qk": ("dead_qk", "value_only"),  # Q1
  "prompt_init": ("zeros", "kaiming_mix"),  # Q2
  "mi_sign": (-1, 1),  # Q3
  "orth_loss": ("signed_residual_sum", "old_subspace_projection"),  # Q4
  "ema_after_last_task": (False, True),  # Q5
  "prototype_refresh": ("never", "drift_compensation"),  # Q6 ("oracle": analysis only)
  "nonfinite_aux": ("zero", "mask_or_raise"),  # Q7
  "prompt_tokens": ("fixed_197", "from_config"),  # Q8
  "ema_branch_dropout": (True, False),  # Q9
  "reg_at_task0": (True, False),  # Q10
  "mi_old_rows": ("all_but_last_increment", "known_only"),  # Q11
}
EXTRA_QUIRK_VALUES = {"prototype_refresh": ("oracle",)}
MODES = ("reference", "corrected")
AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class Quirks:
  """Resolved quirk values; code branches on these, never on `mode`."""

  fusion_qk: str = "dead_qk"
  prompt_init: str = "zeros"
  mi_sign: int = -1
  orth_loss: str = "signed_residual_sum"
  ema_after_last_task: bool = False
  prototype_refresh: str = "never"
  nonfinite_aux: str = "zero"
  prompt_tokens: str = "fixed_197"
  ema_branch_dropout: bool = True
  reg_at_task0: bool = True
  mi_old_rows: str = "all_but_last_increment"


def _parse_quirk(key: str, value: Any) -> Any:
  ref, cor = QUIRKS[key]
  allowed = (ref, cor, *EXTRA_QUIRK_VALUES.get(key, ()))
  if isinstance(ref, bool):
    if isinstance(value, str) and value.lower() in ("true", "false"):
      value = value.lower() == "true"
  elif isinstance(ref, int) and isinstance(value, str):
    try:
      value = int(value)
    except ValueError:
      pass
  if value not in allowed or (isinstance(ref, bool) != isinstance(value, bool)):
    raise ValueError(f"quirks.{key}={value!r} is not valid; choose one of {list(allowed)}.")
  return value


def resolve_quirks(mode: str, overrides: dict[str, Any] | None = None) -> Quirks:
  """Quirks for `mode` ("reference" | "corrected"), then single-key overrides ("auto" = mode's)."""
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; valid: {MODES}.")
  values = {k: v[MODES.index(mode)] for k, v in QUIRKS.items()}
  for key, value in (overrides or {}).items():
    if key not in QUIRKS:
      raise ValueError(f"Unknown quirk '{key}'; valid: {sorted(QUIRKS)}.")
    if value != AUTO:
      values[key] = _parse_quirk(key, value)
  return Quirks(**values)


# ------------------------------------------------------------------------------------------------
# Schema.


def base_config() -> ml_collections.ConfigDict:
  """Every key with its default; benchmark configs override values, never add keys."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # class-order seed (SPEC 2.7), also seeds all JAX keys.
  # "0,1,2,3,4": that many runs (each as `seed` would make it) stacked in one process and one
  # jitted step, outputs in WORKDIR/seed_<s>/ (seed_stack.py); "" = the one run of `seed`.
  c.seeds = ""
  c.mode = "reference"
  c.quirks = ml_collections.ConfigDict({k: AUTO for k in QUIRKS})
  # ntkcl | ntkcl_ogd | simplecil | seq_finetune | joint | ranpac | aper, or a `pkg.module:Class` path
  c.method = "ntkcl"  # (`methods.registry`)

  c.data = ml_collections.ConfigDict()
  c.data.name = "animal_mnist"
  c.data.data_dir = ""
  c.data.num_classes = 10
  c.data.init_cls = 2
  c.data.increment = 2
  c.data.resize_size = 256  # test transform: short side to this, then centre crop image_size.
  c.data.crop_scale_min = 0.05  # RandomResizedCrop scale (min, 1.0).
  c.data.value_range = "0_1"  # or "-1_1" (documented deviation, SPEC 1.1)
  c.data.max_train_per_class = -1  # -1: all; a positive cap for quick runs.
  c.data.max_test_per_class = -1

  c.backbone = ml_collections.ConfigDict()
  c.backbone.checkpoint_path = ""
  c.backbone.image_size = 224
  c.backbone.patch_size = 16
  c.backbone.width = 768
  c.backbone.depth = 12
  c.backbone.num_heads = 12
  c.backbone.mlp_dim = 3072

  c.model = ml_collections.ConfigDict()
  c.model.name = "both"  # both | channel | patch (SPEC 2.1 ablations)
  c.model.adapter_dim = 16
  c.model.adapter_scale = 0.1
  c.model.adapter_dropout = 0.1
  c.model.num_prompts = 10
  c.model.prompt_carry = 0.1
  c.model.fusion_heads = 8
  c.model.fusion_dropout = 0.1
  c.model.use_init_ptm = False
  c.model.frozen_prompt_list_num = 1  # EMA banks; only 1 is in scope (SPEC 1.4).
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
  c.model.remat = "dots"  # what each block stores for backward: dots | none | full | dots_all

  c.train = ml_collections.ConfigDict()
  c.train.lr = 0.025
  c.train.batch_size = 16
  c.train.epochs = 20
  c.train.weight_decay = 5e-4
  c.train.momentum = 0.9
  c.train.use_ema = True  # ablation "no EMA": the EMA bank stays at its init.
  c.train.log_every_steps = 50
  c.train.tensorboard = True  # event files in workdir/tensorboard when tensorboardX is installed
  c.train.checkpoint_every_steps = 500
  c.train.max_tasks = -1  # -1: all tasks; a positive number truncates the stream.
  # -- accelerator path: precision of every traced matmul, expected backend, prefetch
  c.model.matmul_precision = "highest"  # default | high | highest (PyTorch float32 = highest)
  c.train.platform = "any"  # any | cpu | gpu | tpu: fail at start when that backend is absent
  c.train.prefetch_batches = 2  # host batches built and placed ahead of the step (>= 1)
  # Tasks that take training steps (Method.adapt_tasks): -1 = the method's (all; ranpac/aper: 1).
  c.train.adapt_tasks = -1
  # Stacked seeds: devices on the "seed" mesh axis; 0 = gcd(devices, seeds) (seeds.seed_layout).
  c.train.seed_axis_size = 0

  c.loss = ml_collections.ConfigDict()
  c.loss.lambda_mi = 0.2  # = the reference's nce_temp (0.03 for CIFAR-100)
  c.loss.lambda_orth = 1e-4
  c.loss.lambda_reg = 1e-3
  c.loss.tau = 0.1
  c.loss.svd_k = 40

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64
  c.eval.alpha = 0.1  # current-bank section weight
  c.eval.beta = 1.0  # PTM section weight
  c.eval.gamma = 0.3  # EMA section weight
  c.eval.head = "prototypes"  # prototypes | ridge (closed-form RanPAC head on m; methods/ridge.py)

  # Closed-form ridge head (method=ranpac, or eval.head=ridge): ReLU random projection d -> M.
  c.ridge = ml_collections.ConfigDict()
  c.ridge.projection_dim = 1024  # M; 0 = ridge on the features themselves
  c.ridge.val_fraction = 0.2  # held-out share of the current task's training data for λ
  # NTK-CL's ridge input: "m" (the test feature) or "cpm" ([c; p; m], the tripled features)
  c.ridge.features = "m"

  # method=ntkcl_ogd (methods/ogd.py): the PEFT update is projected off a stored orthonormal basis
  # of old tasks' tangent features (GPM / OGD on the PEFT Jacobian); no images are stored.
  c.ogd = ml_collections.ConfigDict()
  c.ogd.samples = 64  # training images per task whose tangent features enter the basis
  c.ogd.directions = 16  # random output directions per image (a sketch of all D outputs; 0: all D)
  c.ogd.energy = 0.97  # GPM threshold: share of a task's tangent-feature energy the basis keeps
  c.ogd.max_rank = 1024  # columns of the stored basis (P x max_rank float32 per seed)

  c.analysis = ml_collections.ConfigDict()
  c.analysis.enabled = False
  c.analysis.seed = 0
  c.analysis.n_train = 64
  c.analysis.n_test = 32
  c.analysis.output = "fused_feature"  # fused_feature | prototype_logits | proxy_logits
  c.analysis.projection = "gaussian"  # gaussian | exact
  c.analysis.projection_dim = 16
  c.analysis.params = "peft"  # peft | peft+fusion | all_trainable
  c.analysis.implementation = 1
  c.analysis.backend = "native"
  c.analysis.batch_size = 0  # 0: no blocking
  c.analysis.lambda_rel = 1e-2
  c.analysis.kernel = "fixed"  # fixed | per_task
  c.analysis.tripled = False  # also the 3N-row c/p/m kernel at init (SPEC 7.6 sweep; ~3x cost)
  c.analysis.seeds = "first"  # stacked seeds: diagnostics of the "first" seed only, or of "all"
  return c


def model_spec(config: ml_collections.ConfigDict, quirks: Quirks) -> ModelSpec:
  """The `ModelSpec` for a validated config and its resolved quirks."""
  b, m = config.backbone, config.model
  vit = ViTSpec(b.image_size, b.patch_size, b.width, b.depth, b.num_heads, b.mlp_dim)
  return ModelSpec(
    vit=vit,
    adapter_dim=m.adapter_dim,
    adapter_scale=m.adapter_scale,
    adapter_dropout=m.adapter_dropout,
    num_prompts=m.num_prompts,
    prompt_carry=m.prompt_carry,
    fusion_heads=m.fusion_heads,
    fusion_dropout=m.fusion_dropout,
    use_init_ptm=m.use_init_ptm,
    model_name=m.name,
    fusion_with_qk=quirks.fusion_qk == "dead_qk",
    kaiming_mix=quirks.prompt_init == "kaiming_mix",
    fixed_197_tokens=quirks.prompt_tokens == "fixed_197",
    ema_branch_dropout=quirks.ema_branch_dropout,
    dtype=jnp.dtype(m.dtype),
    remat=m.remat,
  )


def loss_weights(config: ml_collections.ConfigDict, quirks: Quirks) -> LossWeights:
  """`LossWeights` for a validated config and its resolved quirks."""
  use_ce = {"both": ("c", "p", "m"), "channel": ("c",), "patch": ("p",)}[config.model.name]
  # The ablations train the CE of their branch alone, as the reference's `_init_train` does for
  # model_name "channel" / "patch" (SPEC 2.1): no L_MI (reads m), L_orth (reads c and p) or L_reg.
  full = config.model.name == "both"
  return LossWeights(
    mi=config.loss.lambda_mi if full else 0.0,
    mi_sign=quirks.mi_sign,
    orth=config.loss.lambda_orth if full else 0.0,
    reg=config.loss.lambda_reg if full else 0.0,
    tau=config.loss.tau,
    orth_loss=quirks.orth_loss,
    zero_nonfinite_aux=quirks.nonfinite_aux == "zero",
    use_ce=use_ce,
  )


def init_key(seed: int) -> jax.Array:
  """The key of a run's parameter initialisation: `fold_in(key(seed), 10_000)`.

  The one place it is written: the trainer, `run_state.load_run` and the notebooks use it, so a
  standalone analysis rebuilds exactly the trainer's init parameters.
  """
  return jax.random.fold_in(jax.random.key(seed), 10_000)


def section_weights(config: ml_collections.ConfigDict) -> tuple[float, ...]:
  """ω of the test logits (SPEC 1.6): (γ, α), or (β, γ, α) with the PTM section."""
  e = config.eval
  return (e.beta, e.gamma, e.alpha) if config.model.use_init_ptm else (e.gamma, e.alpha)


_CHOICES = {
  "model.name": ("both", "channel", "patch"),
  "ridge.features": ("m", "cpm"),
  "model.dtype": ("float32", "bfloat16"),
  "model.remat": tuple(REMAT_POLICIES),
  "data.value_range": ("0_1", "-1_1"),
  "model.matmul_precision": ("default", "high", "highest"),
  "train.platform": ("any", "cpu", "gpu", "tpu"),
  "analysis.output": ("fused_feature", "prototype_logits", "proxy_logits"),
  "analysis.projection": ("gaussian", "exact"),
  "analysis.params": ("peft", "peft+fusion", "all_trainable"),
  "analysis.backend": ("native", "neural_tangents"),
  "analysis.kernel": ("fixed", "per_task"),
  "analysis.seeds": ("first", "all"),
}


def _flat(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in cfg.items():
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def validate(config: ml_collections.ConfigDict) -> Quirks:
  """Checks the whole config, the method's settings included (`plan.resolve`); returns the quirks.

  Raises:
    ValueError: naming the key, the value seen and what is valid.
  """
  from ntkcl_jax import plan  # plan builds on this module

  return plan.resolve(config).quirks


def check_schema(config: ml_collections.ConfigDict) -> Quirks:
  """Checks keys, choices and ranges of the method-independent settings; returns the quirks.

  Raises:
    ValueError: naming the key, the value seen and what is valid.
  """
  known = _flat(base_config())
  got = _flat(config)
  unknown = sorted(set(got) - set(known))
  if unknown:
    raise ValueError(f"Unknown config key(s) {unknown}. Valid keys: {', '.join(sorted(known))}.")
  for key, choices in _CHOICES.items():
    if got[key] not in choices:
      raise ValueError(f"{key}={got[key]!r}; valid: {choices}.")
  if config.model.frozen_prompt_list_num != 1:
    raise ValueError(
      "model.frozen_prompt_list_num > 1 (several EMA banks) is out of scope (SPEC 1.4); use 1."
    )
  d = config.data
  if d.init_cls < 1 or d.increment < 1 or d.init_cls > d.num_classes:
    raise ValueError(
      f"data.init_cls={d.init_cls}, data.increment={d.increment} with "
      f"data.num_classes={d.num_classes}: every task needs at least one class."
    )
  if config.backbone.image_size % config.backbone.patch_size:
    raise ValueError(
      f"backbone.image_size={config.backbone.image_size} is not divisible by "
      f"backbone.patch_size={config.backbone.patch_size}."
    )
  for key in ("train.batch_size", "train.epochs", "eval.batch_size", "train.prefetch_batches"):
    if got[key] < 1:
      raise ValueError(f"{key}={got[key]} must be >= 1.")
  quirks = resolve_quirks(config.mode, dict(config.quirks))
  run_seeds(config)
  if config.train.seed_axis_size < 0:
    raise ValueError(f"train.seed_axis_size={config.train.seed_axis_size} must be >= 0 (0: auto).")
  return quirks


def run_seeds(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The seeds one process trains: those of `seeds` (stacked), else (`seed`,).

  Raises:
    ValueError: `seeds` is not a list of distinct non-negative ints.
  """
  if not config.seeds:
    return (int(config.seed),)
  try:
    return seeds_lib.parse_seeds(config.seeds)
  except ValueError as e:
    raise ValueError(f"--config.seeds={config.seeds!r}: {e}") from None


def seed_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
  """The config of the single run of `seed` that a stacked run's seed `seed` reproduces."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.seed, c.seeds = int(seed), ""
  return c


def config_hash(config: ml_collections.ConfigDict, ignore: tuple[str, ...] = ()) -> str:
  """sha256 of the flat config (keys in `ignore` dropped); identifies a workdir's run."""
  flat = {k: v for k, v in _flat(config).items() if k not in ignore}
  return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
  """Keys whose values differ between two flat configs (for the workdir-mismatch error)."""
  return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """JSON-friendly flat dict of a config (tuples become lists)."""
  return json.loads(json.dumps(_flat(config), default=list))
