"""Trainable vs frozen as data, the optimiser and the schedule (SPEC 2.2, 2.5, 8).

Freezing is a label tree over the parameter pytree, built from first-match path rules
(big_vision style) that must cover every leaf. Gradients are taken w.r.t. the `train` partition
only (`partition` / `merge`), so frozen weights never get a gradient computation at all.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.traverse_util as traverse_util
import jax.numpy as jnp
import optax

PARTITION_RULES: tuple[tuple[str, str], ...] = (
  (r"backbone/.*", "freeze"),
  (r"peft/ema/.*", "freeze"),
  (r"(peft/current|fusion|proxy_head)/.*", "train"),
)


def path_labels(
  params: Mapping[str, Any], rules: Sequence[tuple[str, str]] = PARTITION_RULES
) -> dict[str, Any]:
  """Label tree ("train" / "freeze") with the structure of `params`, first matching rule wins.

  Raises:
    ValueError: a leaf matches no rule (its path is named).
  """
  flat = traverse_util.flatten_dict(params, sep="/")
  labels = {}
  for path in flat:
    for pattern, label in rules:
      if re.fullmatch(pattern, path):
        labels[path] = label
        break
    else:
      raise ValueError(f"Parameter '{path}' matches no partition rule in {rules}.")
  return traverse_util.unflatten_dict(labels, sep="/")


def partition(params: Mapping[str, Any], labels: Mapping[str, Any], label: str) -> dict[str, Any]:
  """The sub-tree of leaves labelled `label` (nested dict, other leaves absent)."""
  flat, flat_labels = (traverse_util.flatten_dict(t, sep="/") for t in (params, labels))
  return traverse_util.unflatten_dict(
    {k: v for k, v in flat.items() if flat_labels[k] == label}, sep="/"
  )


def merge(*trees: Mapping[str, Any]) -> dict[str, Any]:
  """Union of disjoint nested dicts (inverse of `partition`)."""
  flat: dict[str, Any] = {}
  for t in trees:
    for k, v in traverse_util.flatten_dict(t, sep="/").items():
      if k in flat:
        raise ValueError(f"Leaf '{k}' appears in more than one partition.")
      flat[k] = v
  return traverse_util.unflatten_dict(flat, sep="/")


def epoch_cosine_lr(step, lr0, epochs, steps_per_epoch):
  """½·lr0·(1 + cos(π·⌊step/S⌋/E)) for a traced or concrete step (and traced lr0, E, S).

  The trainer calls this inside the jitted step with `TrainState.step` and the task's (lr0, E, S)
  as traced scalars, so the host never computes a learning rate and a new task's S does not
  recompile the step.
  """
  epoch = jnp.floor_divide(step, steps_per_epoch)
  return 0.5 * lr0 * (1.0 + jnp.cos(math.pi * epoch / epochs))


def epoch_cosine_schedule(lr0: float, epochs: int, steps_per_epoch: int) -> optax.Schedule:
  """lr(step) = ½·lr0·(1 + cos(π·⌊step/S⌋/E)): per-epoch cosine, no warmup, η_min = 0 (SPEC 2.5)."""
  if steps_per_epoch < 1 or epochs < 1:
    raise ValueError(f"Need epochs >= 1 and steps_per_epoch >= 1, got {epochs}, {steps_per_epoch}.")
  return lambda step: epoch_cosine_lr(step, lr0, epochs, steps_per_epoch)


def make_optimizer(weight_decay: float, momentum: float = 0.9) -> optax.GradientTransformation:
  """chain(add_decayed_weights(wd), trace(momentum)): PyTorch SGD's update *direction*.

  The step multiplies the result by −lr(step), with lr from `epoch_cosine_lr` evaluated inside the
  jitted step on the step counter (`train_step.make_loop_step`); together this is exactly
  `chain(add_decayed_weights(wd), sgd(schedule, momentum))` (tested), but a task's schedule does
  not have to be baked into the compiled step. Applied to the `train` partition only; weight
  decay hits every trainable leaf (biases, β, σ, proxy head included), as PyTorch SGD does.
  """
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.trace(decay=momentum))


def count_params(tree: Any) -> int:
  return sum(int(x.size) for x in traverse_util.flatten_dict(tree).values())
