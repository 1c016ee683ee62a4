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
from ntkcl_jax.models.heads import ProxyHead, section_weighted_logits
from ntkcl_jax.models.ntkcl import NTKCL, test_feature_key
from ntkcl_jax.optim import merge, partition, path_labels

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
      feats["m"], labels, mask, rows, row_labels, row_mask, weights.tau
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
  model: NTKCL, weights: losses.LossWeights, tx: optax.GradientTransformation, batch_size: int
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """(state, frozen, aux, batch, key, lr) → (new state, terms). Pure; jit it with shardings.

  `tx` gives the update direction (`optim.make_optimizer`); the step applies −lr times it.
  """

  def train_step(state: TrainState, frozen, aux, batch, key, lr):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, terms), grads = grad_fn(
      state.params, frozen, aux, batch, key, model=model, weights=weights, batch_size=batch_size
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
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

  Prediction is task-agnostic over the classes seen so far (rows < num_seen), SPEC 1.6.
  """
  features = make_feature_fn(model)

  def evaluate(params, prototypes, num_seen, images):
    logits = section_weighted_logits(features(params, images), prototypes, section_weights)
    logits = jnp.where(jnp.arange(prototypes.shape[0]) < num_seen, logits, -jnp.inf)
    k = min(top_k, prototypes.shape[0])
    return jnp.argmax(logits, -1), jax.lax.top_k(logits, k)[1]

  return evaluate
