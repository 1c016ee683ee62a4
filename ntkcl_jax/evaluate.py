"""Features over index sets, prototypes (SPEC 1.6, Q6) and per-stage evaluation (SPEC 3)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ntkcl_jax import metrics, sharding
from ntkcl_jax.data import TaskStream


def batched_apply(
  fn: Callable[..., Any],
  stream: TaskStream,
  indices: np.ndarray,
  split: str,
  batch_size: int,
  mesh: jax.sharding.Mesh,
) -> tuple[Any, np.ndarray]:
  """Runs `fn(images)` over `indices` (test transform), batch-sharded over the mesh.

  Returns:
    (outputs concatenated over valid rows as NumPy, the matching new labels (n,)).
  """
  outs, labels = [], []
  pid, pcount = jax.process_index(), jax.process_count()
  for batch in stream.eval_batches(
    indices, batch_size, split, process_index=pid, process_count=pcount
  ):
    arrays = sharding.put_batch(
      {"image": batch["image"], "mask": batch["mask"], "label": batch["label"]}, mesh
    )
    out, mask, label = sharding.to_host((fn(arrays["image"]), arrays["mask"], arrays["label"]))
    outs.append(jax.tree_util.tree_map(lambda x, m=mask: np.asarray(x)[m], out))
    labels.append(np.asarray(label)[mask])
  stacked = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *outs)
  return stacked, np.concatenate(labels)


def class_means(features: np.ndarray, labels: np.ndarray, classes: range) -> np.ndarray:
  """μ_k = mean of the (unnormalised) features of class k, float64 accumulation (SPEC 1.6)."""
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
  Σ_i w_ik δ_i / Σ_i w_ik with w_ik = exp(−‖m̂_old(x_i) − μ̂_k‖² / (2σ²)).

  Args:
    prototypes: (K, D) old class means. feats_old, feats_new: (n, D) features of the same images
      under the end-of-previous-task and the current model.
  Returns:
    (K, D) shifted prototypes.
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


def evaluate_stage(
  predict: Callable[[Any], Any],
  stream: TaskStream,
  t: int,
  batch_size: int,
  mesh: jax.sharding.Mesh,
  top5: bool = True,
) -> dict[str, Any]:
  """Row t of R, A_t, top-5, old/new and task-id accuracy on the test sets of tasks 0..t.

  Args:
    predict: images → (top-1 (b,), top-k (b, k)) predicted new labels.
  """
  (pred, topk), labels = batched_apply(
    predict, stream, stream.test_indices(t), "test", batch_size, mesh
  )
  k_t = stream.task_range(t)[0]
  use_top5 = top5 and topk.shape[1] >= 5
  return metrics.stage_metrics(
    pred, labels, stream.task_of_label, t, k_t, topk if use_top5 else None
  )
