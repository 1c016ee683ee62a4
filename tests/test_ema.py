"""SPEC 2.3: the adaptive EMA equals the running mean of end-of-task snapshots."""

import jax
import numpy as np
import pytest

from ntkcl_jax.ema import ema_rates, ema_update


def test_ema_after_t_tasks_is_mean_of_snapshots():
  rng = np.random.default_rng(0)
  tree = lambda: {"a": {"kernel": rng.normal(size=(3, 2))}, "b": rng.normal(size=(4,))}  # noqa: E731
  ema = tree()  # initial EMA bank: ignored, since r0 = 0 at t = 0
  snapshots = []
  for t in range(4):
    current = tree()
    snapshots.append(current)
    ema = ema_update(ema, current, t)
    mean = jax.tree_util.tree_map(lambda *xs: np.mean(xs, axis=0), *snapshots)
    jax.tree_util.tree_map(lambda e, m: np.testing.assert_allclose(e, m, rtol=1e-12), ema, mean)


def test_rates():
  assert ema_rates(0) == (0.0, 1.0)
  assert ema_rates(3) == (0.75, 0.25)
  with pytest.raises(ValueError):
    ema_rates(-1)
