"""SPEC 2.1: every loss term against a NumPy re-computation, for both quirk settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkcl_jax import losses


def _np_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_mi(m, y, mask, protos, plabels, tau):
  """Literal SPEC 2.1 L_MI; +inf when there is no positive pair (as released)."""
  z = _np_normalize(np.concatenate([m[mask], protos]).astype(np.float64))
  lab = np.concatenate([y[mask], plabels])
  s = z @ z.T / tau
  n = len(z)
  pos = [(i, j) for i in range(n) for j in range(n) if i != j and lab[i] == lab[j]]
  if not pos:
    return np.inf
  pos_term = -np.log(sum(np.exp(s[i, j]) for i, j in pos))
  neg = np.mean([np.log(sum(np.exp(s[i, j]) for j in range(n) if j != i)) for i in range(n)])
  return pos_term + neg


@pytest.fixture
def batch():
  rng = np.random.default_rng(0)
  m = rng.normal(size=(6, 8)).astype(np.float32)
  y = np.array([4, 5, 4, 6, 5, 0])
  mask = np.array([True, True, True, True, True, False])
  return m, y, mask


@pytest.mark.parametrize("n_old,m_max", [(0, 6), (3, 6), (5, 2)])
def test_mi_matches_numpy(batch, n_old, m_max):
  m, y, mask = batch
  protos = np.random.default_rng(1).normal(size=(7, 8)).astype(np.float32)
  rows, labels, valid = losses.select_mi_prototypes(
    jax.random.key(3), jnp.asarray(protos), n_old, m_max
  )
  labels, valid = np.asarray(labels), np.asarray(valid)
  assert valid.sum() == min(m_max, n_old)
  assert len(set(labels[valid])) == valid.sum() and np.all(labels[valid] < n_old)
  got, has_pos = losses.mi_loss(
    jnp.asarray(m), jnp.asarray(y), jnp.asarray(mask), rows, labels, valid, 0.1
  )
  want = np_mi(m, y, mask, protos[labels[valid]], labels[valid], 0.1)
  assert bool(has_pos)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_mi_without_positive_pairs_is_a_safe_zero():
  m = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
  y, mask = np.array([0, 1, 2]), np.ones(3, bool)
  assert np.isinf(np_mi(m, y, mask, np.zeros((0, 8)), np.zeros(0, int), 0.1))  # released: +inf
  none = jnp.zeros((0, 8)), jnp.zeros((0,), jnp.int32), jnp.zeros((0,), bool)

  def f(x):
    return losses.mi_loss(x, jnp.asarray(y), jnp.asarray(mask), *none, 0.1)[0]

  value, grad = jax.value_and_grad(f)(jnp.asarray(m))
  assert float(value) == 0.0
  assert bool(jnp.all(grad == 0.0))  # finite (no NaN from the log of an empty sum)
  assert not bool(losses.mi_loss(jnp.asarray(m), jnp.asarray(y), jnp.asarray(mask), *none, 0.1)[1])


def test_cross_entropy_masks_rows_and_padded_classes():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 5)).astype(np.float32)
  labels, mask = np.array([0, 2, 1, 4]), np.array([True, True, True, False])
  got = losses.masked_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask), 3)
  z = logits[:3, :3]
  want = np.mean(-(z[np.arange(3), labels[:3]] - np.log(np.exp(z).sum(1))))
  np.testing.assert_allclose(float(got), want, rtol=1e-6)


def _np_orth_signed(feats, mask, protos, k):
  w = _np_normalize(protos.astype(np.float64))
  u = np.linalg.svd(w.T, full_matrices=True)[0][:, :k]
  return sum(((x := _np_normalize(f[mask])) - x @ u @ u.T).sum() for f in feats)


@pytest.mark.parametrize("num_seen", [6, 50])  # below and above the 40-vector basis
def test_orth_signed_residual_sum_matches_numpy(num_seen):
  rng = np.random.default_rng(0)
  dim = 64
  protos = rng.normal(size=(num_seen, dim))
  protos[-2:] = 0.0  # current-task rows are still zero during training
  c, p = rng.normal(size=(2, 5, dim)).astype(np.float32)
  mask = np.array([True, True, False, True, True])
  basis = losses.orthogonality_basis(protos, 40)
  assert basis.shape == (dim, 40)
  got = losses.orth_loss(
    [jnp.asarray(c), jnp.asarray(p)], jnp.asarray(mask), basis, "signed_residual_sum"
  )
  np.testing.assert_allclose(
    float(got), _np_orth_signed([c, p], mask, protos, 40), rtol=1e-4, atol=1e-4
  )


def test_orth_old_subspace_projection_matches_numpy():
  rng = np.random.default_rng(1)
  dim, k_t = 32, 4
  protos = np.concatenate([rng.normal(size=(k_t, dim)), np.zeros((2, dim))])
  protos[3] = 2 * protos[2]  # rank 3 among the old rows
  c, p = rng.normal(size=(2, 5, dim)).astype(np.float32)
  mask = np.array([True, True, True, False, True])
  basis = losses.old_subspace_basis(protos, k_t, 40)
  assert basis.shape == (dim, 40) and np.count_nonzero(np.abs(basis).sum(0) > 0) == 3
  got = losses.orth_loss(
    [jnp.asarray(c), jnp.asarray(p)], jnp.asarray(mask), basis, "old_subspace_projection"
  )
  u = np.linalg.svd(_np_normalize(protos[:k_t]).T, full_matrices=False)[0][:, :3]
  want = sum(np.sum((_np_normalize(f[mask]) @ u @ u.T) ** 2) for f in (c, p)) / mask.sum()
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  zero = losses.old_subspace_basis(protos, 0, 40)
  assert (
    float(losses.orth_loss([jnp.asarray(c)], jnp.asarray(mask), zero, "old_subspace_projection"))
    == 0.0
  )


def test_reg_loss_selects_weight_tensors_only():
  rng = np.random.default_rng(0)
  shapes = {
    "peft": {
      "adapter_0": {
        "down": {"kernel": (4, 2), "bias": (2,)},
        "up": {"kernel": (2, 4), "bias": (4,)},
      },
      "prompt_0": {"mix": {"kernel": (5, 3), "bias": (3,)}, "norm": {"scale": (4,), "bias": (4,)}},
    },
    "fusion": {n: {"kernel": (4, 4), "bias": (4,)} for n in ("query", "key", "value")},
  }
  is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
  params = jax.tree_util.tree_map(lambda s: rng.normal(size=s), shapes, is_leaf=is_shape)
  snap = jax.tree_util.tree_map(lambda s: rng.normal(size=s), shapes, is_leaf=is_shape)
  selected = [
    ("peft", "adapter_0", "down", "kernel"),
    ("peft", "adapter_0", "up", "kernel"),
    ("peft", "prompt_0", "mix", "kernel"),
    ("peft", "prompt_0", "norm", "scale"),
  ] + [("fusion", n, "kernel") for n in ("query", "key", "value")]

  def get(t, path):
    for k in path:
      t = t[k]
    return t

  want = sum(np.sum((get(params, q) - get(snap, q)) ** 2) for q in selected)
  np.testing.assert_allclose(float(losses.reg_loss(params, snap)), want, rtol=1e-5)


@pytest.mark.parametrize("zero_nonfinite", [True, False])
def test_combine_weights_signs_and_q7(zero_nonfinite):
  terms = {"ce_c": 1.0, "ce_p": 2.0, "ce_m": 3.0, "mi": 10.0, "orth": 100.0, "reg": 1000.0}
  for mi_sign in (-1, 1):
    w = losses.LossWeights(
      mi=0.2, mi_sign=mi_sign, orth=1e-4, reg=1e-3, zero_nonfinite_aux=zero_nonfinite
    )
    got = float(losses.combine({k: jnp.float32(v) for k, v in terms.items()}, w))
    np.testing.assert_allclose(got, 6.0 + mi_sign * 2.0 + 0.01 + 1.0, rtol=1e-6)
  w = losses.LossWeights(zero_nonfinite_aux=zero_nonfinite)
  bad = {**{k: jnp.float32(v) for k, v in terms.items()}, "orth": jnp.float32(jnp.nan)}
  total = float(losses.combine(bad, w))
  assert np.isfinite(total) == zero_nonfinite


def test_mi_old_rows_q11():
  # Oxford Pets task 0: 7 classes seen, increment 5.
  assert losses.mi_old_rows(7, 0, 5, known_only=False) == 2
  assert losses.mi_old_rows(7, 0, 5, known_only=True) == 0
  assert losses.mi_old_rows(30, 20, 10, known_only=False) == 20
