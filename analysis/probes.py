"""Probe sets of the NTK diagnostics: which images, in which row order (SPEC 7.3) [PROJ].

A `ProbeSet` holds every task's probe images, seen and unseen tasks alike, as one (N, H, W, C)
array whose rows are ordered task-major, train rows before test rows:

  [X_0^tr, X_0^te, X_1^tr, X_1^te, ..., X_{T-1}^tr, X_{T-1}^te]

with, per row, the task, the split ("tr"/"te"), the global (new) label and the index into the
split's source. Train rows of a task are ordered round-robin over its classes, so every prefix
(the nested sample-size sweep of SPEC 7.6 keeps the first n train rows) stays class-balanced.
`ProbeSet.kernel(theta)` wraps a Gram over these rows as an `analysis.cl_kernels.BlockKernel`.

Two ways to build one:

* `build_probes(stream, ...)`: from a `ntkcl_jax.data.TaskStream` (what the training hook does):
  `stream.probe_indices(t, split, n, seed)` (class-balanced, `np.random.default_rng([seed, t])`)
  and the test transform (`stream.eval_batches`, also for the training images).
* `ProbeSet.from_arrays(...)`: any images and labels you already hold (Colab, other models).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from analysis.cl_kernels import BlockKernel

__all__ = ["ProbeSet", "build_probes", "round_robin"]


def round_robin(labels: np.ndarray) -> np.ndarray:
  """Permutation that interleaves classes: one of each class in label order, then the next, ...

  Args:
    labels: (n,) ints. Within a class the original order is kept.
  Returns:
    (n,) int permutation `p`; `labels[p]` cycles through the classes while each has rows left.
  """
  labels = np.asarray(labels)
  rank = np.zeros(labels.size, dtype=np.int64)
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    rank[members] = np.arange(members.size)
  return np.lexsort((labels, rank))


@dataclasses.dataclass(frozen=True, eq=False)
class ProbeSet:
  """Probe images of all T tasks and their row layout (SPEC 7.3).

  Attributes:
    images: (N, H, W, C) float32, test transform, rows in the layout order above.
    index: (N,) int64 index of each row into its split's source (-1 if unknown).
    task_of_row: (N,) int64 task t. split_of_row: (N,) "tr" / "te". labels: (N,) int64 global.
    class_ranges: T pairs (k_t, s_t).
  """

  images: np.ndarray
  index: np.ndarray
  task_of_row: np.ndarray
  split_of_row: np.ndarray
  labels: np.ndarray
  class_ranges: tuple[tuple[int, int], ...]

  def __post_init__(self):
    n = int(np.shape(self.images)[0])
    for name in ("index", "task_of_row", "split_of_row", "labels"):
      if np.shape(getattr(self, name)) != (n,):
        raise ValueError(
          f"ProbeSet.{name} has shape {np.shape(getattr(self, name))}; expected ({n},), one entry "
          "per image row."
        )
    object.__setattr__(self, "class_ranges", tuple((int(k), int(s)) for k, s in self.class_ranges))

  @classmethod
  def from_arrays(
    cls,
    images: np.ndarray,
    labels: np.ndarray,
    task_of_row: np.ndarray,
    split_of_row: Sequence[str] | np.ndarray,
    class_ranges: Sequence[tuple[int, int]],
    index: np.ndarray | None = None,
  ) -> ProbeSet:
    """A probe set from arrays you hold; rows are reordered into the layout order.

    Args:
      images: (N, ...) model inputs. labels: (N,) global labels in task t's range [k_t, k_t + s_t).
      task_of_row: (N,) task of each row. split_of_row: (N,) "tr" or "te".
      class_ranges: T pairs (k_t, s_t). index: optional (N,) source indices (default 0..N-1).
    """
    labels = np.asarray(labels, dtype=np.int64)
    task_of_row = np.asarray(task_of_row, dtype=np.int64)
    split_of_row = np.asarray(split_of_row).astype(str)
    index = np.arange(labels.size) if index is None else np.asarray(index, dtype=np.int64)
    order = []
    for t in range(len(class_ranges)):
      for split in ("tr", "te"):
        rows = np.flatnonzero((task_of_row == t) & (split_of_row == split))
        if split == "tr":
          rows = rows[round_robin(labels[rows])]
        order.append(rows)
    order = np.concatenate(order)
    if order.size != labels.size:
      raise ValueError(
        f"{labels.size - order.size} probe rows have a task outside [0, {len(class_ranges)}) or a "
        "split other than 'tr'/'te'."
      )
    return cls(
      np.asarray(images)[order],
      index[order],
      task_of_row[order],
      split_of_row[order],
      labels[order],
      tuple(class_ranges),
    )

  @property
  def num_rows(self) -> int:
    return int(self.labels.size)

  @property
  def num_tasks(self) -> int:
    return len(self.class_ranges)

  def kernel(self, theta: np.ndarray) -> BlockKernel:
    """The (N, N) Gram over these rows as a `BlockKernel` (float64, symmetrised)."""
    return BlockKernel(theta, self.task_of_row, self.split_of_row, self.labels, self.class_ranges)


def build_probes(
  stream,
  num_tasks: int,
  n_train: int,
  n_test: int,
  seed: int,
  batch_size: int = 256,
) -> ProbeSet:
  """Probe sets of tasks 0..num_tasks-1 from a `TaskStream` (SPEC 7.3), test transform.

  Args:
    stream: `ntkcl_jax.data.TaskStream` (uses `probe_indices`, `task_range`, `eval_batches`).
    num_tasks: T (a run truncated by `train.max_tasks` probes only its tasks).
    n_train, n_test: probe sizes per task (SPEC default 64 / 32); class-balanced.
    seed: `analysis.seed`; task t's draw uses `np.random.default_rng([seed, t])`.
    batch_size: rows per `eval_batches` call (host memory only; results do not depend on it).
  Returns:
    `ProbeSet` with N = T (n_train + n_test) rows.
  Raises:
    ValueError: a class has fewer images than its share of the probe (from `probe_indices`).
  """
  images, index, task_of_row, split_of_row, labels = [], [], [], [], []
  for t in range(num_tasks):
    for split, short, n in (("train", "tr", n_train), ("test", "te", n_test)):
      idx = stream.probe_indices(t, split, n, seed)
      if short == "tr":
        idx = idx[round_robin(stream.labels(split)[idx])]
      rows = []
      for batch in stream.eval_batches(idx, batch_size, split):
        rows.append(batch["image"][batch["mask"]])
        if not np.all(batch["index"][batch["mask"]] >= 0):
          raise RuntimeError("eval_batches returned a valid row without a source index.")
      images.append(np.concatenate(rows, axis=0))
      index.append(idx)
      task_of_row.append(np.full(idx.size, t, dtype=np.int64))
      split_of_row.append(np.full(idx.size, short))
      labels.append(stream.labels(split)[idx])
  return ProbeSet(
    np.concatenate(images).astype(np.float32),
    np.concatenate(index).astype(np.int64),
    np.concatenate(task_of_row),
    np.concatenate(split_of_row),
    np.concatenate(labels).astype(np.int64),
    tuple(stream.task_range(t) for t in range(num_tasks)),
  )
