"""The row layout of one kernel measurement: `BlockKernel` (SPEC 7.3, 7.8) [PROJ]."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np

Split = Literal["tr", "te", "all"]
_SPLITS = ("tr", "te")


def _eigvalsh_clipped(theta: np.ndarray) -> np.ndarray:
  """Ascending eigenvalues of the symmetrised matrix, clipped at 0 (SPEC 7.8)."""
  return np.clip(np.linalg.eigvalsh(0.5 * (theta + theta.T)), 0.0, None)


@dataclasses.dataclass(frozen=True, eq=False)
class BlockKernel:
  """One kernel measurement over all tasks' probe rows (SPEC 7.3).

  Attributes:
    theta: (N, N) float64 Gram matrix over all probe rows; symmetrised on construction.
    task_of_row: (N,) int task index t in [0, T) of each row.
    split_of_row: (N,) str, "tr" (row of X_t^tr) or "te" (row of X_t^te).
    labels: (N,) int global class labels; task t's rows lie in [k_t, k_t + s_t).
    class_ranges: T pairs (k_t, s_t): task t holds global labels [k_t, k_t + s_t).

  Rows of one task and split keep their order in `theta`; "the first n train rows" (sample-size
  sweep) means the first n in that order, so the caller should order each X_t^tr class-balanced
  (e.g. round-robin over classes) for nested subsets to stay balanced.
  """

  theta: np.ndarray
  task_of_row: np.ndarray
  split_of_row: np.ndarray
  labels: np.ndarray
  class_ranges: tuple[tuple[int, int], ...]

  def __post_init__(self):
    theta = np.array(self.theta, dtype=np.float64)
    if theta.ndim != 2 or theta.shape[0] != theta.shape[1]:
      raise ValueError(f"theta must be a square (N, N) Gram matrix, got shape {theta.shape}.")
    if not np.all(np.isfinite(theta)):
      raise ValueError("theta has non-finite entries; recompute the kernel (float32 overflow?).")
    n = theta.shape[0]
    task_of_row = np.asarray(self.task_of_row)
    split_of_row = np.asarray(self.split_of_row).astype(str)
    labels = np.asarray(self.labels)
    for name, arr in (("task_of_row", task_of_row), ("split_of_row", split_of_row)):
      if arr.shape != (n,):
        raise ValueError(
          f"{name} has shape {arr.shape}; expected ({n},) to match theta {theta.shape}."
        )
    if labels.shape != (n,):
      raise ValueError(
        f"labels has shape {labels.shape}; expected ({n},) to match theta {theta.shape}."
      )
    if not (
      np.issubdtype(task_of_row.dtype, np.integer) and np.issubdtype(labels.dtype, np.integer)
    ):
      raise ValueError("task_of_row and labels must be integer arrays.")
    bad_split = sorted(set(split_of_row.tolist()) - set(_SPLITS))
    if bad_split:
      raise ValueError(f"split_of_row has values {bad_split}; use 'tr' or 'te' for every row.")
    ranges = tuple((int(k), int(s)) for k, s in self.class_ranges)
    if not ranges or any(k < 0 or s < 1 for k, s in ranges):
      raise ValueError(f"class_ranges must be non-empty (k_t >= 0, s_t >= 1) pairs, got {ranges}.")
    num_tasks = len(ranges)
    if n == 0:
      raise ValueError("theta is empty; a measurement needs probe rows.")
    if task_of_row.min() < 0 or task_of_row.max() >= num_tasks:
      raise ValueError(f"task_of_row must lie in [0, {num_tasks}) (one class range per task).")
    for t, (k, s) in enumerate(ranges):
      lab = labels[task_of_row == t]
      if lab.size == 0:
        raise ValueError(f"task {t} has no rows; every task in class_ranges needs probes.")
      if lab.min() < k or lab.max() >= k + s:
        raise ValueError(
          f"task {t} labels span [{lab.min()}, {lab.max()}] outside its class range "
          f"[{k}, {k + s}); labels must be global class indices."
        )
    object.__setattr__(self, "theta", 0.5 * (theta + theta.T))
    object.__setattr__(self, "task_of_row", task_of_row.astype(np.int64))
    object.__setattr__(self, "split_of_row", split_of_row)
    object.__setattr__(self, "labels", labels.astype(np.int64))
    object.__setattr__(self, "class_ranges", ranges)

  @classmethod
  def from_task_probes(
    cls,
    theta: np.ndarray,
    train_labels: Sequence[np.ndarray],
    test_labels: Sequence[np.ndarray],
    class_ranges: Sequence[tuple[int, int]],
  ) -> BlockKernel:
    """Builds the layout for rows ordered [X_0^tr, X_0^te, X_1^tr, X_1^te, ...] (task-major).

    Args:
      theta: (N, N) Gram with N = sum_t (n_t^tr + n_t^te), rows in the order above.
      train_labels, test_labels: T arrays of global labels, (n_t^tr,) and (n_t^te,).
      class_ranges: T pairs (k_t, s_t).
    """
    if len(train_labels) != len(test_labels):
      raise ValueError(f"{len(train_labels)} train label arrays but {len(test_labels)} test ones.")
    task, split, labels = [], [], []
    for t, (y_tr, y_te) in enumerate(zip(train_labels, test_labels)):
      for name, y in (("tr", np.asarray(y_tr)), ("te", np.asarray(y_te))):
        task.append(np.full(y.shape[0], t))
        split.append(np.full(y.shape[0], name))
        labels.append(y)
    return cls(
      theta,
      np.concatenate(task),
      np.concatenate(split),
      np.concatenate(labels),
      tuple(class_ranges),
    )

  @property
  def num_tasks(self) -> int:
    return len(self.class_ranges)

  @property
  def num_classes(self) -> int:
    """C = max_t (k_t + s_t): width of the target / prediction vectors."""
    return max(k + s for k, s in self.class_ranges)

  def classes_seen(self, t: int) -> int:
    """Number of leading classes seen after task t: max_{u <= t} (k_u + s_u)."""
    return max(k + s for k, s in self.class_ranges[: t + 1])

  def rows(self, task: int, split: Split = "all") -> np.ndarray:
    """Row indices of task `task` in `split` ("tr", "te" or "all"), in theta order."""
    mask = self.task_of_row == task
    if split != "all":
      if split not in _SPLITS:
        raise ValueError(f"split must be 'tr', 'te' or 'all', got {split!r}.")
      mask &= self.split_of_row == split
    return np.flatnonzero(mask)

  def block(self, i: int, j: int, split_i: Split = "tr", split_j: Split = "tr") -> np.ndarray:
    """Theta(X_i^{split_i}, X_j^{split_j}): (n_i, n_j) block."""
    return self.theta[np.ix_(self.rows(i, split_i), self.rows(j, split_j))]

  def blocks(self, split: Split = "all") -> list[list[np.ndarray]]:
    """T x T nested list of blocks Theta_ij over `split` rows, for `block_ratio_rho` and friends."""
    return [
      [self.block(i, j, split, split) for j in range(self.num_tasks)] for i in range(self.num_tasks)
    ]

  def task_labels(self, task: int, split: Split) -> np.ndarray:
    return self.labels[self.rows(task, split)]

  def with_theta(self, theta: np.ndarray) -> BlockKernel:
    """Same layout, another measurement (e.g. per-task kernels or dynamics points)."""
    return BlockKernel(theta, self.task_of_row, self.split_of_row, self.labels, self.class_ranges)

  def same_layout(self, other: BlockKernel) -> bool:
    return (
      self.theta.shape == other.theta.shape
      and np.array_equal(self.task_of_row, other.task_of_row)
      and np.array_equal(self.split_of_row, other.split_of_row)
      and np.array_equal(self.labels, other.labels)
      and self.class_ranges == other.class_ranges
    )

  def first_train_rows(self, n: int) -> BlockKernel:
    """Keeps the first n train rows of every task (theta order) and all test rows (SPEC 7.6)."""
    keep = np.zeros(self.theta.shape[0], dtype=bool)
    for t in range(self.num_tasks):
      tr = self.rows(t, "tr")
      if n < 1 or n > tr.size:
        raise ValueError(f"cannot keep {n} train rows of task {t}: it has {tr.size}.")
      keep[tr[:n]] = True
      keep[self.rows(t, "te")] = True
    idx = np.flatnonzero(keep)
    return BlockKernel(
      self.theta[np.ix_(idx, idx)],
      self.task_of_row[idx],
      self.split_of_row[idx],
      self.labels[idx],
      self.class_ranges,
    )


def tripled_block_kernel(theta_3n: np.ndarray, base: BlockKernel) -> BlockKernel:
  """The "tripled" variant (SPEC 7.6, this project's reading of [ABS] claim 4): N -> 3N rows.

  Args:
    theta_3n: (3N, 3N) Gram over the stacked rows [c(x_1..x_N); p(x_1..x_N); m(x_1..x_N)], i.e. row
      v * N + r is view v in (c, p, m) of base row r (all three views projected with the same S).
    base: the N-row layout of the samples.
  Returns:
    A 3N-row `BlockKernel` whose rows are reordered sample-major (row 3 r + v is view v of base row
    r), each with base row r's task, split and label. Every train and test sample thus counts three
    times (n_s -> 3 n_s, n_te -> 3 n_te), and `first_train_rows(3 n)` keeps all views of the first n
    samples, so pass sizes 3 n to `sample_size_sweep` on a tripled kernel.
  """
  n = base.theta.shape[0]
  theta_3n = np.asarray(theta_3n, dtype=np.float64)
  if theta_3n.shape != (3 * n, 3 * n):
    raise ValueError(f"theta_3n has shape {theta_3n.shape}; expected {(3 * n, 3 * n)} for N = {n}.")
  order = (np.arange(3)[None, :] * n + np.arange(n)[:, None]).reshape(-1)  # sample-major
  rep = np.repeat
  return BlockKernel(
    theta_3n[np.ix_(order, order)],
    rep(base.task_of_row, 3),
    rep(base.split_of_row, 3),
    rep(base.labels, 3),
    base.class_ranges,
  )
