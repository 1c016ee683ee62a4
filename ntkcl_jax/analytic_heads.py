"""First-session and closed-form-head methods in the same harness: RanPAC, APER, a ridge head.

Config switches (all default to the released behaviour):
- `method=ranpac` (McDonnell et al., NeurIPS 2023, from the paper's description): optional
  first-session adaptation (the current bank's channel adapters + a linear head trained with
  cross-entropy on task 0 only, `train.adapt_tasks`, default 1; 0 = none), then everything frozen;
  feature f = the adapted channel pass's CLS token (equal to the frozen backbone's without
  adaptation, since `up` starts at 0); a fixed random ReLU projection h = ReLU(f W_rp),
  W_rp ~ N(0, 1) (d, `ridge.projection_dim`); ridge classifier W = (G + λI)⁻¹ C from G = Σ hhᵀ,
  C = Σ hyᵀ accumulated over tasks, λ chosen on held-out training data of the current task
  (`closed_form.select_lambda`, `ridge.val_fraction`).
- `method=aper` (Zhou et al. 2023, "Revisiting class-incremental learning with pre-trained
  models: generalizability and adaptivity are all you need", from the paper's description): the
  same first-session adaptation (`train.adapt_tasks` default 1), then frozen; prototype of class
  k = mean of [frozen-backbone CLS; adapted CLS] (2d) over its training images; cosine classifier
  over that concatenation.
- `eval.head=ridge` with `method=ntkcl`: the RanPAC head on NTK-CL's test feature m, or with
  `ridge.features=cpm` on the tripled features [c; p; m] (the
  prototypes are still formed, since L_MI and L_orth read them in training; only the prediction
  changes). `train.adapt_tasks=k` with `method=ntkcl`: only the first k tasks take training
  steps (first-session NTK-CL; later tasks still run EMA, prototypes and evaluation).

The statistics (G, C) are run state: they live in the checkpoint (`STATE_KEYS`) in float32 and are
accumulated in float64 from the stored float32 values, so a resumed run equals an uninterrupted
one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ntkcl_jax import closed_form
from ntkcl_jax.models.ntkcl import NTKCL
from ntkcl_jax.models.vit import VisionTransformer

METHODS = ("ranpac", "aper")
HEADS = ("prototypes", "ridge")
STATE_KEYS = ("ridge_G", "ridge_C")


def adapt_tasks(config: ml_collections.ConfigDict, num_tasks: int) -> int:
  """How many leading tasks take training steps (`train.adapt_tasks`; -1: method default)."""
  k = config.train.adapt_tasks
  if k < 0:
    k = 1 if config.method in METHODS else num_tasks
  return min(k, num_tasks)


def uses_ridge(config: ml_collections.ConfigDict) -> bool:
  return config.method == "ranpac" or (config.method == "ntkcl" and config.eval.head == "ridge")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for values this module cannot run."""
  if config.eval.head not in HEADS:
    raise ValueError(f"eval.head={config.eval.head!r}; valid: {HEADS}.")
  if config.eval.head == "ridge" and config.method not in ("ntkcl", "ranpac"):
    raise ValueError(
      f"eval.head=ridge applies to method=ntkcl (ranpac always uses it), not "
      f"method={config.method!r}."
    )
  if config.ridge.projection_dim < 0 or not 0.0 < config.ridge.val_fraction < 1.0:
    raise ValueError(
      f"ridge.projection_dim={config.ridge.projection_dim} must be >= 0 (0: no projection) and "
      f"ridge.val_fraction={config.ridge.val_fraction} in (0, 1)."
    )


def make_feature_fn(model: NTKCL, method: str) -> Callable[[Any, jax.Array], jax.Array]:
  """(eval params, images) → the feature `method` classifies with.

  ranpac: the current bank's channel CLS (b, d); aper: [frozen backbone CLS; that] (b, 2d).
  """
  d = model.spec.vit.width
  vit = VisionTransformer(model.spec.vit, dtype=model.spec.dtype)

  def adapted(params, images):
    return model.apply({"params": params}, images, train=False)["c"][:, -d:]

  if method == "ranpac":
    return adapted

  def concat(params, images):
    frozen = vit.apply({"params": params["backbone"]}, images)
    return jnp.concatenate([frozen, adapted(params, images)], axis=-1)

  return concat


def make_ridge_feature_fn(model: NTKCL, choice: str) -> Callable[[Any, jax.Array], jax.Array]:
  """NTK-CL's ridge input for `ridge.features=cpm`: [c; p; m] (b, 3D), eval mode."""
  if choice != "cpm" or model.spec.model_name != "both":
    raise ValueError(f"ridge.features={choice!r} needs model.name=both.")

  def features(params, images):
    out = model.apply({"params": params}, images, train=False)
    return jnp.concatenate([out["c"], out["p"], out["m"]], axis=-1)

  return features


class RidgeHead:
  """The RanPAC head over a feature function: statistics, λ selection, solve, prediction."""

  def __init__(self, config: ml_collections.ConfigDict, feature_dim: int, num_classes: int):
    m = config.ridge.projection_dim
    self.w_rp = (
      closed_form.random_projection(config.seed + 10_002, feature_dim, m) if m > 0 else None
    )
    self.width = m if m > 0 else feature_dim
    self.num_classes = num_classes
    self.val_fraction = config.ridge.val_fraction
    self.seed = config.seed
    self.lambdas: list[float] = []

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
