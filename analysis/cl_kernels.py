"""Continual-learning kernel algebra on empirical-NTK block matrices (SPEC 7.3-7.8) [PROJ].

Everything in this module is this project's formulation ([PROJ]) on standard NTK continual-learning
theory: the kernel (lazy) regime, kernel ridge regression and Rademacher-style bounds. The paper's own
equations, theorems and bound constants are unknown ([UNK], SPEC 9); nothing here claims to be them.

Input is one measurement: a Gram matrix `theta` of shape (N, N) over the concatenation of every
task's probe rows (train probes X_i^tr and test probes X_i^te, seen and unseen tasks alike), held in a
`BlockKernel` together with the row layout (task, split, global label) and the task class ranges
[k_t, k_t + s_t). `theta` is the scalar kernel of `analysis.ntk.empirical_ntk_fn` with the default
`trace_axes=(-1,)`, i.e. averaged (not summed) over outputs; for a model whose outputs share one
scalar kernel (a per-output-independent linear head) the full kernel is exactly theta (x) I_C;
for other models the predictor treats the output-averaged kernel as that shared kernel [PROJ].

Numerics (SPEC 7.8): float64 on the host; every Gram is symmetrised on entry; ridge systems are
solved by Cholesky; eigenvalues are clipped at 0 wherever a spectrum is used (mu_min, lambda_min,
effective rank, overlap). Pure NumPy/SciPy: no JAX is imported here.

Example:
  >>> kernel = BlockKernel.from_task_probes(theta, train_labels, test_labels, [(0, 2), (2, 2)])
  >>> result = sequential_kernel_predictor(kernel, lambda_rel=1e-2)
  >>> result.accuracy           # (T, T) predicted R-hat[t, s] in %, NaN above the diagonal
  >>> gaps = gap_terms(result)  # task-interplay I, its bound I-bar, G_s, e_s, E_s
  >>> block_ratio_rho(kernel.blocks("all"))  # (T, T) inter/intra block ratio
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, NamedTuple

import numpy as np
import scipy.linalg
import scipy.stats

Split = Literal["tr", "te", "all"]
Mode = Literal["fixed", "per_task"]
MetricsFn = Callable[[np.ndarray, np.ndarray], Mapping[str, float]]

LAMBDA_REL_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # SPEC 7.5 / 7.6 regularisation sweep
SAMPLE_SIZES = (16, 32, 64)  # SPEC 7.6 nested sample-size sweep (train rows per task)
_SPLITS = ("tr", "te")


# ----------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# SPEC 7.4: intra- and inter-task blocks
# ----------------------------------------------------------------------------------------------
def _check_blocks(theta_blocks: Sequence[Sequence[np.ndarray]]) -> list[list[np.ndarray]]:
  num_tasks = len(theta_blocks)
  blocks = [[np.asarray(b, dtype=np.float64) for b in row] for row in theta_blocks]
  if any(len(row) != num_tasks for row in blocks):
    raise ValueError(
      "theta_blocks must be a square T x T nested sequence (use BlockKernel.blocks)."
    )
  for i in range(num_tasks):
    for j in range(num_tasks):
      want = (blocks[i][i].shape[0], blocks[j][j].shape[0])
      if blocks[i][j].shape != want:
        raise ValueError(f"block ({i}, {j}) has shape {blocks[i][j].shape}, expected {want}.")
  return blocks


def block_ratio_rho(theta_blocks: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
  """rho_ij = ||Theta_ij||_F / sqrt(||Theta_ii||_F ||Theta_jj||_F) (SPEC 7.4) [PROJ].

  Args:
    theta_blocks: T x T nested blocks, Theta_ij of shape (n_i, n_j) (`BlockKernel.blocks`).
  Returns:
    (T, T) symmetric; rho_ii = 1 and rho_ij in [0, 1] for a Gram matrix (Cauchy-Schwarz on
    tr(A^T A B^T B)). Zero inter-task blocks give 0; an all-zero diagonal block gives NaN.
  """
  blocks = _check_blocks(theta_blocks)
  norms = np.array([[np.linalg.norm(b) for b in row] for row in blocks])
  diag = np.diag(norms)
  with np.errstate(invalid="ignore", divide="ignore"):
    return norms / np.sqrt(diag[:, None] * diag[None, :])


def normalized_ratio_q(theta_blocks: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
  """q_ij = mean|Theta~_ij| / (1/2 (o_ii + o_jj)) (SPEC 7.4) [PROJ].

  Theta~(x, x') = Theta(x, x') / sqrt(Theta(x, x) Theta(x', x')) (cosine kernel); o_ii is the mean of
  |Theta~_ii| over its off-diagonal entries. For i == j the same off-diagonal mean is used in the
  numerator, so q_ii = 1.

  Args:
    theta_blocks: T x T nested blocks (`BlockKernel.blocks`); each diagonal block needs >= 2 rows.
  Returns:
    (T, T) symmetric, q_ii = 1; q_ij is small when inter-task cosines are small next to intra-task ones.
  """
  blocks = _check_blocks(theta_blocks)
  num_tasks = len(blocks)
  diags = [np.diag(blocks[i][i]) for i in range(num_tasks)]
  for i, d in enumerate(diags):
    if d.size < 2:
      raise ValueError(f"task {i} has {d.size} row(s); q needs >= 2 rows per task.")
    if np.any(d <= 0):
      raise ValueError(
        f"task {i} has a probe with Theta(x, x) <= 0; its cosine kernel is undefined."
      )
  inv = [1.0 / np.sqrt(d) for d in diags]
  cos = [
    [np.abs(blocks[i][j]) * inv[i][:, None] * inv[j][None, :] for j in range(num_tasks)]
    for i in range(num_tasks)
  ]
  off = np.array([cos[i][i][~np.eye(diags[i].size, dtype=bool)].mean() for i in range(num_tasks)])
  q = np.ones((num_tasks, num_tasks))
  for i in range(num_tasks):
    for j in range(num_tasks):
      if i != j:
        q[i, j] = cos[i][j].mean() / (0.5 * (off[i] + off[j]))
  return q


def mean_inter_ratio(rho: np.ndarray, t: int) -> float:
  """rho-bar(t) = mean_{i < j <= t} rho_ij (SPEC 7.4); NaN for t = 0 (no pair yet)."""
  rho = np.asarray(rho, dtype=np.float64)
  if t >= rho.shape[0]:
    raise ValueError(f"t = {t} but rho covers {rho.shape[0]} tasks.")
  i, j = np.triu_indices(t + 1, k=1)
  return float(rho[i, j].mean()) if i.size else math.nan


def intra_retention(theta_now: np.ndarray, theta_at_i: np.ndarray) -> float:
  """||Theta_ii^(t)||_F / ||Theta_ii^(i)||_F (SPEC 7.4): task i's intra block now vs at its end.

  Args:
    theta_now: (n_i, n_i) block Theta_ii measured at task_end(t).
    theta_at_i: (n_i, n_i) block Theta_ii measured at task_end(i).
  """
  theta_now, theta_at_i = np.asarray(theta_now), np.asarray(theta_at_i)
  if theta_now.shape != theta_at_i.shape:
    raise ValueError(f"blocks differ in shape: {theta_now.shape} vs {theta_at_i.shape}.")
  return float(np.linalg.norm(theta_now) / np.linalg.norm(theta_at_i))


def intra_retention_matrix(
  kernels_at_task_end: Sequence[BlockKernel], split: Split = "all"
) -> np.ndarray:
  """(T, T) retention[t, i] = intra_retention(Theta_ii at task_end(t), at task_end(i)), i <= t.

  Entries above the diagonal are NaN; the diagonal is 1.
  """
  num_tasks = len(kernels_at_task_end)
  out = np.full((num_tasks, num_tasks), np.nan)
  for t in range(num_tasks):
    for i in range(t + 1):
      now = kernels_at_task_end[t].block(i, i, split, split)
      out[t, i] = intra_retention(now, kernels_at_task_end[i].block(i, i, split, split))
  return out


# ----------------------------------------------------------------------------------------------
# SPEC 7.5: kernel-regime sequential predictor
# ----------------------------------------------------------------------------------------------
def task_targets(labels: np.ndarray, num_classes: int, *, centered: bool = True) -> np.ndarray:
  """Y = onehot(y, C) - 1/C (SPEC 7.5), or plain one-hot when centered=False. (n,) -> (n, C)."""
  y = np.eye(num_classes)[np.asarray(labels)]
  return y - 1.0 / num_classes if centered else y


def _ridge_solve(theta_tt: np.ndarray, lam: float, rhs: np.ndarray) -> np.ndarray:
  """(theta_tt + lam I)^{-1} rhs by Cholesky; raises with a fix if not positive definite."""
  a = theta_tt + lam * np.eye(theta_tt.shape[0])
  try:
    factor = scipy.linalg.cho_factor(a, lower=True, check_finite=False)
  except np.linalg.LinAlgError as err:
    raise ValueError(
      f"Theta_tt + lambda I is not positive definite (lambda = {lam:.3g}); use lambda_rel > 0 "
      "or check that theta is a PSD Gram matrix."
    ) from err
  return scipy.linalg.cho_solve(factor, rhs, check_finite=False)


def _accuracy(f_rows: np.ndarray, labels: np.ndarray, num_seen: int) -> float:
  """Top-1 in % of argmax over the first num_seen classes."""
  return float(100.0 * np.mean(np.argmax(f_rows[:, :num_seen], axis=1) == labels))


def _step_acc(r: np.ndarray, n_test: np.ndarray) -> np.ndarray:
  """A_l: sample-weighted top-1 over the union of test sets 0..l (SPEC 3). (T,)."""
  return np.array(
    [np.dot(r[l, : l + 1], n_test[: l + 1]) / n_test[: l + 1].sum() for l in range(len(r))]
  )


def _avg_acc(r: np.ndarray, n_test: np.ndarray) -> float:
  """A-bar = (1/T) sum_l A_l (SPEC 3)."""
  return float(_step_acc(r, n_test).mean())


def _last_acc(r: np.ndarray, n_test: np.ndarray) -> float:
  """A_T = A_{T-1} (SPEC 3)."""
  return float(_step_acc(r, n_test)[-1])


def _forgetting(r: np.ndarray) -> float:
  """F = (1/(T-1)) sum_{i <= T-2} [max_{l in i..T-2} R[l, i] - R[T-1, i]] (SPEC 3); 0.0 if T = 1."""
  num_tasks = len(r)
  if num_tasks < 2:
    return 0.0
  drops = [r[i : num_tasks - 1, i].max() - r[-1, i] for i in range(num_tasks - 1)]
  return float(np.mean(drops))


def _bwt(r: np.ndarray) -> float:
  """BWT = (1/(T-1)) sum_{i <= T-2} (R[T-1, i] - R[i, i]) (SPEC 3); 0.0 if T = 1."""
  num_tasks = len(r)
  if num_tasks < 2:
    return 0.0
  return float(np.mean([r[-1, i] - r[i, i] for i in range(num_tasks - 1)]))


def _cl_metrics(r: np.ndarray, n_test: np.ndarray) -> dict[str, float]:
  """Local stand-in for ntkcl_jax.metrics (swap via `metrics_fn`): A-bar, A_T, F, BWT.

  Same keys and T = 1 convention (F = BWT = 0.0) as `ntkcl_jax.metrics.final_metrics`, which takes
  (R, A) with A = `_step_acc(R, n_test)`.
  """
  return {
    "avg_acc": _avg_acc(r, n_test),
    "last_acc": _last_acc(r, n_test),
    "forgetting": _forgetting(r),
    "bwt": _bwt(r),
  }


@dataclasses.dataclass(frozen=True, eq=False)
class PredictorResult:
  """Output of `sequential_kernel_predictor` (T tasks, N rows, C classes).

  Attributes:
    mode: "fixed" or "per_task". kernels: the Gram(s) used (1 for fixed, T for per_task).
    lambda_rel, centered: the settings. lambdas: (T,) ridge lambda_t = lambda_rel mean diag(Theta_tt).
    targets: (N, C) targets Y of every row (train and test), same encoding as the fit.
    predictions: (T, N, C) f^(t) on every row of every task, t = 0..T-1.
    residuals: T arrays eps_t (n_t^tr, C). alphas: T arrays alpha_t (n_t^tr, C).
    forgetting: (T, T) F-hat[t, s] = ||Delta_s^(t)||_F^2 / n_s^te for s <= t (0 on the diagonal),
      NaN above it.
    accuracy: (T, T) R-hat[t, s] in % for s <= t, NaN above it.
    metrics: SPEC 3 metrics of R-hat (A-bar, A_T, F, BWT by default).
  """

  mode: str
  kernels: tuple[BlockKernel, ...]
  lambda_rel: float
  centered: bool
  lambdas: np.ndarray
  targets: np.ndarray
  predictions: np.ndarray
  residuals: tuple[np.ndarray, ...]
  alphas: tuple[np.ndarray, ...]
  forgetting: np.ndarray
  accuracy: np.ndarray
  metrics: Mapping[str, float]

  @property
  def layout(self) -> BlockKernel:
    return self.kernels[0]

  def gram(self, t: int) -> BlockKernel:
    """The measurement used at step t."""
    return self.kernels[t if self.mode == "per_task" else 0]

  def drift(self, s: int, t: int) -> np.ndarray:
    """Delta_s^(t) = sum_{u=s+1}^{t} Theta(X_s^te, X_u^tr) alpha_u = f^(t) - f^(s) on X_s^te. (n_s^te, C)."""
    rows = self.layout.rows(s, "te")
    return self.predictions[t][rows] - self.predictions[s][rows]


def sequential_kernel_predictor(
  kernel: BlockKernel | Sequence[BlockKernel],
  *,
  lambda_rel: float = 1e-2,
  centered: bool = True,
  mode: Mode = "fixed",
  metrics_fn: MetricsFn | None = None,
) -> PredictorResult:
  """Kernel-regime sequential predictor (SPEC 7.5) [PROJ].

  With f^(-1) = 0, for t = 0..T-1:
    eps_t   = Y_t - f^(t-1)(X_t^tr)                       (n_t^tr, C)
    alpha_t = (Theta_tt + lambda_t I)^{-1} eps_t           Cholesky solve; lambda_t = lambda_rel mean diag Theta_tt
    f^(t)(x) = f^(t-1)(x) + Theta(x, X_t^tr) alpha_t
  This is exactly the sequence of functions of a model linear in its parameters (its NTK fixed)
  where task t's update is the min-norm ridge step from theta_{t-1}, i.e. gradient flow on
  ||Y_t - f||^2 / 2 + lambda/2 ||theta - theta_{t-1}||^2 started at theta_{t-1}.

  Predicted forgetting of task s after t > s: drift Delta_s^(t) = sum_{u=s+1}^{t} Theta(X_s^te, X_u^tr)
  alpha_u and F-hat_s^(t) = ||Delta_s^(t)||_F^2 / n_s^te (0 when the inter-task blocks vanish).
  R-hat[t, s] = top-1 in % of argmax over the classes seen at t (columns 0..k_t+s_t-1) of
  f^(t)(X_s^te).

  Args:
    kernel: a `BlockKernel` (mode="fixed": one measurement, default `init`, for every step), or T
      of them with one layout (mode="per_task": step t uses the measurement at the start of task t,
      both for Theta_tt and for Theta(x, X_t^tr)).
    lambda_rel: relative ridge, >= 0 (grid `LAMBDA_REL_GRID`).
    centered: targets onehot(y, C) - 1/C (default) or plain one-hot; C = kernel.num_classes.
    mode: "fixed" or "per_task".
    metrics_fn: (R-hat (T, T), n_te (T,)) -> dict of SPEC 3 metrics; defaults to the local
      `_cl_metrics` (point it at ntkcl_jax.metrics to share one implementation).
  Returns:
    `PredictorResult`.
  """
  if mode == "fixed":
    if not isinstance(kernel, BlockKernel):
      raise ValueError("mode='fixed' takes one BlockKernel; pass mode='per_task' for a sequence.")
    kernels = (kernel,)
  elif mode == "per_task":
    kernels = (kernel,) if isinstance(kernel, BlockKernel) else tuple(kernel)
    if len(kernels) != kernels[0].num_tasks:
      raise ValueError(
        f"mode='per_task' needs one BlockKernel per task ({kernels[0].num_tasks}), got {len(kernels)}."
      )
    if not all(kernels[0].same_layout(k) for k in kernels[1:]):
      raise ValueError(
        "per-task kernels must share one row layout (tasks, splits, labels, class ranges)."
      )
  else:
    raise ValueError(f"mode must be 'fixed' or 'per_task', got {mode!r}.")
  if not lambda_rel >= 0:
    raise ValueError(f"lambda_rel must be >= 0, got {lambda_rel}.")

  layout = kernels[0]
  for t in range(layout.num_tasks):
    for split in _SPLITS:
      if layout.rows(t, split).size == 0:
        raise ValueError(
          f"task {t} has no '{split}' rows; the predictor needs train and test probes."
        )
  num_tasks, num_rows, num_classes = layout.num_tasks, layout.theta.shape[0], layout.num_classes
  targets = task_targets(layout.labels, num_classes, centered=centered)
  f = np.zeros((num_rows, num_classes))
  predictions = np.zeros((num_tasks, num_rows, num_classes))
  lambdas, residuals, alphas = np.zeros(num_tasks), [], []
  for t in range(num_tasks):
    theta = kernels[t if mode == "per_task" else 0].theta
    tr = layout.rows(t, "tr")
    theta_tt = theta[np.ix_(tr, tr)]
    lambdas[t] = lambda_rel * float(np.mean(np.diag(theta_tt)))
    eps = targets[tr] - f[tr]
    alpha = _ridge_solve(theta_tt, lambdas[t], eps)
    f = f + theta[:, tr] @ alpha
    predictions[t] = f
    residuals.append(eps)
    alphas.append(alpha)

  forgetting = np.full((num_tasks, num_tasks), np.nan)
  accuracy = np.full((num_tasks, num_tasks), np.nan)
  n_test = np.array([layout.rows(s, "te").size for s in range(num_tasks)])
  for t in range(num_tasks):
    for s in range(t + 1):
      te = layout.rows(s, "te")
      drift = predictions[t][te] - predictions[s][te]
      forgetting[t, s] = np.sum(drift**2) / te.size
      accuracy[t, s] = _accuracy(predictions[t][te], layout.labels[te], layout.classes_seen(t))
  metrics = dict((metrics_fn or _cl_metrics)(accuracy, n_test))
  return PredictorResult(
    mode=mode,
    kernels=kernels,
    lambda_rel=float(lambda_rel),
    centered=centered,
    lambdas=lambdas,
    targets=targets,
    predictions=predictions,
    residuals=tuple(residuals),
    alphas=tuple(alphas),
    forgetting=forgetting,
    accuracy=accuracy,
    metrics=metrics,
  )


class Correlation(NamedTuple):
  pearson: float
  pearson_p: float
  spearman: float
  spearman_p: float
  n: int


def correlate(
  predicted: np.ndarray, measured: np.ndarray, *, include_diagonal: bool = True
) -> Correlation:
  """Pearson and Spearman (scipy.stats) of two (T, T) matrices on their lower triangles (SPEC 7.5).

  Uses entries [t, s] with s <= t (s < t if include_diagonal=False, e.g. for forgetting, whose
  diagonal is 0 by definition); pairs with a non-finite value are dropped. Fewer than 3 pairs or a
  constant side give NaN coefficients.
  """
  predicted, measured = np.asarray(predicted, np.float64), np.asarray(measured, np.float64)
  if (
    predicted.shape != measured.shape
    or predicted.ndim != 2
    or predicted.shape[0] != predicted.shape[1]
  ):
    raise ValueError(
      f"need two (T, T) matrices of one shape, got {predicted.shape} and {measured.shape}."
    )
  i, j = np.tril_indices(predicted.shape[0], k=0 if include_diagonal else -1)
  a, b = predicted[i, j], measured[i, j]
  ok = np.isfinite(a) & np.isfinite(b)
  a, b = a[ok], b[ok]
  if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
    return Correlation(math.nan, math.nan, math.nan, math.nan, int(a.size))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", scipy.stats.ConstantInputWarning)
    pr = scipy.stats.pearsonr(a, b)
    sr = scipy.stats.spearmanr(a, b)
  return Correlation(float(pr[0]), float(pr[1]), float(sr[0]), float(sr[1]), int(a.size))


# ----------------------------------------------------------------------------------------------
# SPEC 7.6: gap terms and factor sweeps
# ----------------------------------------------------------------------------------------------
def _eigvalsh_clipped(theta: np.ndarray) -> np.ndarray:
  """Ascending eigenvalues of the symmetrised matrix, clipped at 0 (SPEC 7.8)."""
  return np.clip(np.linalg.eigvalsh(0.5 * (theta + theta.T)), 0.0, None)


@dataclasses.dataclass(frozen=True, eq=False)
class GapTerms:
  """SPEC 7.6 gap terms [PROJ] of one predictor run (T tasks).

  Attributes:
    interplay: (T, T) I[t, s] = ||Delta_s^(t)||_F / sqrt(n_s^te) for s <= t (0 on the diagonal).
    interplay_bound: (T, T) I-bar[t, s] >= I[t, s] (see `gap_terms`).
    task_specific: (T,) G_s.  fit_residual: (T,) E_s.
    train_mse, test_mse: (T,) ||f^(s) - Y||_F^2 / n on X_s^tr and X_s^te.
    empirical_gap: (T,) e_s = test_mse - train_mse.
  """

  interplay: np.ndarray
  interplay_bound: np.ndarray
  task_specific: np.ndarray
  fit_residual: np.ndarray
  train_mse: np.ndarray
  test_mse: np.ndarray
  empirical_gap: np.ndarray


def gap_terms(result: PredictorResult) -> GapTerms:
  """Task-interplay and task-specific gap terms (SPEC 7.6) [PROJ]; not the paper's theorems [UNK].

  - I_s^(t) = ||Delta_s^(t)||_F / sqrt(n_s^te) (= sqrt(F-hat_s^(t))).
  - I-bar_s^(t) = (1/sqrt(n_s^te)) sum_{u=s+1}^{t} ||Theta(X_s^te, X_u^tr)||_2 ||eps_u||_F /
    (mu_min(Theta_uu) + lambda_u), with mu_min clipped at 0; I <= I-bar by the triangle inequality
    and ||(Theta_uu + lambda_u I)^{-1}||_2 = 1/(mu_min + lambda_u). Grows with inter-task kernel mass.
  - G_s = (2/n_s) sqrt(tr(Y_s^T (Theta_ss + lambda_s I)^{-1} Y_s) tr Theta_ss) on X_s^tr, a kernel
    ridge Rademacher-style complexity term; Y_s are the plain targets of task s, not eps_s.
  - E_s = ||lambda_s (Theta_ss + lambda_s I)^{-1} Y_s||_F^2 / n_s, the train residual of a fresh
    ridge fit of Y_s (rises with lambda). For s = 0 it equals the train MSE of f^(0).
  - e_s = test - train probe MSE of f^(s) on task s, MSE = ||f - Y||_F^2 / n (summed over classes).
  In per_task mode, step u's quantities use step u's Gram.
  """
  layout, num_tasks = result.layout, result.layout.num_tasks
  interplay = np.sqrt(result.forgetting)
  bound = np.full((num_tasks, num_tasks), np.nan)
  # Per step u: ||eps_u||_F / (mu_min(Theta_uu) + lambda_u).
  step_gain = np.zeros(num_tasks)
  g, e_fit, mse_tr, mse_te = (np.zeros(num_tasks) for _ in range(4))
  for u in range(num_tasks):
    theta = result.gram(u).theta
    tr = layout.rows(u, "tr")
    theta_uu = theta[np.ix_(tr, tr)]
    lam, n_u = result.lambdas[u], tr.size
    step_gain[u] = np.linalg.norm(result.residuals[u]) / (_eigvalsh_clipped(theta_uu)[0] + lam)
    y_u = result.targets[tr]
    sol = _ridge_solve(theta_uu, lam, y_u)
    g[u] = (2.0 / n_u) * math.sqrt(max(float(np.sum(y_u * sol)), 0.0) * float(np.trace(theta_uu)))
    e_fit[u] = np.sum((lam * sol) ** 2) / n_u
    te = layout.rows(u, "te")
    mse_tr[u] = np.sum((result.predictions[u][tr] - y_u) ** 2) / n_u
    mse_te[u] = np.sum((result.predictions[u][te] - result.targets[te]) ** 2) / te.size
  for s in range(num_tasks):
    te = layout.rows(s, "te")
    bound[s, s] = 0.0
    total = 0.0
    for t in range(s + 1, num_tasks):
      cross = result.gram(t).theta[np.ix_(te, layout.rows(t, "tr"))]
      total += np.linalg.norm(cross, 2) * step_gain[t]
      bound[t, s] = total / math.sqrt(te.size)
  return GapTerms(interplay, bound, g, e_fit, mse_tr, mse_te, mse_te - mse_tr)


@dataclasses.dataclass(frozen=True, eq=False)
class SweepPoint:
  """One point of a factor sweep: the swept value, the predictor run and its gap terms."""

  value: float
  result: PredictorResult
  gaps: GapTerms


def lambda_sweep(
  kernel: BlockKernel | Sequence[BlockKernel],
  lambda_rels: Sequence[float] = LAMBDA_REL_GRID,
  **predictor_kwargs,
) -> list[SweepPoint]:
  """Regularisation factor (SPEC 7.6): the predictor and gap terms at each lambda_rel.

  `predictor_kwargs` go to `sequential_kernel_predictor` (centered, mode, metrics_fn).
  """
  points = []
  for lam in lambda_rels:
    res = sequential_kernel_predictor(kernel, lambda_rel=lam, **predictor_kwargs)
    points.append(SweepPoint(float(lam), res, gap_terms(res)))
  return points


def sample_size_sweep(
  kernel: BlockKernel | Sequence[BlockKernel],
  sizes: Sequence[int] = SAMPLE_SIZES,
  **predictor_kwargs,
) -> list[SweepPoint]:
  """Sample-size factor (SPEC 7.6): nested subsets, the first n train rows of every task.

  Test rows are kept whole. Nesting follows theta's row order, so the caller orders each task's
  train probes class-balanced (round-robin over classes) for every prefix to stay balanced. For a
  `tripled_block_kernel`, pass 3 n to keep all views of the first n samples.
  """
  points = []
  for n in sizes:
    if isinstance(kernel, BlockKernel):
      sub: BlockKernel | list[BlockKernel] = kernel.first_train_rows(n)
    else:
      sub = [k.first_train_rows(n) for k in kernel]
    res = sequential_kernel_predictor(sub, **predictor_kwargs)
    points.append(SweepPoint(float(n), res, gap_terms(res)))
  return points


# ----------------------------------------------------------------------------------------------
# SPEC 7.7: task overlap and kernel dynamics
# ----------------------------------------------------------------------------------------------
def _top_eigenpairs(theta_ii: np.ndarray, energy: float) -> tuple[np.ndarray, np.ndarray]:
  """Top r eigenpairs (descending) of a PSD block covering `energy` of its (clipped) trace."""
  w, u = np.linalg.eigh(0.5 * (theta_ii + theta_ii.T))
  w, u = np.clip(w[::-1], 0.0, None), u[:, ::-1]
  if w[0] <= 0:
    raise ValueError("a diagonal block has zero trace; its task subspace is empty.")
  cum = np.cumsum(w)
  r = int(np.searchsorted(cum, energy * cum[-1], side="left")) + 1
  num_positive = int(np.sum(w > w[0] * w.size * np.finfo(np.float64).eps))
  r = max(1, min(r, num_positive))
  return w[:r], u[:, :r]


class Overlap(NamedTuple):
  sigma_max: float
  normalized_frobenius: float  # ||O_ij||_F^2 / min(r_i, r_j)
  rank_i: int
  rank_j: int
  singular_values: np.ndarray


def task_overlap(
  theta_ii: np.ndarray, theta_ij: np.ndarray, theta_jj: np.ndarray, *, energy: float = 0.99
) -> Overlap:
  """NTK overlap O_ij (SPEC 7.7; after Doan et al. 2021, normalisation [PROJ]).

  Theta_ii = U_i Lambda_i U_i^T keeping the top r_i pairs that cover `energy` of the trace (and
  only numerically positive eigenvalues), then O_ij = Lambda_i^{-1/2} U_i^T Theta_ij U_j
  Lambda_j^{-1/2}, (r_i, r_j). For Theta = J J^T its singular values are the cosines of the
  principal angles between the tasks' (top) tangent-feature subspaces, so sigma_max <= 1 and
  ||O||_F^2 / min(r_i, r_j) in [0, 1]; both are 1 for tasks spanning the same subspace.

  Args:
    theta_ii: (n_i, n_i), theta_ij: (n_i, n_j), theta_jj: (n_j, n_j) blocks of one Gram.
    energy: trace share kept, in (0, 1].
  """
  if not 0 < energy <= 1:
    raise ValueError(f"energy must be in (0, 1], got {energy}.")
  theta_ij = np.asarray(theta_ij, dtype=np.float64)
  if theta_ij.shape != (np.shape(theta_ii)[0], np.shape(theta_jj)[0]):
    raise ValueError(
      f"theta_ij {theta_ij.shape} does not match {np.shape(theta_ii)}, {np.shape(theta_jj)}."
    )
  wi, ui = _top_eigenpairs(np.asarray(theta_ii, np.float64), energy)
  wj, uj = _top_eigenpairs(np.asarray(theta_jj, np.float64), energy)
  o = (ui.T @ theta_ij @ uj) / np.sqrt(wi)[:, None] / np.sqrt(wj)[None, :]
  sv = np.linalg.svd(o, compute_uv=False)
  return Overlap(float(sv[0]), float(np.sum(sv**2) / min(wi.size, wj.size)), wi.size, wj.size, sv)


def task_overlap_matrix(
  kernel: BlockKernel, *, split: Split = "tr", energy: float = 0.99
) -> tuple[np.ndarray, np.ndarray]:
  """(T, T) sigma_max and (T, T) ||O_ij||_F^2 / min(r_i, r_j) over all task pairs (SPEC 7.7)."""
  num_tasks = kernel.num_tasks
  sig, frob = np.zeros((num_tasks, num_tasks)), np.zeros((num_tasks, num_tasks))
  for i in range(num_tasks):
    for j in range(num_tasks):
      ov = task_overlap(
        kernel.block(i, i, split, split),
        kernel.block(i, j, split, split),
        kernel.block(j, j, split, split),
        energy=energy,
      )
      sig[i, j], frob[i, j] = ov.sigma_max, ov.normalized_frobenius
  return sig, frob


def spectrum_stats(theta: np.ndarray) -> dict[str, float]:
  """||Theta||_F, lambda_max, lambda_min, condition number, effective rank (SPEC 7.7).

  Eigenvalues are clipped at 0; the condition number lambda_max / lambda_min is inf when
  lambda_min = 0; effective rank = (tr Theta)^2 / ||Theta||_F^2 (from the clipped spectrum), which
  is n for the identity and 1 for a rank-one Gram.
  """
  theta = np.asarray(theta, dtype=np.float64)
  w = _eigvalsh_clipped(theta)
  lam_min, lam_max = float(w[0]), float(w[-1])
  sq = float(np.sum(w**2))
  return {
    "frobenius_norm": float(np.linalg.norm(theta)),
    "lambda_max": lam_max,
    "lambda_min": lam_min,
    "condition_number": lam_max / lam_min if lam_min > 0 else math.inf,
    "effective_rank": float(np.sum(w) ** 2 / sq) if sq > 0 else 0.0,
  }


def kernel_velocity(
  theta: np.ndarray, theta_prev: np.ndarray, *, num_steps: int | None = None
) -> float:
  """||Theta^(tau) - Theta^(tau')||_F / ||Theta^(tau')||_F (SPEC 7.7); divided by num_steps if given."""
  theta, theta_prev = np.asarray(theta, np.float64), np.asarray(theta_prev, np.float64)
  if theta.shape != theta_prev.shape:
    raise ValueError(f"kernels differ in shape: {theta.shape} vs {theta_prev.shape}.")
  v = float(np.linalg.norm(theta - theta_prev) / np.linalg.norm(theta_prev))
  if num_steps is not None:
    if num_steps < 1:
      raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    v /= num_steps
  return v


def kernel_distance(theta_a: np.ndarray, theta_b: np.ndarray) -> float:
  """1 - <Theta, Theta'>_F / (||Theta||_F ||Theta'||_F) (SPEC 7.7); 0 for equal or rescaled kernels."""
  a, b = np.asarray(theta_a, np.float64), np.asarray(theta_b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"kernels differ in shape: {a.shape} vs {b.shape}.")
  return float(1.0 - np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def kernel_label_alignment(
  theta: np.ndarray, targets: np.ndarray, num_classes: int | None = None
) -> float:
  """Centred kernel-label alignment <H Theta H, H Y Y^T H>_F / (||H Theta H||_F ||H Y Y^T H||_F).

  H = I - 1 1^T / n (SPEC 7.7).

  Args:
    theta: (n, n). targets: (n, C) target matrix Y, or (n,) int labels (one-hot over num_classes,
      default max label + 1; centring makes onehot and onehot - 1/C equivalent).
  """
  theta = np.asarray(theta, np.float64)
  y = np.asarray(targets)
  if y.ndim == 1:
    y = np.eye(num_classes or int(y.max()) + 1)[y]
  n = theta.shape[0]
  if theta.shape != (n, n) or y.shape[0] != n:
    raise ValueError(f"theta {theta.shape} and targets {np.shape(targets)} disagree on n.")
  h = np.eye(n) - 1.0 / n
  kc, yc = h @ theta @ h, h @ (y @ y.T) @ h
  return float(np.sum(kc * yc) / (np.linalg.norm(kc) * np.linalg.norm(yc)))


def kernel_dynamics(
  theta: np.ndarray,
  *,
  previous: np.ndarray | None = None,
  num_steps: int | None = None,
  targets: np.ndarray | None = None,
) -> dict[str, float]:
  """All SPEC 7.7 dynamics scalars of one measurement (a flat dict for one `ntk.jsonl` line).

  `spectrum_stats(theta)`, plus velocity (raw and per step) and kernel distance against
  `previous`, plus the centred kernel-label alignment when `targets` are given.
  """
  out = spectrum_stats(theta)
  if previous is not None:
    out["velocity"] = kernel_velocity(theta, previous)
    if num_steps is not None:
      out["velocity_per_step"] = kernel_velocity(theta, previous, num_steps=num_steps)
    out["kernel_distance"] = kernel_distance(theta, previous)
  if targets is not None:
    out["label_alignment"] = kernel_label_alignment(theta, targets)
  return out
