"""The closed-form ridge readout shared by RanPAC and NTK-CL's `eval.head=ridge`.

Wraps `analytic_heads.RidgeHead` (statistics, λ selection, solve, prediction) for a method: its
run state (G, C), its jitted programs and its end-of-task update. One seed per process: the solve
is on the host and the random projection is seeded per run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from ntkcl_jax.analytic_heads import RidgeHead
from ntkcl_jax.methods.base import TaskEnd, TaskResult

if TYPE_CHECKING:
  from ntkcl_jax.plan import RunPlan

# Why a method with this readout cannot stack seeds (`Method.supports_stacked_seeds`).
NOT_STACKED = (
  "the closed-form ridge head runs one seed per process (its solve is on the host and its random "
  "projection is seeded per run, so a stacked step would save nothing)."
)


class RidgeReadout:
  """A ridge classifier over `input_dim`-wide features, after the method's prototypes."""

  def __init__(self, plan: RunPlan, input_dim: int):
    self.head = RidgeHead(plan, input_dim, plan.num_classes)

  def init_state(self) -> dict[str, jax.Array]:
    return self.head.init_state()

  def programs(self, ridge_features: Callable[..., Any]) -> dict[str, Callable[..., Any]]:
    """{"ridge_features": jitted (params, images) → (b, M_in), "ridge_predict": the jitted
    (params, W, num_seen, images) → (top-1, top-k)}."""
    return {
      "ridge_features": ridge_features,
      "ridge_predict": self.head.make_predict(ridge_features),
    }

  def end_of_task(
    self, end: TaskEnd, result: TaskResult, task_feats: list[tuple[np.ndarray, np.ndarray]]
  ) -> TaskResult:
    """Adds task t to (G, C) and predicts with the new W instead of `result`'s predictor.

    `task_feats`: per seed (one), the prototype features of task t; used when the ridge input
    is the prototypes' feature (`ridge_features` is `programs.features`).
    """
    programs = end.programs
    ridge_features = programs.extra["ridge_features"]
    if ridge_features is not programs.features:  # e.g. [c; p; m]
      task_feats = end.apply_seeds(
        ridge_features, end.params, [end.streams[0].train_indices(end.task)]
      )
    ((feats, labels),) = task_feats
    stats, w_out, info = self.head.end_of_task(end.state, feats, labels, end.num_seen, end.task)
    predict = functools.partial(
      programs.extra["ridge_predict"], end.params, jnp.asarray(w_out), end.num_seen
    )
    return TaskResult(
      {**result.state, **end.stack.put(stats)},
      predict,
      [{**i, **info} for i in result.stage_info],
    )
