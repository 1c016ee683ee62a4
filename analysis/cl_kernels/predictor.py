"""The kernel-regime sequential predictor of forgetting, and its correlation with the run
(SPEC 7.5) [PROJ].
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

from analysis.cl_kernels.layout import _SPLITS, BlockKernel

Mode = Literal["fixed", "per_task"]
MetricsFn = Callable[[np.ndarray, np.ndarray], Mapping[str, float]]

LAMBDA_REL_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # SPEC 7.5 / 7.6 regularisation sweep


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


def _checked_kernels(
  kernel: BlockKernel | Sequence[BlockKernel], mode: Mode, lambda_rel: float
) -> tuple[BlockKernel, ...]:
  """The predictor's kernels (1 for fixed, T for per_task); ValueError for unusable inputs."""
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
  return kernels


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
  kernels = _checked_kernels(kernel, mode, lambda_rel)
  layout = kernels[0]
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
