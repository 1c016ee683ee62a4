"""Tests for analysis/cl_kernels/ (SPEC 7.4-7.7): exactness against a model linear in its parameters."""

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from analysis import cl_kernels as ck
from analysis.cl_kernels.predictor import _cl_metrics, _step_acc

NUM_TASKS, CLASSES_PER_TASK, N_TR, N_TE, WIDTH = 3, 2, 8, 6, 40
RANGES = [(CLASSES_PER_TASK * t, CLASSES_PER_TASK) for t in range(NUM_TASKS)]
NUM_CLASSES = NUM_TASKS * CLASSES_PER_TASK


def _probe_labels(rng):
  """Class-balanced (round-robin) labels per task, train and test."""
  tr = [k + np.arange(N_TR) % s for k, s in RANGES]
  te = [k + rng.permutation(np.arange(N_TE) % s) for k, s in RANGES]
  return tr, te


def _inputs(rng, tr, te, d_in=6):
  """Rows [X_0^tr, X_0^te, X_1^tr, ...]: class means plus noise, so that tasks are learnable."""
  means = rng.normal(size=(NUM_CLASSES, d_in))
  labels = np.concatenate([np.concatenate([a, b]) for a, b in zip(tr, te)])
  return means[labels] + 0.7 * rng.normal(size=(labels.size, d_in)), labels


def _features(rng, x, width=WIDTH):
  """Fixed random tanh layer phi(x) in R^P."""
  w = rng.normal(size=(x.shape[1], width)) / math.sqrt(x.shape[1])
  return np.tanh(x @ w + 0.3 * rng.normal(size=width))


def _setup(seed=0):
  rng = np.random.default_rng(seed)
  tr, te = _probe_labels(rng)
  x, labels = _inputs(rng, tr, te)
  phi = _features(rng, x)
  kernel = ck.BlockKernel.from_task_probes(phi @ phi.T, tr, te, RANGES)
  return rng, x, phi, labels, kernel


def _train_linear_model(phis, kernel, lambda_rel, centered=True):
  """Trains f(x) = sum_u phi_u(x)^T theta_u task by task in parameter space (closed-form ridge step).

  phis[u] is the feature map whose parameter block theta_u is trained at task u (one shared map for
  the fixed-kernel case). The step minimises ||Y_t - f(theta_{t-1} + delta, X_t)||^2 + lambda ||delta||^2:
  delta = Phi_t^T (Phi_t Phi_t^T + lambda I)^{-1} eps_t. Returns the measured f_t on all rows: (T, N, C).
  """
  y = ck.task_targets(kernel.labels, NUM_CLASSES, centered=centered)
  thetas = [np.zeros((p.shape[1], NUM_CLASSES)) for p in phis]
  outs = []
  for t in range(kernel.num_tasks):
    phi = phis[t % len(phis)]
    tr = kernel.rows(t, "tr")
    f_all = sum(p @ th for p, th in zip(phis, thetas))
    eps = y[tr] - f_all[tr]
    gram = phi[tr] @ phi[tr].T
    lam = lambda_rel * np.mean(np.diag(gram))
    thetas[t % len(phis)] = thetas[t % len(phis)] + phi[tr].T @ np.linalg.solve(
      gram + lam * np.eye(tr.size), eps
    )
    outs.append(sum(p @ th for p, th in zip(phis, thetas)))
  return np.stack(outs)


def _measured_accuracy(f, kernel):
  r = np.full((kernel.num_tasks,) * 2, np.nan)
  for t in range(kernel.num_tasks):
    for s in range(t + 1):
      te = kernel.rows(s, "te")
      pred = np.argmax(f[t][te, : kernel.classes_seen(t)], axis=1)
      r[t, s] = 100.0 * np.mean(pred == kernel.labels[te])
  return r


def _random_gram(rng, n, rank):
  j = rng.normal(size=(n, rank)) * rng.uniform(0.2, 3.0, size=rank)
  return j @ j.T


# ------------------------------------------------------------------------------------------------
# Exactness of the sequential predictor (SPEC 7.5)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("lambda_rel", [1e-3, 1e-1])
def test_predictor_equals_linear_model_trained_task_by_task(centered, lambda_rel):
  _, _, phi, _, kernel = _setup(0)
  res = ck.sequential_kernel_predictor(kernel, lambda_rel=lambda_rel, centered=centered)
  measured = _train_linear_model([phi], kernel, lambda_rel, centered)
  np.testing.assert_allclose(res.predictions, measured, atol=1e-5, rtol=0)
  # Forgetting measured from the actual functions.
  for t in range(NUM_TASKS):
    for s in range(t + 1):
      te = kernel.rows(s, "te")
      actual = np.sum((measured[t][te] - measured[s][te]) ** 2) / te.size
      assert res.forgetting[t, s] == pytest.approx(actual, abs=1e-5)
  assert (
    np.nanmin(res.forgetting[np.tril_indices(NUM_TASKS, -1)]) > 1e-3
  )  # the check is not vacuous
  r_measured = _measured_accuracy(measured, kernel)
  np.testing.assert_array_equal(res.accuracy, r_measured)
  assert np.isnan(res.accuracy[0, 1]) and np.isnan(res.forgetting[0, 2])
  assert res.accuracy[0, 0] > 60.0  # a learnable toy problem, so R-hat is informative
  assert res.metrics == _cl_metrics(r_measured, np.full(NUM_TASKS, N_TE))


def test_drift_is_the_sum_of_cross_kernel_increments():
  _, _, _, _, kernel = _setup(1)
  res = ck.sequential_kernel_predictor(kernel, lambda_rel=1e-2)
  for s in range(NUM_TASKS):
    for t in range(s + 1, NUM_TASKS):
      direct = sum(kernel.block(s, u, "te", "tr") @ res.alphas[u] for u in range(s + 1, t + 1))
      np.testing.assert_allclose(res.drift(s, t), direct, atol=1e-10)
      assert res.forgetting[t, s] == pytest.approx(np.sum(direct**2) / N_TE, rel=1e-10)
  lam0 = 1e-2 * np.mean(np.diag(kernel.block(0, 0)))
  assert res.lambdas[0] == pytest.approx(lam0)


@pytest.mark.parametrize("lambda_rel, prox", [(1e-9, False), (1e-1, True)])
def test_gradient_descent_from_previous_parameters_converges_to_predictor(lambda_rel, prox):
  """Full-batch GD from theta_{t-1} on ||Y - f||^2/2 (+ lambda/2 ||theta - theta_{t-1}||^2 if prox).

  Without the proximal term GD stays in the row space of Phi_t and converges to the min-norm
  interpolant, i.e. the predictor at lambda -> 0; with it, to the ridge step at that lambda.
  """
  _, _, phi, _, kernel = _setup(2)
  res = ck.sequential_kernel_predictor(kernel, lambda_rel=lambda_rel)
  y = res.targets
  theta = np.zeros((WIDTH, NUM_CLASSES))
  for t in range(NUM_TASKS):
    tr = kernel.rows(t, "tr")
    p = phi[tr]
    lam = res.lambdas[t] if prox else 0.0
    eig = np.linalg.eigvalsh(p @ p.T)
    assert eig[0] > 1e-3 * eig[-1]  # n_tr < P and well-conditioned: GD converges quickly
    lr = 1.0 / (eig[-1] + lam)
    steps = int(np.ceil(np.log(1e-9) / np.log1p(-lr * (eig[0] + lam))))
    assert steps < 50_000
    start = theta.copy()
    for _ in range(steps):
      theta = theta - lr * (p.T @ (p @ theta - y[tr]) + lam * (theta - start))
    np.testing.assert_allclose(phi @ theta, res.predictions[t], atol=1e-4)


def test_per_task_mode_equals_model_with_one_feature_map_per_task():
  """f(x) = sum_u phi_u(x)^T theta_u with only theta_u trained at task u: step u's NTK is Phi_u Phi_u^T."""
  rng, x, _, _, kernel = _setup(3)
  phis = [_features(rng, x) for _ in range(NUM_TASKS)]
  kernels = [kernel.with_theta(p @ p.T) for p in phis]
  res = ck.sequential_kernel_predictor(kernels, lambda_rel=1e-2, mode="per_task")
  measured = _train_linear_model(phis, kernel, 1e-2)
  np.testing.assert_allclose(res.predictions, measured, atol=1e-5)
  np.testing.assert_array_equal(res.accuracy, _measured_accuracy(measured, kernel))
  fixed = ck.sequential_kernel_predictor(kernels[0], lambda_rel=1e-2)
  assert np.max(np.abs(fixed.predictions - res.predictions)) > 1e-2  # the Grams do matter


def test_per_task_mode_with_identical_grams_equals_fixed_mode():
  _, _, _, _, kernel = _setup(4)
  fixed = ck.sequential_kernel_predictor(kernel, lambda_rel=1e-2)
  per_task = ck.sequential_kernel_predictor([kernel] * NUM_TASKS, lambda_rel=1e-2, mode="per_task")
  np.testing.assert_allclose(per_task.predictions, fixed.predictions, atol=1e-12)
  np.testing.assert_array_equal(per_task.accuracy, fixed.accuracy)
  np.testing.assert_allclose(
    ck.gap_terms(per_task).interplay_bound, ck.gap_terms(fixed).interplay_bound, atol=1e-12
  )


def test_predictor_rejects_bad_arguments():
  _, _, _, _, kernel = _setup(5)
  with pytest.raises(ValueError, match="one BlockKernel per task"):
    ck.sequential_kernel_predictor([kernel, kernel], mode="per_task")
  with pytest.raises(ValueError, match="mode='per_task'"):
    ck.sequential_kernel_predictor([kernel] * NUM_TASKS)
  other = ck.BlockKernel(
    kernel.theta, kernel.task_of_row, kernel.split_of_row, kernel.labels[::-1] * 0, [(0, 6)] * 3
  )
  with pytest.raises(ValueError, match="share one row layout"):
    ck.sequential_kernel_predictor([kernel, kernel, other], mode="per_task")
  with pytest.raises(ValueError, match="not positive definite"):
    ck.sequential_kernel_predictor(kernel.with_theta(np.zeros_like(kernel.theta)), lambda_rel=0.0)
  with pytest.raises(ValueError, match="outside its class range"):
    ck.BlockKernel(kernel.theta, kernel.task_of_row, kernel.split_of_row, kernel.labels + 2, RANGES)
  with pytest.raises(ValueError, match="expected"):
    ck.BlockKernel(
      kernel.theta[:-1, :-1], kernel.task_of_row, kernel.split_of_row, kernel.labels, RANGES
    )


def test_block_diagonal_kernel_has_no_forgetting_and_zero_rho():
  rng, x, _, _, kernel = _setup(6)
  phi = np.zeros((x.shape[0], NUM_TASKS * 10))
  for t in range(NUM_TASKS):  # disjoint feature coordinates per task: Theta_ij = 0 for i != j
    rows = kernel.rows(t, "all")
    phi[rows, 10 * t : 10 * (t + 1)] = _features(rng, x[rows], 10)
  block_diag = kernel.with_theta(phi @ phi.T)
  res = ck.sequential_kernel_predictor(block_diag, lambda_rel=1e-2)
  lower = np.tril_indices(NUM_TASKS, -1)
  assert np.all(res.forgetting[lower] == 0.0)
  assert np.all(ck.gap_terms(res).interplay_bound[lower] == 0.0)
  rho = ck.block_ratio_rho(block_diag.blocks("all"))
  np.testing.assert_array_equal(rho, np.eye(NUM_TASKS))
  # The same features with shared coordinates do forget.
  assert np.min(ck.sequential_kernel_predictor(kernel).forgetting[lower]) > 0


# ------------------------------------------------------------------------------------------------
# SPEC 7.4 block ratios
# ------------------------------------------------------------------------------------------------
def test_rho_is_in_unit_interval_on_random_grams():
  for seed in range(10):
    rng = np.random.default_rng(seed)
    _, _, _, _, kernel = _setup(seed)
    gram = kernel.with_theta(
      _random_gram(rng, kernel.theta.shape[0], rank=int(rng.integers(2, 50)))
    )
    rho = ck.block_ratio_rho(gram.blocks("all"))
    np.testing.assert_allclose(np.diag(rho), 1.0, atol=1e-12)
    np.testing.assert_allclose(rho, rho.T, atol=1e-12)
    assert np.all(rho >= 0) and np.all(rho <= 1 + 1e-12)
    assert np.max(rho - np.eye(NUM_TASKS)) > 0.05


def _hand_example():
  theta = np.array([[1, 0.5, 0.2, 0.1], [0.5, 1, 0.1, 0.3], [0.2, 0.1, 1, 0.4], [0.1, 0.3, 0.4, 1]])
  d = np.diag([1.0, 2.0, 3.0, 4.0])  # rescaling rows leaves the cosine kernel (and q) unchanged
  return ck.BlockKernel(
    d @ theta @ d, [0, 0, 1, 1], ["tr"] * 4, [0, 1, 2, 3], [(0, 2), (2, 2)]
  ), theta


def test_rho_and_q_hand_computed():
  scaled, theta = _hand_example()
  blocks = [[theta[:2, :2], theta[:2, 2:]], [theta[2:, :2], theta[2:, 2:]]]
  rho = ck.block_ratio_rho(blocks)
  assert rho[0, 1] == pytest.approx(math.sqrt(0.15) / (2.5 * 2.32) ** 0.25, rel=1e-12)
  for q in (ck.normalized_ratio_q(blocks), ck.normalized_ratio_q(scaled.blocks("tr"))):
    # mean |cos_01| = (0.2+0.1+0.1+0.3)/4 = 0.175; o_00 = 0.5, o_11 = 0.4.
    np.testing.assert_allclose(q, [[1, 0.175 / 0.45], [0.175 / 0.45, 1]], rtol=1e-12)


def test_mean_inter_ratio_and_retention():
  rho = np.array([[1, 0.2, 0.4], [0.2, 1, 0.9], [0.4, 0.9, 1]])
  assert math.isnan(ck.mean_inter_ratio(rho, 0))
  assert ck.mean_inter_ratio(rho, 1) == pytest.approx(0.2)
  assert ck.mean_inter_ratio(rho, 2) == pytest.approx(0.5)
  a = np.array([[2.0, 1.0], [1.0, 2.0]])
  assert ck.intra_retention(3 * a, a) == pytest.approx(3.0)
  _, _, _, _, kernel = _setup(7)
  ret = ck.intra_retention_matrix([kernel, kernel.with_theta(2 * kernel.theta), kernel])
  np.testing.assert_allclose(np.diag(ret), 1.0)
  assert ret[1, 0] == pytest.approx(2.0) and ret[2, 1] == pytest.approx(0.5)
  assert np.isnan(ret[0, 1])


# ------------------------------------------------------------------------------------------------
# SPEC 7.5 metrics and correlation
# ------------------------------------------------------------------------------------------------
def test_cl_metrics_hand_computed():
  r = np.array([[80.0, np.nan, np.nan], [90, 70, np.nan], [60, 65, 50]])  # R[1, 0] > R[0, 0]
  m = _cl_metrics(r, np.array([10, 10, 20]))
  a = [80.0, 80.0, (60 * 10 + 65 * 10 + 50 * 20) / 40]
  assert m["avg_acc"] == pytest.approx(np.mean(a))
  assert m["last_acc"] == pytest.approx(a[-1])
  assert m["forgetting"] == pytest.approx(((90 - 60) + (70 - 65)) / 2)  # max over l in {0, 1}
  assert m["bwt"] == pytest.approx(((60 - 80) + (65 - 70)) / 2)
  one = _cl_metrics(r[:1, :1], np.array([10]))
  assert one["bwt"] == 0.0 and one["forgetting"] == 0.0 and one["last_acc"] == 80.0


def test_correlate_uses_lower_triangle_only():
  rng = np.random.default_rng(0)
  pred = np.tril(rng.uniform(size=(4, 4))) + np.triu(np.full((4, 4), 1e6), 1)
  meas = np.full((4, 4), -5.0)  # upper-triangle garbage that must be ignored
  meas[np.tril_indices(4)] = np.exp(3 * pred[np.tril_indices(4)])
  c = ck.correlate(pred, meas)
  assert c.n == 10 and c.spearman == pytest.approx(1.0)
  i, j = np.tril_indices(4)
  assert c.pearson == pytest.approx(np.corrcoef(pred[i, j], meas[i, j])[0, 1])
  assert c.pearson < 0.999
  strict = ck.correlate(pred, -meas, include_diagonal=False)
  assert strict.n == 6 and strict.spearman == pytest.approx(-1.0)
  assert math.isnan(ck.correlate(np.ones((3, 3)), meas[:3, :3]).pearson)


# ------------------------------------------------------------------------------------------------
# SPEC 7.6 gap terms and sweeps
# ------------------------------------------------------------------------------------------------
def test_task_specific_and_fit_residual_hand_computed():
  # One task, train rows with Theta = diag(2, 4), one test row.
  kernel = ck.BlockKernel(
    np.diag([2.0, 4.0, 1.0]), [0, 0, 0], ["tr", "tr", "te"], [0, 1, 0], [(0, 2)]
  )
  res = ck.sequential_kernel_predictor(kernel, lambda_rel=0.5)
  gaps = ck.gap_terms(res)
  lam = 0.5 * 3.0  # y rows are (+-0.5, -+0.5): ||Y_i||^2 = 0.5
  tr_term = 0.5 / (2 + lam) + 0.5 / (4 + lam)
  assert gaps.task_specific[0] == pytest.approx((2 / 2) * math.sqrt(tr_term * 6.0), rel=1e-12)
  e_fit = (lam**2 * 0.5 / (2 + lam) ** 2 + lam**2 * 0.5 / (4 + lam) ** 2) / 2
  assert gaps.fit_residual[0] == pytest.approx(e_fit, rel=1e-12)
  assert gaps.train_mse[0] == pytest.approx(e_fit, rel=1e-12)  # s = 0: fresh fit
  assert gaps.test_mse[0] == pytest.approx(0.5)  # Theta(te, tr) = 0: f = 0 on the test row
  assert gaps.empirical_gap[0] == pytest.approx(0.5 - e_fit)


def test_interplay_hand_computed():
  # Rows [tr0, te0, tr1, te1]; only Theta(te0, tr1) = 1 couples the tasks (PSD: 1 * 3 >= 1).
  theta = np.array([[2.0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 3, 0], [0, 0, 0, 1]])
  kernel = ck.BlockKernel.from_task_probes(theta, [[0], [1]], [[0], [1]], [(0, 1), (1, 1)])
  res = ck.sequential_kernel_predictor(kernel, lambda_rel=0.1)
  gaps = ck.gap_terms(res)
  lam1 = 0.3
  expected = math.sqrt(0.5) / (3 + lam1)  # Delta = Y_1 / (3 + lambda_1), ||Y_1|| = sqrt(0.5)
  assert gaps.interplay[1, 0] == pytest.approx(expected, rel=1e-12)
  assert gaps.interplay_bound[1, 0] == pytest.approx(expected, rel=1e-12)  # tight for 1x1 blocks
  assert res.forgetting[1, 0] == pytest.approx(expected**2, rel=1e-12)
  assert gaps.interplay[1, 1] == 0.0 and np.isnan(gaps.interplay[0, 1])


def test_interplay_bound_holds_on_random_grams():
  slack = []
  for seed in range(25):
    rng = np.random.default_rng(100 + seed)
    _, _, _, _, kernel = _setup(seed)
    gram = kernel.with_theta(
      _random_gram(rng, kernel.theta.shape[0], rank=int(rng.integers(3, 60)))
    )
    lambda_rel = float(rng.choice(ck.LAMBDA_REL_GRID))
    gaps = ck.gap_terms(
      ck.sequential_kernel_predictor(gram, lambda_rel=lambda_rel, centered=bool(seed % 2))
    )
    i, j = np.tril_indices(NUM_TASKS, -1)
    assert np.all(gaps.interplay[i, j] <= gaps.interplay_bound[i, j] * (1 + 1e-10))
    slack.append(np.min(gaps.interplay_bound[i, j] / gaps.interplay[i, j]))
  assert min(slack) >= 1 - 1e-10 and max(slack) > 1.01  # the bound is not trivially equal


def test_lambda_sweep_fit_residual_rises_and_interplay_shrinks():
  _, _, _, _, kernel = _setup(8)
  points = ck.lambda_sweep(kernel)
  assert [p.value for p in points] == list(ck.LAMBDA_REL_GRID)
  e_fit = np.stack([p.gaps.fit_residual for p in points])  # (5, T)
  g = np.stack([p.gaps.task_specific for p in points])
  assert np.all(np.diff(e_fit, axis=0) > 0)
  assert np.all(np.diff(g, axis=0) < 0)
  interplay_last = [p.gaps.interplay[-1, 0] for p in points]
  assert interplay_last[-1] < interplay_last[0]


def test_sample_size_sweep_equals_manual_subsets():
  _, _, phi, _, kernel = _setup(9)
  points = ck.sample_size_sweep(kernel, sizes=(2, 4, 8), lambda_rel=1e-2)
  assert [p.value for p in points] == [2.0, 4.0, 8.0]
  tr, te = _probe_labels(np.random.default_rng(9))
  for n, point in zip((2, 4, 8), points):
    keep = np.concatenate(
      [np.concatenate([kernel.rows(t, "tr")[:n], kernel.rows(t, "te")]) for t in range(NUM_TASKS)]
    )
    manual = ck.BlockKernel.from_task_probes(
      phi[keep] @ phi[keep].T, [y[:n] for y in tr], te, RANGES
    )
    ref = ck.sequential_kernel_predictor(manual, lambda_rel=1e-2)
    np.testing.assert_allclose(point.result.predictions, ref.predictions, atol=1e-10)
    assert point.result.layout.rows(1, "tr").size == n
  np.testing.assert_allclose(
    points[-1].result.predictions, ck.sequential_kernel_predictor(kernel).predictions
  )
  with pytest.raises(ValueError, match="cannot keep 9 train rows"):
    kernel.first_train_rows(9)


def test_tripled_kernel_layout_and_duplicate_views_identity():
  rng, x, phi, _, kernel = _setup(10)
  views = [phi, _features(rng, x), _features(rng, x)]  # c, p, m
  stacked = np.concatenate(views)
  tripled = ck.tripled_block_kernel(stacked @ stacked.T, kernel)
  n = phi.shape[0]
  assert tripled.theta.shape == (3 * n, 3 * n)
  assert tripled.rows(0, "tr").size == 3 * N_TR and tripled.rows(2, "te").size == 3 * N_TE
  interleaved = np.stack(views, axis=1).reshape(3 * n, -1)  # row 3 r + v = view v of sample r
  np.testing.assert_allclose(tripled.theta, interleaved @ interleaved.T, atol=1e-12)
  np.testing.assert_array_equal(tripled.labels, np.repeat(kernel.labels, 3))
  np.testing.assert_array_equal(tripled.first_train_rows(6).rows(0, "tr"), np.arange(6))
  # Three identical views = each sample counted thrice = the base predictor at lambda_rel / 3.
  same = np.concatenate([phi] * 3)
  dup = ck.sequential_kernel_predictor(
    ck.tripled_block_kernel(same @ same.T, kernel), lambda_rel=3e-2
  )
  base = ck.sequential_kernel_predictor(kernel, lambda_rel=1e-2)
  np.testing.assert_allclose(dup.predictions[:, ::3], base.predictions, atol=1e-9)
  with pytest.raises(ValueError, match="expected"):
    ck.tripled_block_kernel(phi @ phi.T, kernel)


# ------------------------------------------------------------------------------------------------
# SPEC 7.7 overlap and dynamics
# ------------------------------------------------------------------------------------------------
def test_overlap_bounded_and_one_for_identical_tasks():
  for seed in range(5):
    _, _, _, _, kernel = _setup(seed)
    sig, frob = ck.task_overlap_matrix(kernel)
    assert np.all(sig <= 1 + 1e-9) and np.all(frob <= 1 + 1e-9) and np.all(frob >= 0)
    assert np.max(sig[~np.eye(NUM_TASKS, dtype=bool)]) < 1 - 1e-6
    np.testing.assert_allclose(np.diag(sig), 1.0, atol=1e-9)
  rng = np.random.default_rng(0)
  j = rng.normal(size=(5, 30))
  jj = np.concatenate([j, j])  # task 1 = task 0
  theta = jj @ jj.T
  ov = ck.task_overlap(theta[:5, :5], theta[:5, 5:], theta[5:, 5:])
  assert ov.sigma_max == pytest.approx(1.0, abs=1e-9)
  assert ov.normalized_frobenius == pytest.approx(1.0, abs=1e-9)


def test_overlap_singular_values_are_principal_angle_cosines():
  rng = np.random.default_rng(1)
  ji, jj = rng.normal(size=(4, 12)), rng.normal(size=(5, 12))
  ov = ck.task_overlap(ji @ ji.T, ji @ jj.T, jj @ jj.T, energy=1.0)
  assert (ov.rank_i, ov.rank_j) == (4, 5)
  cosines = np.sort(np.cos(scipy.linalg.subspace_angles(ji.T, jj.T)))[::-1]
  np.testing.assert_allclose(ov.singular_values, cosines, atol=1e-8)
  orth = ck.task_overlap(np.eye(3), np.zeros((3, 2)), np.eye(2))
  assert orth.sigma_max == 0.0


def test_dynamics_hand_formulas():
  n = 7
  s = ck.spectrum_stats(np.eye(n))
  assert s["effective_rank"] == pytest.approx(n) and s["condition_number"] == pytest.approx(1.0)
  d = ck.spectrum_stats(np.diag([1.0, 2.0, 4.0]))
  assert (d["lambda_max"], d["lambda_min"]) == pytest.approx((4.0, 1.0))
  assert d["condition_number"] == pytest.approx(4.0) and d["frobenius_norm"] == pytest.approx(
    math.sqrt(21)
  )
  assert d["effective_rank"] == pytest.approx(49 / 21)
  v = np.arange(1.0, 5.0)
  r1 = ck.spectrum_stats(np.outer(v, v))
  assert r1["effective_rank"] == pytest.approx(1.0) and r1["condition_number"] == math.inf
  assert ck.kernel_velocity(2 * np.eye(3), np.eye(3)) == pytest.approx(1.0)
  assert ck.kernel_velocity(2 * np.eye(3), np.eye(3), num_steps=4) == pytest.approx(0.25)
  rng = np.random.default_rng(0)
  a, b = _random_gram(rng, 6, 3), _random_gram(rng, 6, 3)
  assert abs(ck.kernel_distance(a, a)) < 1e-12 and abs(ck.kernel_distance(a, 5 * a)) < 1e-12
  assert ck.kernel_distance(a, b) == pytest.approx(
    1 - np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b)
  )
  assert ck.kernel_distance(np.diag([1.0, 0]), np.diag([0, 1.0])) == pytest.approx(1.0)
  labels = np.array([0, 1, 2, 0, 1, 2, 2])
  y = np.eye(3)[labels]
  assert ck.kernel_label_alignment(y @ y.T, labels) == pytest.approx(1.0)
  assert ck.kernel_label_alignment(y @ y.T + 7.0, y - 1 / 3) == pytest.approx(1.0)  # centring
  h = np.eye(n) - 1 / n
  yc = h @ y @ y.T @ h
  assert ck.kernel_label_alignment(np.eye(n), y) == pytest.approx(
    np.trace(yc) / (math.sqrt(n - 1) * np.linalg.norm(yc))
  )
  dyn = ck.kernel_dynamics(2 * a, previous=a, num_steps=2, targets=labels[:6])
  assert dyn["velocity"] == pytest.approx(1.0) and dyn["velocity_per_step"] == pytest.approx(0.5)
  assert abs(dyn["kernel_distance"]) < 1e-12 and "label_alignment" in dyn


def test_accuracy_argmax_is_restricted_to_classes_seen():
  """te0 is anti-correlated with task 0's train rows, so the unseen columns (2, 3) of f^(0) are the largest."""
  theta = np.zeros((6, 6))
  theta[:3, :3] = [
    [1, 0, -0.5],
    [0, 1, -0.5],
    [-0.5, -0.5, 1],
  ]  # rows tr0, tr0, te0 (PSD: eigenvalues >= 0)
  theta[3:, 3:] = np.eye(3)  # task 1: tr1, tr1, te1
  kernel = ck.BlockKernel.from_task_probes(theta, [[0, 1], [2, 3]], [[0], [2]], [(0, 2), (2, 2)])
  res = ck.sequential_kernel_predictor(kernel, lambda_rel=0.1)
  f0 = res.predictions[0][kernel.rows(0, "te")][0]
  assert np.argmax(f0) in (2, 3) and f0[0] == pytest.approx(f0[1])
  assert res.accuracy[0, 0] == 100.0  # argmax over columns {0, 1}; the tie resolves to class 0
  assert res.accuracy[1, 0] == 0.0  # after task 1, columns 2 and 3 count


def test_predictor_needs_test_rows():
  kernel = ck.BlockKernel(np.eye(3), [0, 0, 0], ["tr"] * 3, [0, 1, 0], [(0, 2)])
  assert ck.block_ratio_rho(kernel.blocks("tr"))[0, 0] == 1.0  # fine for the block ratios
  with pytest.raises(ValueError, match="no 'te' rows"):
    ck.sequential_kernel_predictor(kernel)


def test_metrics_fn_is_swappable_and_local_helpers_match_ntkcl_jax_metrics():
  metrics = pytest.importorskip("ntkcl_jax.metrics")
  _, _, _, _, kernel = _setup(11)
  seen = {}

  def shared(r, n_test):
    seen["n_test"] = n_test
    return metrics.final_metrics(r, _step_acc(r, n_test))

  res = ck.sequential_kernel_predictor(kernel, lambda_rel=1e-3, metrics_fn=shared)
  np.testing.assert_array_equal(seen["n_test"], [N_TE] * NUM_TASKS)
  local = _cl_metrics(res.accuracy, seen["n_test"])
  for key in ("avg_acc", "last_acc", "forgetting", "bwt"):
    assert res.metrics[key] == pytest.approx(local[key], abs=1e-12)
