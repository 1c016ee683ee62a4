"""Gap terms of the predictor and its factor sweeps over λ and sample size (SPEC 7.6) [PROJ]."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from analysis.cl_kernels.layout import BlockKernel, _eigvalsh_clipped
from analysis.cl_kernels.predictor import (
  LAMBDA_REL_GRID,
  PredictorResult,
  _ridge_solve,
  sequential_kernel_predictor,
)

SAMPLE_SIZES = (16, 32, 64)  # SPEC 7.6 nested sample-size sweep (train rows per task)


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
