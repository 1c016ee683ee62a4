"""The closed-form ridge head of RanPAC (and NTK-CL's `eval.head=ridge`): statistics, λ, solve.

A fixed random ReLU projection h = ReLU(f W_rp), W_rp ~ N(0, 1) (d, `ridge.projection_dim`);
ridge classifier W = (G + λI)⁻¹ C from G = Σ hhᵀ, C = Σ hyᵀ accumulated over tasks, λ chosen on
held-out training data of the current task (`closed_form.select_lambda`, `ridge.val_fraction`).
The methods that use it: `methods.analytic.RanPAC`, `methods.ntkcl` (`methods.ridge`).

The statistics (G, C) are run state: they live in the checkpoint (`STATE_KEYS`) in float32 and are
accumulated in float64 from the stored float32 values, so a resumed run equals an uninterrupted
one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from ntkcl_jax import closed_form

if TYPE_CHECKING:
  from ntkcl_jax.plan import RunPlan

STATE_KEYS = ("ridge_G", "ridge_C")


class RidgeHead:
  """The RanPAC head over a feature function: statistics, λ selection, solve, prediction."""

  def __init__(self, plan: RunPlan, feature_dim: int, num_classes: int):
    """`plan`: reads `plan.ridge.projection_dim`, `plan.ridge.val_fraction` and `plan.seed`."""
    m = plan.ridge.projection_dim
    self.w_rp = closed_form.random_projection(plan.seed + 10_002, feature_dim, m) if m > 0 else None
    self.width = m if m > 0 else feature_dim
    self.num_classes = num_classes
    self.val_fraction = plan.ridge.val_fraction
    self.seed = plan.seed

  def init_state(self) -> dict[str, jax.Array]:
    return {
      "ridge_G": jnp.zeros((self.width, self.width), jnp.float32),
      "ridge_C": jnp.zeros((self.width, self.num_classes), jnp.float32),
    }

  def end_of_task(
    self, state: dict[str, Any], feats: np.ndarray, labels: np.ndarray, num_seen: int, t: int
  ) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, Any]]:
    """Adds task t's training features to (G, C); returns (new stats, W (M, K) float32, info)."""
    h = closed_form.project(feats, self.w_rp)
    G_prev = np.asarray(jax.device_get(state["ridge_G"]), np.float64)
    C_prev = np.asarray(jax.device_get(state["ridge_C"]), np.float64)
    lam, val_acc = closed_form.select_lambda(
      G_prev, C_prev, h, labels, num_seen, val_fraction=self.val_fraction, seed=self.seed * 997 + t
    )
    G, C = closed_form.accumulate(G_prev, C_prev, h, labels)
    G32, C32 = G.astype(np.float32), C.astype(np.float32)
    W = closed_form.ridge_solve(G32.astype(np.float64), C32.astype(np.float64), lam)
    info = {"ridge_lambda": lam, "ridge_val_acc": max(val_acc) * 100}
    return {"ridge_G": G32, "ridge_C": C32}, W.astype(np.float32), info

  def make_predict(self, features: Callable[[Any, jax.Array], jax.Array]) -> Callable[..., Any]:
    """jit (params, W (M, K), num_seen, images) → (top-1 (b,), top-k (b, k))."""
    w_rp = None if self.w_rp is None else jnp.asarray(self.w_rp)

    @jax.jit
    def predict(params, w_out, num_seen, images):
      f = features(params, images).astype(jnp.float32)
      h = f if w_rp is None else jax.nn.relu(f @ w_rp)
      logits = h @ w_out
      logits = jnp.where(jnp.arange(logits.shape[1]) < num_seen, logits, -jnp.inf)
      return jnp.argmax(logits, -1), jax.lax.top_k(logits, min(5, logits.shape[1]))[1]

    return predict
