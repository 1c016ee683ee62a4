"""Class prototypes (SPEC 1.6, quirk Q6): class means of m, drift compensation, one task's update.

Pure NumPy on host features: the trainer computes the features (`evaluate.batched_apply` of the
eval-mode feature function) and passes them in, so every function here is tested against a plain
NumPy computation without a model.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ntkcl_jax.config import EXTRA_QUIRK_VALUES, QUIRKS

REFRESH = QUIRKS["prototype_refresh"] + EXTRA_QUIRK_VALUES["prototype_refresh"]


def class_means(features: np.ndarray, labels: np.ndarray, classes: range) -> np.ndarray:
  """μ_k = mean of the (unnormalised) features of class k, float64 accumulation (SPEC 1.6).

  Args:
    features: (n, D). labels: (n,) new labels. classes: the labels to average, in row order.
  Returns:
    (len(classes), D) float32.
  Raises:
    ValueError: a class in `classes` has no row.
  """
  out = np.zeros((len(classes), features.shape[1]), np.float32)
  for row, k in enumerate(classes):
    sel = labels == k
    if not sel.any():
      raise ValueError(f"Class {k} has no training images; cannot form its prototype.")
    out[row] = features[sel].astype(np.float64).mean(0)
  return out


def drift_compensation(
  prototypes: np.ndarray, feats_old: np.ndarray, feats_new: np.ndarray, sigma: float = 0.3
) -> np.ndarray:
  """SDC-style shift of old prototypes (quirk Q6 `drift_compensation`, [PROJ]).

  δ_i = m_new(x_i) − m_old(x_i) on the current task's training images; each old μ_k moves by
  Σ_i w_ik δ_i / Σ_i w_ik with w_ik = exp(−‖m̂_old(x_i) − μ̂_k‖² / (2σ²)) (hats: unit vectors).

  Args:
    prototypes: (K, D) old class means. feats_old, feats_new: (n, D) features of the same images
      under the end-of-previous-task and the current model.
  Returns:
    (K, D) shifted prototypes, float32.
  """
  if prototypes.shape[0] == 0:
    return prototypes
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
  old, protos = feats_old.astype(np.float64), prototypes.astype(np.float64)
  dist = ((unit(old)[:, None, :] - unit(protos)[None, :, :]) ** 2).sum(-1)  # (n, K)
  w = np.exp(-dist / (2 * sigma**2))
  delta = feats_new.astype(np.float64) - old
  shift = (w.T @ delta) / np.maximum(w.sum(0)[:, None], 1e-12)
  return (protos + shift).astype(np.float32)


def update_after_task(
  prototypes: np.ndarray,
  task_start: int,
  num_new: int,
  new_feats: np.ndarray,
  new_labels: np.ndarray,
  *,
  refresh: str = "never",
  old_feats: Callable[[], np.ndarray] | None = None,
  seen_feats: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None,
) -> np.ndarray:
  """Prototypes after a task: the new classes' means, then the Q6 refresh of the old rows.

  Args:
    prototypes: (C, D) before the task; rows ≥ task_start unset (zero).
    task_start, num_new: k_t and s_t; rows k_t .. k_t + s_t − 1 get the new class means.
    new_feats, new_labels: (n, D) current-model features of the task's training images, (n,).
    refresh: "never" (reference) keeps old rows; "drift_compensation" shifts them by
      `drift_compensation(old, old_feats(), new_feats)`; "oracle" (analysis only) recomputes them
      from `seen_feats()` = (features, labels) of all earlier tasks' training images.
    old_feats, seen_feats: called only when `refresh` needs them (each is a pass over data).
  Returns:
    (C, D) float32, a new array (the input is not modified).
  """
  if refresh not in REFRESH:
    raise ValueError(f"refresh={refresh!r}; expected one of {REFRESH}.")
  k_t, s_t = task_start, num_new
  protos = np.array(prototypes, np.float32, copy=True)
  protos[k_t : k_t + s_t] = class_means(new_feats, new_labels, range(k_t, k_t + s_t))
  if k_t == 0 or refresh == "never":
    return protos
  if refresh == "drift_compensation":
    protos[:k_t] = drift_compensation(protos[:k_t], old_feats(), new_feats)
  else:
    feats, labels = seen_feats()
    protos[:k_t] = class_means(feats, labels, range(k_t))
  return protos
