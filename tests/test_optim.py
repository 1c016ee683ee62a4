"""SPEC 2.5: per-epoch cosine and PyTorch-SGD equivalence of the host-lr optimiser."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntkcl_jax.optim import epoch_cosine_schedule, make_optimizer


def test_epoch_cosine_is_constant_within_an_epoch():
  lr = epoch_cosine_schedule(0.1, epochs=4, steps_per_epoch=3)
  got = [float(lr(s)) for s in range(12)]
  want = [0.05 * (1 + np.cos(np.pi * (s // 3) / 4)) for s in range(12)]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[0] == got[2] and got[3] < got[2]


def test_host_lr_direction_equals_optax_sgd_with_schedule():
  sched = epoch_cosine_schedule(0.3, epochs=3, steps_per_epoch=2)
  ref = optax.chain(optax.add_decayed_weights(5e-3), optax.sgd(sched, momentum=0.9))
  mine = make_optimizer(5e-3, 0.9)
  params = {"w": jnp.arange(4.0), "b": jnp.ones(2)}
  p_ref, p_mine = params, params
  s_ref, s_mine = ref.init(params), mine.init(params)
  for step in range(6):
    grads = jax.tree_util.tree_map(lambda x, s=step: jnp.sin(x + s), p_ref)
    u, s_ref = ref.update(grads, s_ref, p_ref)
    p_ref = optax.apply_updates(p_ref, u)
    grads = jax.tree_util.tree_map(lambda x, s=step: jnp.sin(x + s), p_mine)
    u, s_mine = mine.update(grads, s_mine, p_mine)
    p_mine = jax.tree_util.tree_map(lambda p, d, s=step: p - sched(s) * d, p_mine, u)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), p_ref, p_mine)
