"""Linear-head baselines (`method=seq_finetune`, `joint`) and the linear head they share.

- `seq_finetune` (lower bound): the current bank's channel adapters and a linear head over all
  classes, fine-tuned task after task with cross-entropy over the classes seen so far; no EMA,
  prototypes, L_MI, L_orth or L_reg.
- `joint` (upper bound): the same model trained once on all classes (one task).
The feature is the current-bank channel pass's CLS token, (b, d). `LinearHeadTraining` (the
model, head and step) is also the first-session adaptation of RanPAC and APER (`analytic`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ntkcl_jax import losses
from ntkcl_jax.evaluate import predictions
from ntkcl_jax.methods.base import Method, ProgramParts, TaskEnd, TaskResult
from ntkcl_jax.models.ntkcl import NTKCL, ModelSpec
from ntkcl_jax.models.peft import torch_linear_kernel_init
from ntkcl_jax.optim import merge
from ntkcl_jax.train_step import TaskInfo, TrainState


def init_linear_head(key: jax.Array, width: int, num_classes: int) -> dict[str, jax.Array]:
  """kernel (d, C) ~ U(±1/√d), bias 0: PyTorch Linear-style."""
  return {
    "kernel": torch_linear_kernel_init(width)(key, (width, num_classes)),
    "bias": jnp.zeros((num_classes,), jnp.float32),
  }


def make_linear_feature_fn(model: NTKCL) -> Callable[..., jax.Array]:
  """(params, images, train=False, rngs=None) → current-bank channel CLS feature (b, d)."""
  d = model.spec.vit.width

  def features(params, images, train=False, rngs=None):
    return model.apply({"params": params}, images, train=train, rngs=rngs)["c"][:, -d:]

  return features


def make_linear_train_step(
  model: NTKCL, tx: optax.GradientTransformation
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """(state, frozen, aux, batch, key, lr) → (state, terms); CE over classes < num_seen."""
  features = make_linear_feature_fn(model)

  def loss_fn(trainable, frozen, aux, batch, key):
    info: TaskInfo = aux["task"]
    params = merge(trainable, frozen)
    head = params.pop("proxy_head")
    feats = features(params, batch["image"], train=True, rngs={"dropout": key})
    logits = feats @ head["kernel"] + head["bias"]
    ce = losses.masked_cross_entropy(logits, batch["label"], batch["mask"], info.num_seen)
    return ce, {"ce_linear": ce, "total": ce}

  def train_step(state: TrainState, frozen, aux, batch, key, lr):
    (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, frozen, aux, batch, key
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree_util.tree_map(lambda p, u: p - lr * u, state.params, updates)
    terms["grad_norm"] = optax.global_norm(grads)
    return TrainState(params=params, opt_state=opt_state, step=state.step + 1), terms

  return train_step


def make_linear_predict(model: NTKCL) -> Callable[..., Any]:
  """(params incl. "proxy_head", num_seen, images) → (top-1, top-k) over classes < num_seen."""
  features = make_linear_feature_fn(model)

  def predict(params, num_seen, images):
    head = params["proxy_head"]
    body = {k: v for k, v in params.items() if k != "proxy_head"}
    return predictions(features(body, images) @ head["kernel"] + head["bias"], num_seen)

  return predict


class LinearHeadTraining(Method):
  """Trains the current bank's channel adapters and one linear head over all classes, kept
  across tasks, with cross-entropy over the classes seen so far."""

  @classmethod
  def model_spec(cls, spec: ModelSpec) -> ModelSpec:
    return dataclasses.replace(spec, model_name="channel")

  def init_proxy_head(self, root_key: jax.Array) -> dict[str, jax.Array]:
    head_key = jax.random.fold_in(root_key, 10_001)
    return init_linear_head(head_key, self.spec.vit.width, self.plan.num_classes)

  def task_proxy_head(self, task_key: jax.Array) -> None:
    return None

  def train_step(self, model: NTKCL, tx: optax.GradientTransformation) -> Callable[..., Any]:
    return make_linear_train_step(model, tx)


class SeqFinetune(LinearHeadTraining):
  """Sequential fine-tuning; predicts with the linear head (no prototypes)."""

  def programs(self, parts: ProgramParts) -> dict[str, Callable[..., Any]]:
    in_axes = ({**parts.param_axes, "proxy_head": 0}, None, 0)
    return {
      "linear_predict": parts.jit(parts.stack.vmap(make_linear_predict(parts.model), in_axes))
    }

  def end_of_task(self, end: TaskEnd) -> TaskResult:
    with_head = {**end.params, "proxy_head": end.state["train"].params["proxy_head"]}
    predict = functools.partial(end.programs.extra["linear_predict"], with_head, end.num_seen)
    return TaskResult({}, predict, [{} for _ in end.streams])


class Joint(SeqFinetune):
  """Joint training: sequential fine-tuning on one task holding every class."""

  one_task = True
