"""Linear-head baselines in the same harness (config `method`): the step and the prediction.

- `seq_finetune` (lower bound): the current bank's channel adapters and a linear head over all
  classes, fine-tuned task after task with cross-entropy over the classes seen so far; no EMA,
  prototypes, L_MI, L_orth or L_reg.
- `joint` (upper bound): the same model trained once on all classes (one task).
The feature is the current-bank channel pass's CLS token, (b, d).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ntkcl_jax import losses
from ntkcl_jax.evaluate import predictions
from ntkcl_jax.models.ntkcl import NTKCL
from ntkcl_jax.models.peft import torch_linear_kernel_init
from ntkcl_jax.optim import merge
from ntkcl_jax.train_step import TaskInfo, TrainState

LINEAR_METHODS = ("seq_finetune", "joint")


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
