"""Intra- and inter-task kernel blocks: ρ_ij, q_ij, intra retention (SPEC 7.4) [PROJ]."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from analysis.cl_kernels.layout import BlockKernel, Split


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
