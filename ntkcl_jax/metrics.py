"""Continual-learning metrics (SPEC 3) and the JSON-lines metric writer (SPEC 8).

Everything is in percent. ``R`` is the (T, T) accuracy matrix: ``R[l, i]`` = top-1 on task i's test
set after training task l, defined for ``i <= l``; entries above the diagonal are ignored (store
NaN there). ``A`` is the (T,) vector of per-stage accuracies: ``A[l]`` = top-1 on the union of the
test sets of tasks 0..l, sample-weighted (the reference's "top1"). Values are not rounded (the
reference rounds each A_l to 2 decimals before averaging).

Predictions are task-agnostic over the classes seen at the stage. Labels are new global labels;
``task_of_label`` maps each of them to its task (`ntkcl_jax.data.label_to_task`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
  "MetricWriter",
  "accuracy",
  "accuracy_row",
  "average_accuracy",
  "backward_transfer",
  "final_metrics",
  "forgetting",
  "last_accuracy",
  "old_new_accuracy",
  "read_jsonl",
  "seed_mean_std",
  "stage_metrics",
  "task_id_accuracy",
  "topk_accuracy",
]


def _check_stage_vector(A) -> np.ndarray:
  A = np.asarray(A, dtype=np.float64)
  if A.ndim != 1 or A.size == 0:
    raise ValueError(f"A must be a non-empty (T,) vector of stage accuracies, got {A.shape}.")
  return A


def _check_matrix(R) -> np.ndarray:
  R = np.asarray(R, dtype=np.float64)
  if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
    raise ValueError(f"R must be a square (T, T) accuracy matrix, got shape {R.shape}.")
  lower = R[np.tril_indices(R.shape[0])]
  if not np.all(np.isfinite(lower)):
    raise ValueError("R has non-finite entries on or below the diagonal (R[l, i], i <= l).")
  return R


def average_accuracy(A) -> float:
  """Ā = (1/T)·Σ_l A_l (the reference's average incremental accuracy).

  Args:
    A: (T,) stage accuracies in %.
  """
  return float(np.mean(_check_stage_vector(A)))


def last_accuracy(A) -> float:
  """A_T = A_{T−1}: accuracy on all classes after the last task. A: (T,) in %."""
  return float(_check_stage_vector(A)[-1])


def forgetting(R) -> float:
  """F = (1/(T−1))·Σ_{i≤T−2} [max_{l∈{i..T−2}} R[l, i] − R[T−1, i]] ([PROJ] choice, SPEC 3).

  Args:
    R: (T, T) accuracy matrix in %; entries above the diagonal are ignored.
  Returns:
    F in percentage points; 0.0 when T = 1 (nothing can be forgotten).
  """
  R = _check_matrix(R)
  T = R.shape[0]
  if T == 1:
    return 0.0
  drops = [R[i : T - 1, i].max() - R[T - 1, i] for i in range(T - 1)]
  return float(np.mean(drops))


def backward_transfer(R) -> float:
  """BWT = (1/(T−1))·Σ_{i≤T−2} (R[T−1, i] − R[i, i]).

  Args:
    R: (T, T) accuracy matrix in %; entries above the diagonal are ignored.
  Returns:
    BWT in percentage points (negative = forgetting); 0.0 when T = 1.
  """
  R = _check_matrix(R)
  T = R.shape[0]
  if T == 1:
    return 0.0
  return float(np.mean([R[T - 1, i] - R[i, i] for i in range(T - 1)]))


def accuracy(pred, label) -> float:
  """Top-1 in %: 100·mean(pred == label). pred, label: (N,) ints; NaN when N = 0."""
  pred, label = np.asarray(pred), np.asarray(label)
  if pred.shape != label.shape or pred.ndim != 1:
    raise ValueError(f"pred {pred.shape} and label {label.shape} must be equal (N,) shapes.")
  if label.size == 0:
    return math.nan
  return float(100.0 * np.mean(pred == label))


def accuracy_row(pred, label, task_of_label, t: int) -> np.ndarray:
  """Row t of R: top-1 on each seen task's test samples.

  Args:
    pred: (N,) predicted new labels over the classes seen after task t.
    label: (N,) true new labels; all must belong to tasks 0..t.
    task_of_label: (C,) task id of each new label.
    t: stage index.
  Returns:
    (t+1,) float64, entry i = 100·mean(pred == label over samples of task i) (NaN if it has none).
  """
  label = np.asarray(label)
  task = np.asarray(task_of_label)[label]
  if task.size and task.max() > t:
    raise ValueError(f"labels of task {task.max()} given for the row of stage {t}.")
  pred = np.asarray(pred)
  return np.array([accuracy(pred[task == i], label[task == i]) for i in range(t + 1)])


def topk_accuracy(topk_pred, label) -> float:
  """Top-k in %: share of samples whose label is among their k predictions.

  Args:
    topk_pred: (N, k) predicted labels (e.g. k = 5, any order). label: (N,).
  """
  topk_pred, label = np.asarray(topk_pred), np.asarray(label)
  if topk_pred.ndim != 2 or topk_pred.shape[0] != label.shape[0]:
    raise ValueError(f"topk_pred must be (N, k) with N = {label.shape[0]}, got {topk_pred.shape}.")
  if label.size == 0:
    return math.nan
  return float(100.0 * np.mean(np.any(topk_pred == label[:, None], axis=1)))


def old_new_accuracy(pred, label, k_t: int) -> tuple[float, float]:
  """(old, new) top-1 in %: old = samples with label < k_t, new = label >= k_t.

  Old is NaN at task 0 (no old classes).
  """
  pred, label = np.asarray(pred), np.asarray(label)
  old = label < k_t
  return accuracy(pred[old], label[old]), accuracy(pred[~old], label[~old])


def task_id_accuracy(pred, label, task_of_label) -> float:
  """Share (%) of samples whose predicted class lies in their own task's class range.

  ``100·mean(task_of_label[pred] == task_of_label[label])``; equals the reference's formula when
  init = inc (SPEC 3).
  """
  task_of_label = np.asarray(task_of_label)
  pred, label = np.asarray(pred), np.asarray(label)
  if label.size == 0:
    return math.nan
  return float(100.0 * np.mean(task_of_label[pred] == task_of_label[label]))


def stage_metrics(pred, label, task_of_label, t: int, k_t: int, topk_pred=None) -> dict[str, Any]:
  """All per-stage metrics of SPEC 3 from one pass of predictions on the seen-class test union.

  Args:
    pred: (N,) top-1 predictions. label: (N,) new labels (tasks 0..t). task_of_label: (C,).
    t: stage. k_t: first new label of task t. topk_pred: optional (N, 5) top-5 predictions.
  Returns:
    dict: ``R_row`` (t+1 floats), ``A`` (A_t, sample weighted over the union), ``old``, ``new``,
    ``task_id`` and, when topk_pred is given, ``top5``.
  """
  old, new = old_new_accuracy(pred, label, k_t)
  out = {
    "R_row": accuracy_row(pred, label, task_of_label, t).tolist(),
    "A": accuracy(pred, label),
    "old": old,
    "new": new,
    "task_id": task_id_accuracy(pred, label, task_of_label),
  }
  if topk_pred is not None:
    out["top5"] = topk_accuracy(topk_pred, label)
  return out


def final_metrics(R, A) -> dict[str, Any]:
  """Ā, A_T, F, BWT and R (NaN above the diagonal) for the ``final`` metrics line (SPEC 8)."""
  R = _check_matrix(R)
  R_out = np.where(np.tril(np.ones_like(R, dtype=bool)), R, np.nan)
  return {
    "avg_acc": average_accuracy(A),
    "last_acc": last_accuracy(A),
    "forgetting": forgetting(R),
    "bwt": backward_transfer(R),
    "R": R_out.tolist(),
  }


def seed_mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and population std (ddof = 0) over seeds (SPEC 3)."""
  values = np.asarray(values, dtype=np.float64)
  if values.ndim != 1 or values.size == 0:
    raise ValueError(f"values must be a non-empty 1-D sequence, got shape {values.shape}.")
  return float(values.mean()), float(values.std(ddof=0))


def _plain(obj):
  """NumPy scalars/arrays -> Python floats/ints/lists; NaN/±Inf -> None (valid JSON)."""
  if isinstance(obj, dict):
    return {str(k): _plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_plain(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return _plain(obj.tolist())
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    obj = float(obj)
    return obj if math.isfinite(obj) else None
  if hasattr(obj, "__array__"):  # jax arrays
    return _plain(np.asarray(obj))
  return obj


class MetricWriter:
  """Appends one JSON object per line to ``path`` (e.g. ``workdir/metrics.jsonl``).

  Append mode, so a resumed run continues the file; flushed after every line. Values are made
  plain (NumPy/JAX -> floats, ints, lists; NaN/Inf -> null). Only a writer with ``enabled=True``
  touches the file (pass ``enabled=jax.process_index() == 0``).

  With ``tensorboard_dir`` set and the optional ``tensorboardX`` package installed, every record
  written with a ``step`` also goes to TensorBoard event files there: each finite scalar field as
  ``"{kind}/{field}"`` at that step (lists, strings and nulls are JSON-only). ``purge_step`` (the
  first step a resumed run writes) makes TensorBoard hide the events an earlier attempt wrote at
  that step or later, as the JSON file is truncated to the checkpoint. Without ``tensorboardX`` the writer
  says so once in the log and writes JSON only.
  """

  def __init__(
    self,
    path: str | os.PathLike,
    enabled: bool = True,
    tensorboard_dir: str | os.PathLike | None = None,
    purge_step: int | None = None,
  ):
    self.path = os.fspath(path)
    self.enabled = bool(enabled)
    self._file = None
    self._tb = None
    if self.enabled and tensorboard_dir is not None:
      self._tb = _tensorboard_writer(os.fspath(tensorboard_dir), purge_step)

  @property
  def tensorboard(self) -> bool:
    """Whether records with a step also go to TensorBoard event files."""
    return self._tb is not None

  def write(self, record: dict[str, Any], step: int | None = None) -> None:
    """Write one record (a dict with str keys) as one line; its scalars to TensorBoard at
    ``step`` when given."""
    if not self.enabled:
      return
    if not isinstance(record, dict):
      raise TypeError(f"a metrics record must be a dict, got {type(record).__name__}.")
    if self._file is None:
      parent = os.path.dirname(self.path)
      if parent:
        os.makedirs(parent, exist_ok=True)
      self._file = open(self.path, "a", encoding="utf-8")  # closed in close()
    plain = _plain(record)
    self._file.write(json.dumps(plain, allow_nan=False) + "\n")
    self._file.flush()
    if self._tb is not None and step is not None:
      kind = plain.get("kind", "metrics")
      for key, value in plain.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tb.add_scalar(f"{kind}/{key}", value, global_step=int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _tensorboard_writer(logdir: str, purge_step: int | None):
  """A `tensorboardX.SummaryWriter` on `logdir`, or None (logged) when it is not installed."""
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    logging.getLogger(__name__).info(
      "tensorboardX is not installed: metrics go to metrics.jsonl only "
      "(pip install tensorboardX for TensorBoard event files)."
    )
    return None
  return SummaryWriter(logdir=logdir, purge_step=purge_step)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """All records of a JSON-lines file, in order."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
