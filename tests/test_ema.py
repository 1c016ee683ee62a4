"""SPEC 2.3: the adaptive EMA equals the running mean of end-of-task snapshots."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkcl_jax.ema import ema_rates, ema_update


def test_ema_after_t_tasks_is_mean_of_snapshots():
  rng = np.random.default_rng(0)
  tree = lambda: {  # noqa: E731
    "a": {"kernel": rng.normal(size=(3, 2)).astype(np.float32)},
    "b": rng.normal(size=(4,)).astype(np.float32),
  }
  ema = tree()  # initial EMA bank: ignored, since r0 = 0 at t = 0
  snapshots = []
  for t in range(4):
    current = tree()
    snapshots.append(current)
    ema = ema_update(ema, current, t)
    mean = jax.tree_util.tree_map(lambda *xs: np.mean(xs, axis=0), *snapshots)
    jax.tree_util.tree_map(lambda e, m: np.testing.assert_allclose(e, m, rtol=1e-6), ema, mean)


def test_rates():
  assert ema_rates(0) == (0.0, 1.0)
  assert ema_rates(3) == (0.75, 0.25)
  with pytest.raises(ValueError):
    ema_rates(-1)


def test_update_compiles_once_for_all_tasks():
  """README: one compilation serves every task (the rates are traced, not static)."""
  from ntkcl_jax import ema as ema_lib

  bank = {"w": jnp.ones((5, 3)), "b": jnp.zeros((3,))}
  bank = ema_update(bank, bank, 0)
  compiled = ema_lib._blend._cache_size()
  for t in range(1, 5):
    bank = ema_update(bank, jax.tree_util.tree_map(lambda x, t=t: x + t, bank), t)
  assert ema_lib._blend._cache_size() == compiled  # tasks 1-4 reuse task 0's compilation


@pytest.mark.numerics
def test_update_matches_python_float_rates_bitwise():
  """Traced float32 rates give the same bits as the constant rates of the per-task version."""
  rng = np.random.default_rng(1)
  e, c = rng.normal(size=(2, 64)).astype(np.float32)
  for t in (0, 1, 2, 6):
    r0, r1 = ema_rates(t)
    want = jax.jit(lambda e, c, r0=r0, r1=r1: r0 * e + r1 * c)(e, c)
    np.testing.assert_array_equal(ema_update({"x": e}, {"x": c}, t)["x"], want)
