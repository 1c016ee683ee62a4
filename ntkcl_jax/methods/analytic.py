"""First-session methods on a frozen backbone: RanPAC and APER (from the papers' descriptions).

Both train like the linear baselines (`linear.LinearHeadTraining`: the current bank's channel
adapters and a linear head, cross-entropy) on the first `train.adapt_tasks` tasks (default 1;
0 = no adaptation), then freeze everything and classify their own way:

- `method=ranpac` (McDonnell et al., NeurIPS 2023): feature f = the adapted channel pass's CLS
  token (equal to the frozen backbone's without adaptation, since `up` starts at 0); a fixed
  random ReLU projection h = ReLU(f W_rp), W_rp ~ N(0, 1) (d, `ridge.projection_dim`); ridge
  classifier W = (G + λI)⁻¹ C from G = Σ hhᵀ, C = Σ hyᵀ accumulated over tasks, λ chosen on
  held-out training data of the current task (`closed_form.select_lambda`,
  `ridge.val_fraction`). The statistics are run state (`ridge.RidgeReadout`).
- `method=aper` (Zhou et al. 2023, "Revisiting class-incremental learning with pre-trained
  models: generalizability and adaptivity are all you need"): prototype of class k = mean of
  [frozen-backbone CLS; adapted CLS] (2d) over its training images; cosine classifier over that
  concatenation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ntkcl_jax.methods.base import Features, ProgramParts, TaskEnd, TaskResult
from ntkcl_jax.methods.linear import LinearHeadTraining
from ntkcl_jax.methods.ridge import NOT_STACKED, RidgeReadout
from ntkcl_jax.models.ntkcl import NTKCL
from ntkcl_jax.models.vit import VisionTransformer


def adapted_cls_fn(model: NTKCL) -> Features:
  """(eval params, images) → the current bank's channel CLS (b, d)."""
  d = model.spec.vit.width

  def adapted(params, images):
    return model.apply({"params": params}, images, train=False)["c"][:, -d:]

  return adapted


class FirstSession(LinearHeadTraining):
  """Linear-head adaptation on the first `train.adapt_tasks` tasks (default 1), then frozen."""

  def default_adapt_tasks(self, num_tasks: int) -> int:
    return 1


class APER(FirstSession):
  """Cosine prototypes over [frozen backbone CLS; adapted CLS] (b, 2d)."""

  @property
  def feature_dim(self) -> int:
    return 2 * self.spec.vit.width

  def feature_fn(self, model: NTKCL) -> Features:
    vit = VisionTransformer(model.spec.vit, dtype=model.spec.dtype)
    adapted = adapted_cls_fn(model)

    def concat(params, images):
      frozen = vit.apply({"params": params["backbone"]}, images)
      return jnp.concatenate([frozen, adapted(params, images)], axis=-1)

    return concat


class RanPAC(FirstSession):
  """Random ReLU projection of the adapted CLS, ridge classifier (one seed per process)."""

  accepts_ridge_head = True  # eval.head is ignored: RanPAC always predicts with its ridge head

  @functools.cached_property
  def ridge(self) -> RidgeReadout:
    """The ridge head on the adapted CLS (built when first used: its projection is drawn)."""
    return RidgeReadout(self.plan, self.plan.spec.vit.width)

  @property
  def supports_stacked_seeds(self) -> bool:
    return False

  @property
  def why_not_stacked(self) -> str:
    return NOT_STACKED

  @property
  def feature_dim(self) -> int:
    return self.spec.vit.width

  def feature_fn(self, model: NTKCL) -> Features:
    return adapted_cls_fn(model)

  def init_state(self) -> dict[str, jax.Array]:
    return self.ridge.init_state()

  def programs(self, parts: ProgramParts) -> dict[str, Callable[..., Any]]:
    return self.ridge.programs(parts.features)

  def end_of_task(self, end: TaskEnd) -> TaskResult:
    result, new = self.prototype_result(end)
    return self.ridge.end_of_task(end, result, new)
