"""NTK-CL (the default method, SPEC 2): both PEFT banks, fusion, per-task proxy head, adaptive EMA,
section-weighted prototype logits; optional drift compensation (Q6) and ridge head.

`eval.head=ridge`: the RanPAC head on the test feature m, or with `ridge.features=cpm` on the
tripled features [c; p; m] (the prototypes are still formed, since L_MI and L_orth read them in
training; only the prediction changes). `train.adapt_tasks=k`: only the first k tasks take
training steps (first-session NTK-CL; later tasks still run EMA, prototypes and evaluation).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ntkcl_jax.ema import ema_update
from ntkcl_jax.methods.base import Features, Method, ProgramParts, TaskEnd, TaskResult
from ntkcl_jax.methods.ridge import NOT_STACKED, RidgeReadout
from ntkcl_jax.models.ntkcl import NTKCL


def make_cpm_feature_fn(model: NTKCL) -> Features:
  """NTK-CL's ridge input for `ridge.features=cpm`: [c; p; m] (b, 3D), eval mode."""
  if model.spec.model_name != "both":
    raise ValueError("ridge.features='cpm' needs model.name=both.")

  def features(params, images):
    out = model.apply({"params": params}, images, train=False)
    return jnp.concatenate([out["c"], out["p"], out["m"]], axis=-1)

  return features


class NTKCLMethod(Method):
  """NTK-CL as released (reference quirks) or corrected, with its prototype or ridge head."""

  accepts_ridge_head = True

  @functools.cached_property
  def ridge(self) -> RidgeReadout | None:
    """The ridge head of `eval.head=ridge` (built when first used: its projection is drawn)."""
    if self.plan.eval_head != "ridge":
      return None
    return RidgeReadout(self.plan, self.classified_width)

  @property
  def classifies_cpm(self) -> bool:
    """Whether the head reads [c; p; m] (`eval.head=ridge`, `ridge.features=cpm`), else m."""
    return self.plan.eval_head == "ridge" and self.plan.ridge.features == "cpm"

  @property
  def classified_width(self) -> int:
    """Width of the feature the head reads: 3D for [c; p; m], else D."""
    return self.plan.spec.feature_dim * (3 if self.classifies_cpm else 1)

  @property
  def supports_stacked_seeds(self) -> bool:
    return self.plan.eval_head != "ridge"

  @property
  def why_not_stacked(self) -> str:
    return NOT_STACKED

  @property
  def section_weights(self) -> tuple[float, ...]:
    return self.plan.section_weights

  def init_state(self) -> dict[str, jax.Array]:
    return self.ridge.init_state() if self.ridge else {}

  def programs(self, parts: ProgramParts) -> dict[str, Callable[..., Any]]:
    if self.ridge is None:
      return {}
    return self.ridge.programs(
      parts.jit(make_cpm_feature_fn(parts.model)) if self.classifies_cpm else parts.features
    )

  def ema_after_task(self, ema: Any, current: Any, task: int, last: bool) -> Any:
    if self.plan.use_ema and (not last or self.plan.quirks.ema_after_last_task):
      # leaf-wise blend with scalar rates: the same update for a stacked bank
      return ema_update(ema, current, task)
    return ema

  def refresh(self) -> str:
    return self.plan.quirks.prototype_refresh

  def end_of_task(self, end: TaskEnd) -> TaskResult:
    result, new = self.prototype_result(end)
    return self.ridge.end_of_task(end, result, new) if self.ridge else result
