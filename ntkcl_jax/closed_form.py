"""Closed-form classifier pieces (pure NumPy, float64): RanPAC-style projection, ridge statistics.

The ridge head (RanPAC, McDonnell et al. NeurIPS 2023; and `eval.head=ridge` on NTK-CL features):

  h = φ(f W_rp)                      random projection d → M, φ = ReLU (M = 0: h = f, no projection)
  G = Σ_i h_i h_iᵀ   (M, M)          second-order statistics, summed over every task seen so far
  C = Σ_i h_i y_iᵀ   (M, K)          y_i one-hot over all K classes of the benchmark
  W = (G + λ I)⁻¹ C  (M, K)          logits h W, argmax over the classes seen so far

G and C are sums, so accumulating them task by task equals one computation on all the data
(`accumulate`); nothing of an old task is stored but these sums (rehearsal-free). λ is chosen per
task on held-out training data of the current task (`select_lambda`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# λ grid (absolute; G is a sum over samples, so its scale grows with n and ‖h‖²).
DEFAULT_LAMBDAS = tuple(10.0**k for k in range(-4, 9))


def random_projection(seed: int, in_dim: int, out_dim: int) -> np.ndarray:
  """W_rp (in_dim, out_dim), i.i.d. N(0, 1), fixed for the whole run (a pure function of seed)."""
  return np.random.default_rng(seed).standard_normal((in_dim, out_dim)).astype(np.float32)


def project(features: np.ndarray, w_rp: np.ndarray | None) -> np.ndarray:
  """h = ReLU(f W_rp) (n, M) in float64, or f itself when `w_rp` is None."""
  f = np.asarray(features, np.float64)
  return f if w_rp is None else np.maximum(f @ np.asarray(w_rp, np.float64), 0.0)


def statistics(
  h: np.ndarray, labels: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
  """(G, C) = (hᵀh (M, M), hᵀY (M, K)) of one set of projected features, float64."""
  h = np.asarray(h, np.float64)
  y = np.zeros((h.shape[0], num_classes), np.float64)
  y[np.arange(h.shape[0]), np.asarray(labels)] = 1.0
  return h.T @ h, h.T @ y


def accumulate(
  G: np.ndarray, C: np.ndarray, h: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """(G + hᵀh, C + hᵀY): the running sums after one more task (float64)."""
  dG, dC = statistics(h, labels, C.shape[1])
  return np.asarray(G, np.float64) + dG, np.asarray(C, np.float64) + dC


@dataclasses.dataclass(frozen=True)
class RidgeSolver:
  """W(λ) = (G + λI)⁻¹ C for many λ from one eigendecomposition G = Q diag(e) Qᵀ."""

  q: np.ndarray
  e: np.ndarray
  qtc: np.ndarray

  @classmethod
  def make(cls, G: np.ndarray, C: np.ndarray) -> RidgeSolver:
    G = np.asarray(G, np.float64)
    e, q = np.linalg.eigh(0.5 * (G + G.T))
    return cls(q=q, e=np.maximum(e, 0.0), qtc=q.T @ np.asarray(C, np.float64))

  def solve(self, lam: float) -> np.ndarray:
    return self.q @ (self.qtc / (self.e + lam)[:, None])


def ridge_solve(G: np.ndarray, C: np.ndarray, lam: float) -> np.ndarray:
  """W = (G + λI)⁻¹ C (M, K), float64."""
  G = np.asarray(G, np.float64)
  return np.linalg.solve(G + lam * np.eye(G.shape[0]), np.asarray(C, np.float64))


def select_lambda(
  G_prev: np.ndarray,
  C_prev: np.ndarray,
  h: np.ndarray,
  labels: np.ndarray,
  num_seen: int,
  lambdas: tuple[float, ...] = DEFAULT_LAMBDAS,
  val_fraction: float = 0.2,
  seed: int = 0,
) -> tuple[float, list[float]]:
  """λ for the current task, chosen on held-out training data of that task (RanPAC).

  The current task's projected features `h` (labels global) are split at random (`seed`) into
  (1 − val_fraction) fit / val_fraction validation; for each λ, W is solved from G_prev + fit
  statistics and scored on the validation rows by top-1 over the classes < num_seen, ties broken
  by the smaller validation squared error, then by the larger λ.

  Returns:
    (λ, validation accuracy per λ in grid order).
  """
  n = h.shape[0]
  perm = np.random.default_rng(seed).permutation(n)
  n_val = max(1, int(round(val_fraction * n)))
  val, fit = perm[:n_val], perm[n_val:]
  G, C = accumulate(G_prev, C_prev, h[fit], labels[fit])
  solver = RidgeSolver.make(G, C)
  hv = np.asarray(h[val], np.float64)
  yv = np.zeros((n_val, C.shape[1]))
  yv[np.arange(n_val), labels[val]] = 1.0
  scores = []
  for lam in lambdas:
    logits = hv @ solver.solve(lam)
    acc = float((logits[:, :num_seen].argmax(1) == labels[val]).mean())
    mse = float(((logits - yv) ** 2).mean())
    scores.append((acc, -mse, lam))
  best = max(scores)
  return float(best[2]), [s[0] for s in scores]
