"""`ntkcl_jax.closed_form` and `analytic_heads.RidgeHead` against direct NumPy closed forms."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ntkcl_jax import analytic_heads, closed_form


def _data(n=60, d=5, k=4, seed=0):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((n, d)), rng.integers(0, k, n)


def _onehot(y, k):
  return np.eye(k)[y]


@pytest.mark.parametrize("lam", [1e-3, 1.0, 30.0])
def test_ridge_solution_is_the_normal_equations_solution(lam):
  h, y = _data()
  G, C = closed_form.statistics(h, y, 4)
  np.testing.assert_allclose(G, h.T @ h, rtol=1e-12)
  np.testing.assert_allclose(C, h.T @ _onehot(y, 4), rtol=1e-12)
  expected = np.linalg.inv(h.T @ h + lam * np.eye(5)) @ h.T @ _onehot(y, 4)
  np.testing.assert_allclose(closed_form.ridge_solve(G, C, lam), expected, rtol=1e-8, atol=1e-10)
  solver = closed_form.RidgeSolver.make(G, C)
  np.testing.assert_allclose(solver.solve(lam), expected, rtol=1e-7, atol=1e-9)
  # W minimises ‖hW − Y‖² + λ‖W‖²: its gradient vanishes
  W = closed_form.ridge_solve(G, C, lam)
  grad = h.T @ (h @ W - _onehot(y, 4)) + lam * W
  np.testing.assert_allclose(grad, 0, atol=1e-9)


def test_statistics_accumulated_over_tasks_equal_one_batch():
  h, y = _data(n=90)
  G, C = np.zeros((5, 5)), np.zeros((5, 4))
  for chunk in np.array_split(np.arange(90), 3):
    G, C = closed_form.accumulate(G, C, h[chunk], y[chunk])
  G1, C1 = closed_form.statistics(h, y, 4)
  np.testing.assert_allclose(G, G1, rtol=1e-12)
  np.testing.assert_allclose(C, C1, rtol=1e-12)


def test_projection_is_relu_of_a_fixed_gaussian_map():
  f, _ = _data(d=3)
  w = closed_form.random_projection(7, 3, 11)
  assert w.shape == (3, 11) and np.array_equal(w, closed_form.random_projection(7, 3, 11))
  np.testing.assert_allclose(closed_form.project(f, w), np.maximum(f @ w.astype(np.float64), 0))
  assert np.array_equal(closed_form.project(f, None), f)


def test_lambda_selection_maximises_held_out_accuracy():
  """select_lambda's choice equals a direct search: same split, W from prev + fit statistics."""
  h, y = _data(n=80, d=6, k=4, seed=1)
  h_prev, y_prev = _data(n=40, d=6, k=4, seed=2)
  G0, C0 = closed_form.statistics(h_prev, y_prev, 4)
  lambdas = (1e-2, 1.0, 1e2, 1e4)
  lam, accs = closed_form.select_lambda(G0, C0, h, y, 4, lambdas, val_fraction=0.25, seed=3)
  perm = np.random.default_rng(3).permutation(80)
  val, fit = perm[:20], perm[20:]
  direct = []
  for lam_i in lambdas:
    G = h_prev.T @ h_prev + h[fit].T @ h[fit]
    C = h_prev.T @ _onehot(y_prev, 4) + h[fit].T @ _onehot(y[fit], 4)
    W = np.linalg.solve(G + lam_i * np.eye(6), C)
    direct.append(float(((h[val] @ W).argmax(1) == y[val]).mean()))
  np.testing.assert_allclose(accs, direct)
  assert accs[lambdas.index(lam)] == max(direct)


def test_ridge_head_over_tasks_equals_one_batch_solve():
  """RidgeHead.end_of_task task by task: (G, C) = one computation on all tasks' projected
  features, and W = (G + λI)⁻¹C with the λ it reports."""
  config = ml_collections.ConfigDict(
    {"seed": 0, "ridge": {"projection_dim": 16, "val_fraction": 0.2}}
  )
  head = analytic_heads.RidgeHead(config, feature_dim=5, num_classes=6)
  state = head.init_state()
  feats, labels = [], []
  for t in range(3):
    f, y = _data(n=50, d=5, k=2, seed=10 + t)
    y = y + 2 * t
    stats, W, info = head.end_of_task(state, f.astype(np.float32), y, 2 * t + 2, t)
    state = {k: jnp.asarray(v) for k, v in stats.items()}
    feats.append(f.astype(np.float32))
    labels.append(y)
  h = np.maximum(np.concatenate(feats).astype(np.float64) @ head.w_rp.astype(np.float64), 0)
  Y = _onehot(np.concatenate(labels), 6)
  np.testing.assert_allclose(np.asarray(state["ridge_G"]), h.T @ h, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(state["ridge_C"]), h.T @ Y, rtol=1e-5)
  expected = np.linalg.solve(h.T @ h + info["ridge_lambda"] * np.eye(16), h.T @ Y)
  np.testing.assert_allclose(W, expected, rtol=2e-3, atol=2e-4)
  assert info["ridge_lambda"] in closed_form.DEFAULT_LAMBDAS
