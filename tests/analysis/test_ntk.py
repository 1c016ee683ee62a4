"""Tests of analysis.ntk (SPEC §7.2): implementations, layout conventions, blocking, sub-trees.

References are built independently of the code under test: per-example Jacobians from
`jax.vmap(jax.jacrev(...))`, flattened over parameters and contracted with `np.einsum` in float64.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from analysis import nt_compat
from analysis.ntk import empirical_ntk_fn, ntk_output_shape, restrict_to_subtree

RTOL = 1e-4
ATOL = 1e-5
NT_SKIP = pytest.mark.skipif(
  not nt_compat.available(),
  reason="neural-tangents 0.6.5 is not installed or JAX is outside analysis.nt_compat's range; "
  "install it with `pip install --no-deps neural-tangents==0.6.5` to compare backends.",
)


# ---------------------------------------------------------------------------------------------
# Models and references
# ---------------------------------------------------------------------------------------------


def mlp(params, x):
  """(N, 3) -> (N, 4): a 2-layer tanh MLP."""
  return jnp.tanh(x @ params["w1"] + params["b1"][None, :]) @ params["w2"]


def normal(rng, shape, scale=1.0):
  return (scale * rng.standard_normal(shape)).astype(np.float32)


def mlp_params(rng):
  return {
    "w1": normal(rng, (3, 6), 3**-0.5),
    "b1": normal(rng, (6,), 0.1),
    "w2": normal(rng, (6, 4), 6**-0.5),
  }


def tokens_model(params, x):
  """(N, P=2, D=3) -> (N, P, K=5): shared per-token MLP plus a token-mixing term."""
  h = jnp.tanh(x @ params["w1"])
  h = h + jnp.einsum("pq,nqd->npd", params["mix"], h)
  return h @ params["w2"]


def tokens_params(rng):
  return {
    "w1": normal(rng, (3, 4)),
    "mix": normal(rng, (2, 2), 0.5),
    "w2": normal(rng, (4, 5), 0.5),
  }


def nested_model(params, x):
  """(N, 3) -> (N, 4) with a nested parameter tree: frozen backbone, PEFT bank, head."""
  h = jnp.tanh(x @ params["backbone"]["w"])
  cur = params["peft"]["current"]
  h = h + jnp.tanh(h @ cur["down"]["kernel"] + cur["down"]["bias"][None, :]) @ cur["up"]["kernel"]
  h = h + 0.5 * (h @ params["peft"]["ema"]["kernel"])
  return h @ params["head"]["kernel"]


def nested_params(rng):
  return {
    "backbone": {"w": normal(rng, (3, 5), 3**-0.5)},
    "peft": {
      "current": {
        "down": {"kernel": normal(rng, (5, 2), 5**-0.5), "bias": normal(rng, (2,), 0.1)},
        "up": {"kernel": normal(rng, (2, 5), 2**-0.5)},
      },
      "ema": {"kernel": normal(rng, (5, 5), 5**-0.5)},
    },
    "head": {"kernel": normal(rng, (5, 4), 5**-0.5)},
  }


@functools.cache
def _per_example_jacobian(f):
  return jax.jit(jax.vmap(jax.jacrev(lambda p, xi: f(p, xi[None])[0]), in_axes=(None, 0)))


def jacobian_rows(f, params, x):
  """Per-example Jacobians (N, *out_example_shape, P) in float64, P = all parameter scalars."""
  jac = _per_example_jacobian(f)(params, x)
  out_ndim = jax.eval_shape(f, params, x).ndim
  rows = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(jac)]
  return np.concatenate([r.reshape((*r.shape[:out_ndim], -1)) for r in rows], axis=-1)


def reference_full(f, params, x1, x2):
  """Full kernel Θ[a, ..., b, ...] of shape f(x1).shape + f(x2).shape (no trace, no diagonal)."""
  j1, j2 = jacobian_rows(f, params, x1), jacobian_rows(f, params, x2)
  return np.tensordot(j1, j2, axes=([-1], [-1]))


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  return {
    "mlp_params": mlp_params(rng),
    "x1": normal(rng, (5, 3)),
    "x2": normal(rng, (6, 3)),
    "tok_params": tokens_params(rng),
    "t1": normal(rng, (3, 2, 3)),
    "t2": normal(rng, (4, 2, 3)),
    "t3": normal(rng, (3, 2, 3)),
    "nested_params": nested_params(rng),
  }


@functools.cache
def native(f, trace_axes=(-1,), diagonal_axes=(), vmap_axes=None, implementation=1, batch=None):
  """Shared ntk_fn objects, so tests with equal settings reuse one compilation."""
  return empirical_ntk_fn(f, trace_axes, diagonal_axes, vmap_axes, implementation, batch_size=batch)


# ---------------------------------------------------------------------------------------------
# Implementations 1 / 2, vmap_axes, x2=None
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", [1, 2])
@pytest.mark.parametrize("vmap_axes", [None, 0])
def test_full_kernel_matches_jacrev_reference(data, implementation, vmap_axes):
  p, x1, x2 = data["mlp_params"], data["x1"], data["x2"]
  expected = np.einsum("akbl->abkl", reference_full(mlp, p, x1, x2))  # (N1, N2, K, K)
  got = native(mlp, (), (), vmap_axes, implementation)(x1, x2, p)
  assert got.shape == (5, 6, 4, 4) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("implementation", [1, 2])
def test_default_trace_is_mean_over_logits(data, implementation):
  p, x1, x2 = data["mlp_params"], data["x1"], data["x2"]
  full = reference_full(mlp, p, x1, x2)
  expected = np.einsum("akbk->ab", full) / 4  # averaged over K = 4, not summed
  got = native(mlp, vmap_axes=0, implementation=implementation)(x1, x2, p)
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
  assert not np.allclose(got, 4 * expected, rtol=0.1)


@pytest.mark.parametrize("implementation", [1, 2])
def test_x2_none_equals_x1(data, implementation):
  p, x1 = data["mlp_params"], data["x1"]
  fn = native(mlp, vmap_axes=0, implementation=implementation)
  np.testing.assert_allclose(fn(x1, None, p), fn(x1, x1, p), rtol=RTOL, atol=ATOL)


def test_gram_matrix_is_symmetric_psd(data):
  p, x = data["mlp_params"], data["x1"]
  for implementation in (1, 2):
    k = np.asarray(native(mlp, vmap_axes=0, implementation=implementation)(x, None, p), np.float64)
    assert k.shape == (5, 5)
    assert np.max(np.abs(k - k.T)) <= 1e-5 * np.max(np.abs(k))
    eig = np.linalg.eigvalsh((k + k.T) / 2)
    assert eig.min() >= -1e-5 * eig.max(), eig


# ---------------------------------------------------------------------------------------------
# trace_axes / diagonal_axes layout on a 3-dim output (N, P, K)
# ---------------------------------------------------------------------------------------------

# (trace_axes, diagonal_axes, einsum on the full kernel [a p k b q l], divisor, same N for x1 and
# x2, implementation). The cases alternate between implementations 1 and 2.
LAYOUT_CASES = [
  ((-1,), (), "apkbqk->abpq", 5, False, 1),
  ((), (), "apkbql->abpqkl", 1, False, 2),
  ((), (0,), "apkaql->apqkl", 1, True, 1),
  ((-1,), (0,), "apkaqk->apq", 5, True, 2),
  ((1, 2), (), "apkbpk->ab", 10, False, 1),
  ((), (1,), "apkbpl->abpkl", 1, False, 2),
]
LAYOUT_NAMES = ("trace_axes", "diagonal_axes", "spec", "divisor", "same_n", "impl")


@pytest.mark.parametrize(LAYOUT_NAMES, LAYOUT_CASES)
def test_trace_and_diagonal_layout(data, trace_axes, diagonal_axes, spec, divisor, same_n, impl):
  p, t1 = data["tok_params"], data["t1"]
  t2 = data["t3"] if same_n else data["t2"]
  expected = np.einsum(spec, reference_full(tokens_model, p, t1, t2)) / divisor
  got = native(tokens_model, trace_axes, diagonal_axes, 0, impl)(t1, t2, p)
  assert got.shape == ntk_output_shape((3, 2, 5), (*t2.shape[:2], 5), trace_axes, diagonal_axes)
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def test_output_shape_rule():
  assert ntk_output_shape((5, 3), (4, 3)) == (5, 4)
  assert ntk_output_shape((5, 3), (4, 3), ()) == (5, 4, 3, 3)
  assert ntk_output_shape((5, 2, 3), (5, 2, 3), (), (0,)) == (5, 2, 2, 3, 3)
  assert ntk_output_shape((5, 2, 3), (4, 2, 3), (-1,), (1,)) == (5, 4, 2)
  with pytest.raises(ValueError, match="differ on axis 1"):
    ntk_output_shape((5, 3), (4, 2))
  with pytest.raises(ValueError, match="overlap"):
    ntk_output_shape((5, 3), (5, 3), (-1,), (1,))


# ---------------------------------------------------------------------------------------------
# AUTO, blocking, keyword arguments
# ---------------------------------------------------------------------------------------------


def test_auto_matches_explicit_implementations(data):
  p, x1, x2 = data["mlp_params"], data["x1"], data["x2"]
  fn = native(mlp, vmap_axes=0, implementation=0)
  chosen = fn.select_implementation(x1, x2, p)
  assert chosen in (1, 2)
  got = fn(x1, x2, p)
  np.testing.assert_allclose(got, native(mlp, vmap_axes=0, implementation=1)(x1, x2, p), rtol=RTOL)
  np.testing.assert_allclose(got, native(mlp, vmap_axes=0, implementation=2)(x1, x2, p), rtol=RTOL)


# (trace_axes, diagonal_axes, x2 kind, batch_size, einsum on the full MLP kernel [a k b l],
# divisor). x1 has 5 rows, so every case has a remainder block; "none" exercises the transposed
# lower triangle, "rev" (x1 reversed) a diagonal example axis with x2 given.
BLOCK_CASES = [
  ((), (), "none", 2, "akbl->abkl", 1),
  ((-1,), (), "other", 3, "akbk->ab", 4),
  ((-1,), (0,), "rev", 2, "akak->a", 4),
  ((0,), (), "none", 2, "akal->kl", 5),
]
BLOCK_NAMES = ("trace_axes", "diagonal_axes", "x2_kind", "batch", "spec", "divisor")


@pytest.mark.parametrize(BLOCK_NAMES, BLOCK_CASES)
def test_batch_size_blocking(data, trace_axes, diagonal_axes, x2_kind, batch, spec, divisor):
  p, x1 = data["mlp_params"], data["x1"]
  x2 = {"none": None, "other": data["x2"], "rev": x1[::-1]}[x2_kind]
  full = reference_full(mlp, p, x1, x1 if x2 is None else x2)
  expected = np.einsum(spec, full) / divisor
  got = native(mlp, trace_axes, diagonal_axes, 0, 1, batch=batch)(x1, x2, p)
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def test_keyword_arguments_pairs_static_and_vmapped(data):
  """2-tuple kwargs go to f(x1) / f(x2); bools are static; kwargs_axes vmaps per-example ones."""
  p, x1, x2 = data["mlp_params"], data["x1"], data["x2"]
  s1, s2 = jnp.linspace(0.5, 1.5, 5), jnp.linspace(2.0, 1.0, 6)

  def scaled(params, x, scale, double=False):
    out = mlp(params, x) * scale[:, None]
    return 2.0 * out if double else out

  def fixed(params, x, s):
    return scaled(params, x, s, double=True)

  j1 = jacobian_rows(lambda q, xs: fixed(q, xs[:, :3], xs[:, 3]), p, jnp.c_[x1, s1])
  j2 = jacobian_rows(lambda q, xs: fixed(q, xs[:, :3], xs[:, 3]), p, jnp.c_[x2, s2])
  expected = np.einsum("akz,bkz->ab", j1, j2) / 4
  for vmap_axes, batch in ((None, None), ((0, 0, {"scale": 0}), None), ((0, 0, {"scale": 0}), 3)):
    fn = empirical_ntk_fn(scaled, vmap_axes=vmap_axes, batch_size=batch)
    got = fn(x1, x2, p, scale=(s1, s2), double=True)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL, err_msg=str((vmap_axes, batch)))


@pytest.mark.skipif(jax.device_count() < 2, reason="needs >1 device (XLA_FLAGS host devices)")
def test_blocks_under_a_data_mesh(data):
  from jax.sharding import NamedSharding, PartitionSpec

  n_dev = jax.device_count()
  mesh = jax.make_mesh((n_dev,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  p = data["mlp_params"]
  x = np.random.default_rng(3).standard_normal((2 * n_dev, 3)).astype(np.float32)
  x_sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
  expected = np.einsum("akbk->ab", reference_full(mlp, p, x, x)) / 4
  got = native(mlp, vmap_axes=0, batch=n_dev)(x_sharded, None, p)
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# Sub-tree restriction
# ---------------------------------------------------------------------------------------------


def test_restrict_to_subtree_gives_that_subtree_kernel(data):
  full_params, x1, x2 = data["nested_params"], data["x1"], data["x2"]
  f_sub, sub = restrict_to_subtree(nested_model, full_params, "peft/current")
  assert sorted(sub) == [
    "peft/current/down/bias",
    "peft/current/down/kernel",
    "peft/current/up/kernel",
  ]

  def manual(cur, x):  # the same model with only peft/current free
    params = {**full_params, "peft": {**full_params["peft"], "current": cur}}
    return nested_model(params, x)

  cur = full_params["peft"]["current"]
  expected = np.einsum(
    "akz,bkz->ab", jacobian_rows(manual, cur, x1), jacobian_rows(manual, cur, x2)
  )
  fn = empirical_ntk_fn(f_sub, vmap_axes=0)
  np.testing.assert_allclose(fn(x1, x2, sub), expected / 4, rtol=RTOL, atol=ATOL)
  # Frozen leaves as a runtime keyword argument give the same kernel.
  got_kw = fn(x1, x2, sub, frozen_params=full_params)
  np.testing.assert_allclose(got_kw, expected / 4, rtol=RTOL, atol=ATOL)
  # ... and the full-tree kernel is different (more parameters contribute).
  full = empirical_ntk_fn(nested_model, vmap_axes=0)(x1, x2, full_params)
  assert np.max(np.abs(full - expected / 4)) > 1e-2 * np.max(np.abs(full))


def test_restrict_to_subtree_errors(data):
  full_params = data["nested_params"]
  with pytest.raises(ValueError, match=r"'peft/curent' selects no leaf.*'peft/current'"):
    restrict_to_subtree(nested_model, full_params, ["peft/curent"])
  f_sub, sub = restrict_to_subtree(nested_model, full_params, [("head",), "peft/current/up"])
  assert sorted(sub) == ["head/kernel", "peft/current/up/kernel"]
  with pytest.raises(ValueError, match="missing"):
    f_sub({"head/kernel": sub["head/kernel"]}, data["x1"])


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_native_implementation_3_raises_helpfully():
  with pytest.raises(NotImplementedError, match=r"implementation=1.*2.*neural_tangents"):
    empirical_ntk_fn(mlp, implementation=3)


def test_argument_errors(data):
  p, x1 = data["mlp_params"], data["x1"]
  with pytest.raises(ValueError, match="backend"):
    empirical_ntk_fn(mlp, backend="tf")
  with pytest.raises(ValueError, match="implementation"):
    empirical_ntk_fn(mlp, implementation=4)
  with pytest.raises(ValueError, match="batch_size"):
    empirical_ntk_fn(mlp, batch_size=0)
  with pytest.raises(ValueError, match="out of range"):
    empirical_ntk_fn(mlp, trace_axes=(2,))(x1, None, p)
  with pytest.raises(TypeError, match="single array"):
    empirical_ntk_fn(lambda q, x: (mlp(q, x), mlp(q, x)))(x1, None, p)
  with pytest.raises(ValueError, match="kwargs_axes"):  # per-example kwarg not declared
    empirical_ntk_fn(lambda q, x, s: mlp(q, x) * s[:, None], vmap_axes=0)(x1, None, p, s=x1[:, 0])
  with pytest.raises(TypeError, match="floating"):
    empirical_ntk_fn(lambda q, x: mlp(q, x))(x1, None, {**p, "step": jnp.array(3)})


# ---------------------------------------------------------------------------------------------
# Agreement with neural-tangents
# ---------------------------------------------------------------------------------------------


@NT_SKIP
@pytest.mark.parametrize("model", ["mlp", "nested"])
def test_native_matches_neural_tangents(data, model):
  f, p = (mlp, data["mlp_params"]) if model == "mlp" else (nested_model, data["nested_params"])
  x1, x2 = data["x1"], data["x2"]
  ours = native(f, (), (), 0, 1)(x1, x2, p)
  np.testing.assert_allclose(native(f, (), (), 0, 2)(x1, x2, p), ours, rtol=RTOL, atol=ATOL)
  impls = (1, 2, 3) if nt_compat.structured_derivatives_supported() else (1, 2)
  for impl in impls:  # neural-tangents' ntk_fn is not jitted: jit it (one compile, not many ops)
    theirs = jax.jit(empirical_ntk_fn(f, (), (), 0, impl, backend="neural_tangents"))(x1, x2, p)
    np.testing.assert_allclose(theirs, ours, rtol=RTOL, atol=ATOL, err_msg=f"nt impl {impl}")


@NT_SKIP
@pytest.mark.parametrize(LAYOUT_NAMES, [LAYOUT_CASES[i] for i in (0, 2, 3)])
def test_layout_matches_neural_tangents(
  data, trace_axes, diagonal_axes, spec, divisor, same_n, impl
):
  """Averaging over trace_axes=(-1,) and diagonal_axes=(0,) as neural-tangents does.

  trace_axes=() is covered by test_native_matches_neural_tangents; the other layouts, AUTO and
  batching of the neural_tangents backend are in test_nt_compat.py (to keep each file fast).
  """
  p, t1 = data["tok_params"], data["t1"]
  t2 = data["t3"] if same_n else data["t2"]
  ours = native(tokens_model, trace_axes, diagonal_axes, 0, impl)(t1, t2, p)
  theirs = jax.jit(
    empirical_ntk_fn(tokens_model, trace_axes, diagonal_axes, None, 1, backend="neural_tangents")
  )(t1, t2, p)
  assert theirs.shape == ours.shape
  np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=ATOL)
