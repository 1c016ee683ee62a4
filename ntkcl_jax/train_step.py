"""The jitted pieces of a run: loss, SGD step, features and evaluation (SPEC 2).

Parameters are split as data (`optim.path_labels`): the step differentiates the `train`
partition {peft/current, fusion, proxy_head} only; `frozen` {backbone, peft/ema} is a closed-over
input, so XLA never computes a weight gradient (nor a backward pass) for the frozen passes.

Shapes do not change across tasks: the proxy head is padded to the largest task (columns past s_t
are masked out of the softmax), prototypes are a (C, D) matrix with unseen rows zero, and the
per-task values (k_t, s_t, n_old, ...) are traced scalars in `TaskInfo`. One compilation serves
the whole task sequence, so time per task stays flat.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ntkcl_jax import losses
from ntkcl_jax.evaluate import make_predict_fn
from ntkcl_jax.models.heads import ProxyHead
from ntkcl_jax.models.ntkcl import NTKCL, test_feature_key
from ntkcl_jax.optim import epoch_cosine_lr, merge, partition, path_labels
from ntkcl_jax.sharding import gather_batch

Params = dict[str, Any]


class TaskInfo(flax.struct.PyTreeNode):
  """Per-task scalars, traced (not static), so a new task does not recompile.

  Attributes:
    task_start: k_t, first global label of the task. num_new: s_t.
    num_seen: k_t + s_t. n_old: prototype rows L_MI may sample (`losses.mi_old_rows`).
    reg_scale: 1.0 when L_reg applies, 0.0 at task 0 under `reg_at_task0=False` (Q10).
  """

  task_start: jax.Array
  num_new: jax.Array
  num_seen: jax.Array
  n_old: jax.Array
  reg_scale: jax.Array

  @classmethod
  def make(cls, task_start: int, num_new: int, n_old: int, use_reg: bool) -> TaskInfo:
    i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
    return cls(
      i32(task_start), i32(num_new), i32(task_start + num_new), i32(n_old), jnp.float32(use_reg)
    )


def split_trainable(params: Params) -> tuple[Params, Params]:
  """(trainable, frozen) partitions of the full tree by `optim.PARTITION_RULES`."""
  labels = path_labels(params)
  return partition(params, labels, "train"), partition(params, labels, "freeze")


def reg_targets(trainable: Params) -> Params:
  """The tree L_reg compares (and the reg snapshot stores): {"peft": current bank, "fusion"}."""
  return {"peft": trainable["peft"]["current"], "fusion": trainable["fusion"]}


def init_proxy_head(key: jax.Array, feature_dim: int, width: int) -> Params:
  """A fresh proxy head (SPEC 1.6) with `width` ≥ s_t columns (the step masks the extra ones)."""
  return ProxyHead(width).init(key, jnp.zeros((1, feature_dim)))["params"]


class TrainState(flax.struct.PyTreeNode):
  """Trainable parameters and optimiser state of the current task."""

  params: Params  # {"peft": {"current"}, "fusion", "proxy_head"}
  opt_state: optax.OptState
  step: jax.Array


def loss_fn(
  trainable: Params,
  frozen: Params,
  aux: dict[str, Any],
  batch: dict[str, jax.Array],
  key: jax.Array,
  *,
  model: NTKCL,
  weights: losses.LossWeights,
  batch_size: int,
  deterministic: bool = False,
  with_outputs: bool = False,
) -> tuple[jax.Array, dict[str, Any]]:
  """Total NTK-CL loss and its named terms on one (padded, masked) global batch (SPEC 2.1).

  Args:
    trainable: {"peft": {"current"}, "fusion", "proxy_head"}. frozen: {"backbone", "peft": {"ema"}}.
    aux: {"task": TaskInfo, "prototypes": (C, D) (unseen rows 0), "orth_basis": (D, k),
      "reg_snapshot": {"peft", "fusion"}}; all constants of the task. Optional "mi_rows": (M,)
      int row indices of the old prototypes L_MI uses (negative = unused), instead of the
      subset drawn from `key` (`losses.fixed_mi_prototypes`; for verifiers).
    batch: {"image": (B, H, W, C), "label": (B,) global labels, "mask": (B,) bool}.
    key: this step's key (dropout and the L_MI row subset).
    batch_size: B, the configured global batch size (L_MI samples up to B old rows).
    deterministic: every dropout off for this call (the training loss in eval mode, e.g. to
      compare with another implementation run with dropout rate 0). The spec is unchanged: with
      the default False, adapter dropout in the EMA pass follows `spec.ema_branch_dropout` (Q9).
    with_outputs: also return terms["outputs"] = {"features": {"c", "p", "m", "passes": per-pass
      CLS features}, "proxy_logits": {"c", "p", "m"}} (for verifiers; off in the train step).
  """
  drop_key, mi_key = jax.random.split(key)
  info: TaskInfo = aux["task"]
  params = merge(trainable, frozen)
  proxy = params.pop("proxy_head")
  feats = model.apply(
    {"params": params},
    batch["image"],
    train=not deterministic,
    per_pass=with_outputs,
    rngs={"dropout": drop_key},
  )
  mask, labels = batch["mask"], batch["label"]
  local = jnp.where(mask, labels - info.task_start, 0)
  head = ProxyHead(proxy["kernel"].shape[1])
  logits = {b: head.apply({"params": proxy}, feats[b]) for b in weights.use_ce}
  terms = {
    f"ce_{b}": losses.masked_cross_entropy(logits[b], local, mask, info.num_new)
    for b in weights.use_ce
  }
  if weights.mi:
    if "mi_rows" in aux:
      rows, row_labels, row_mask = losses.fixed_mi_prototypes(aux["prototypes"], aux["mi_rows"])
    else:
      rows, row_labels, row_mask = losses.select_mi_prototypes(
        mi_key, aux["prototypes"], info.n_old, min(batch_size, aux["prototypes"].shape[0])
      )
    terms["mi"], terms["mi_has_positive"] = losses.mi_loss(
      *gather_batch((feats["m"], labels, mask)), rows, row_labels, row_mask, weights.tau
    )
  if weights.orth:
    terms["orth"] = losses.orth_loss(
      [feats["c"], feats["p"]], mask, aux["orth_basis"], weights.orth_loss
    )
  if weights.reg:
    terms["reg"] = info.reg_scale * losses.reg_loss(reg_targets(trainable), aux["reg_snapshot"])
  total = losses.combine(terms, weights)
  terms["total"] = total
  if with_outputs:
    terms["outputs"] = {"features": feats, "proxy_logits": logits}
  return total, terms


def make_train_step(
  model: NTKCL,
  weights: losses.LossWeights,
  tx: optax.GradientTransformation,
  batch_size: int,
  constrain: Callable[[Params, dict[str, Any]], Params] | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """(state, frozen, aux, batch, key, lr) → (new state, terms). Pure; jit it with shardings.

  `tx` gives the update direction (`optim.make_optimizer`); the step applies −lr times it, after
  `constrain(direction, aux)` when given (e.g. `methods.ogd` projects it off old tasks' tangent
  features: the whole step, momentum and weight decay included, stays in the allowed subspace).
  """

  def train_step(state: TrainState, frozen, aux, batch, key, lr):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, terms), grads = grad_fn(
      state.params, frozen, aux, batch, key, model=model, weights=weights, batch_size=batch_size
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if constrain is not None:
      updates = constrain(updates, aux)
    params = jax.tree_util.tree_map(lambda p, u: p - lr * u, state.params, updates)
    terms["grad_norm"] = optax.global_norm(grads)
    return TrainState(params=params, opt_state=opt_state, step=state.step + 1), terms

  return train_step


def make_feature_fn(model: NTKCL) -> Callable[[Params, jax.Array], jax.Array]:
  """(params without proxy head, images) → the eval-mode feature prototypes use, (b, D)."""
  key = test_feature_key(model.spec.model_name)

  def features(params, images):
    return model.apply({"params": params}, images, train=False)[key]

  return features


def make_eval_fn(
  model: NTKCL, section_weights: tuple[float, ...], top_k: int = 5
) -> Callable[[Params, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
  """(params, prototypes (C, D), num_seen, images) → (top-1 (b,), top-k (b, k)) classes.

  Prediction is task-agnostic over the classes seen so far (rows < num_seen), SPEC 1.6. This is
  `evaluate.make_predict_fn` on the eval-mode features: the function `train.run` evaluates with.
  """
  return make_predict_fn(make_feature_fn(model), section_weights, top_k)


# ------------------------------------------------------------------------------------------------
# The trainer's step: schedule, key and non-finite check on the device, no host sync.


class TaskSchedule(flax.struct.PyTreeNode):
  """Per-task inputs of `make_loop_step`, traced so a new task does not recompile.

  Attributes:
    key_data: `jax.random.key_data` of the task key (plain uint32, so it places like any array);
      step s (0-based in the task) uses `fold_in(key, s + 1)`.
    lr0: base learning rate. epochs: E. steps_per_epoch: S (`optim.epoch_cosine_lr`).
  """

  key_data: jax.Array
  lr0: jax.Array
  epochs: jax.Array
  steps_per_epoch: jax.Array

  @classmethod
  def make(cls, key: jax.Array, lr0: float, epochs: int, steps_per_epoch: int) -> TaskSchedule:
    return cls(
      jax.random.key_data(key),
      jnp.float32(lr0),
      jnp.asarray(epochs, jnp.int32),
      jnp.asarray(steps_per_epoch, jnp.int32),
    )


class Health(flax.struct.PyTreeNode):
  """Running non-finite check, carried from step to step on the device.

  Attributes:
    ok: () bool, every checked term of every step so far was finite.
    bad_step: () int32, the task step (`TrainState.step` before the update) of the first
      non-finite step; -1 while `ok`.
    bad_terms: () int32 bit mask over the sorted term names: bit j set when term j was non-finite
      at `bad_step` (at most 31 terms).
  """

  ok: jax.Array
  bad_step: jax.Array
  bad_terms: jax.Array

  @classmethod
  def fresh(cls) -> Health:
    return cls(jnp.bool_(True), jnp.int32(-1), jnp.int32(0))


def checked_terms(names: Any, check_aux: bool) -> list[str]:
  """The terms the non-finite stop watches, sorted: CE terms and total; L_MI, L_orth, L_reg too
  when `check_aux` (quirk Q7 `nonfinite_aux="mask_or_raise"`)."""
  aux = ("mi", "orth", "reg") if check_aux else ()
  return [k for k in sorted(names) if k.startswith("ce_") or k == "total" or k in aux]


def bad_term_names(names: Any, bad_terms: int) -> list[str]:
  """Decodes `Health.bad_terms` against the loop step's term names ("lr" is not a loss term)."""
  return [k for j, k in enumerate(sorted(k for k in names if k != "lr")) if bad_terms >> j & 1]


def make_loop_step(
  step_fn: Callable[..., tuple[TrainState, dict[str, jax.Array]]], check_aux: bool
) -> Callable[..., tuple[TrainState, Health, dict[str, jax.Array]]]:
  """Wraps a `(state, frozen, aux, batch, key, lr) → (state, terms)` step for the trainer loop.

  Returns `(state, health, frozen, aux, batch, schedule) → (state, health, terms)`: the learning
  rate is `optim.epoch_cosine_lr(state.step, ...)` and the key `fold_in(task key,
  state.step + 1)`, both computed inside the step from the step counter, so the host only
  dispatches; `terms` gains "lr". `health` accumulates the non-finite check (`Health`), which the
  host reads only when it fetches terms anyway (log steps, epoch ends, before checkpoints).
  """

  def loop_step(state: TrainState, health: Health, frozen, aux, batch, schedule: TaskSchedule):
    step = state.step
    task_key = jax.random.wrap_key_data(schedule.key_data)
    lr = epoch_cosine_lr(step, schedule.lr0, schedule.epochs, schedule.steps_per_epoch)
    new_state, terms = step_fn(
      state, frozen, aux, batch, jax.random.fold_in(task_key, step + 1), lr
    )
    names = sorted(terms)
    if len(names) > 31:
      raise ValueError(f"{len(names)} loss terms do not fit the 31-bit Health mask.")
    watched = set(checked_terms(names, check_aux))
    bits = jnp.int32(0)
    for j, k in enumerate(names):
      if k in watched:
        bits = bits | jnp.where(jnp.all(jnp.isfinite(terms[k])), 0, 1 << j).astype(jnp.int32)
    first = health.ok & (bits != 0)
    health = Health(
      ok=health.ok & (bits == 0),
      bad_step=jnp.where(first, step, health.bad_step),
      bad_terms=jnp.where(first, bits, health.bad_terms),
    )
    return new_state, health, {**terms, "lr": lr}

  return loop_step


MATMUL_PRECISIONS = ("default", "high", "highest")


def with_matmul_precision(fn: Callable[..., Any], precision: str) -> Callable[..., Any]:
  """`fn` traced under `jax.default_matmul_precision(precision)` (`model.matmul_precision`).

  Every dot and convolution traced inside `fn` then carries the precision attribute (visible in
  the lowered StableHLO as `precision = [HIGHEST, HIGHEST]`). "default" leaves `fn` unchanged:
  on TPU a float32 matmul is then one bf16 pass; "high" is 3 passes (bf16_3x), "highest" is full
  float32 (6 passes on TPU; TF32 off on GPU). On CPU all three compute the same float32 result.
  """
  if precision not in MATMUL_PRECISIONS:
    raise ValueError(f"matmul precision {precision!r}; valid: {MATMUL_PRECISIONS}.")
  if precision == "default":
    return fn

  def wrapped(*args, **kwargs):
    with jax.default_matmul_precision(precision):
      return fn(*args, **kwargs)

  wrapped.__name__ = getattr(fn, "__name__", "fn")
  return wrapped
