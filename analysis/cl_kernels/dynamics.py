"""Task overlap and kernel dynamics: spectra, velocity, distance, label alignment (SPEC 7.7)
[PROJ].
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from analysis.cl_kernels.layout import BlockKernel, Split, _eigvalsh_clipped


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
