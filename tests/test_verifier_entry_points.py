"""Entry points for outside verifiers: per-pass features, a fixed L_MI row set, the
training loss with dropout off (`deterministic`), and the loss's outputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ntkcl_jax import losses
from ntkcl_jax.models.ntkcl import NTKCL, init_params
from ntkcl_jax.train_step import TaskInfo, init_proxy_head, loss_fn, reg_targets, split_trainable
from tests.fakes import tiny_spec

BATCH = 6


def _setup(**spec_overrides):
  spec = tiny_spec(**spec_overrides)
  params = init_params(spec, jax.random.key(0))
  # Non-zero adapters so that dropout in the EMA pass is visible (a fresh `up` is 0).
  params["peft"] = jax.tree_util.tree_map(
    lambda a: a + 0.1 * jax.random.normal(jax.random.key(a.size), a.shape), params["peft"]
  )
  params["proxy_head"] = init_proxy_head(jax.random.key(1), spec.feature_dim, 2)
  trainable, frozen = split_trainable(params)
  rng = np.random.default_rng(0)
  protos = jnp.asarray(rng.normal(size=(6, spec.feature_dim)), jnp.float32).at[4:].set(0.0)
  aux = {
    "task": TaskInfo.make(task_start=4, num_new=2, n_old=4, use_reg=True),
    "prototypes": protos,
    "orth_basis": jnp.asarray(losses.orthogonality_basis(np.asarray(protos))),
    "reg_snapshot": reg_targets(trainable),
  }
  batch = {
    "image": jnp.asarray(rng.uniform(size=(BATCH, 16, 16, 3)), jnp.float32),
    "label": jnp.asarray([4, 5, 4, 5, 4, 4], jnp.int32),
    "mask": jnp.ones(BATCH, bool),
  }
  return spec, params, trainable, frozen, aux, batch


@functools.cache
def _compiled(spec, deterministic=False, with_outputs=False):
  def f(t, frozen, aux, batch, k):
    return loss_fn(
      t,
      frozen,
      aux,
      batch,
      k,
      model=NTKCL(spec),
      weights=losses.LossWeights(),
      batch_size=BATCH,
      deterministic=deterministic,
      with_outputs=with_outputs,
    )

  return jax.jit(f)


def _loss(spec, trainable, frozen, aux, batch, key=0, **kw):
  return _compiled(spec, **kw)(trainable, frozen, aux, batch, jax.random.key(key))


def test_per_pass_features_concatenate_to_c_and_p():
  spec, params, *_, batch = _setup(use_init_ptm=True)
  out = NTKCL(spec).apply({"params": params}, batch["image"], train=False, per_pass=True)
  ps = out["passes"]
  assert set(ps) == {"ptm", "c_ema", "c_cur", "p_ema", "p_cur"}
  np.testing.assert_array_equal(
    out["c"], jnp.concatenate([ps["ptm"], ps["c_ema"], ps["c_cur"]], -1)
  )
  np.testing.assert_array_equal(
    out["p"], jnp.concatenate([ps["ptm"], ps["p_ema"], ps["p_cur"]], -1)
  )
  plain = NTKCL(spec).apply({"params": params}, batch["image"], train=False)
  assert "passes" not in plain


def test_fixed_mi_rows_replace_the_draw_and_match_a_direct_computation():
  spec, _, trainable, frozen, aux, batch = _setup()
  rows = jnp.asarray([2, 0, -1, -1], jnp.int32)
  fixed = {**aux, "mi_rows": rows}
  _, t1 = _loss(spec, trainable, frozen, fixed, batch, key=0, deterministic=True, with_outputs=True)
  _, t2 = _loss(spec, trainable, frozen, fixed, batch, key=7, deterministic=True, with_outputs=True)
  np.testing.assert_allclose(t1["mi"], t2["mi"], rtol=1e-6)  # the key no longer matters
  _, lab, valid = losses.fixed_mi_prototypes(aux["prototypes"], rows)
  np.testing.assert_array_equal(valid, [True, True, False, False])
  np.testing.assert_array_equal(lab[:2], [2, 0])
  want, _ = losses.mi_loss(
    t1["outputs"]["features"]["m"],
    batch["label"],
    batch["mask"],
    aux["prototypes"][jnp.asarray([2, 0])],
    jnp.asarray([2, 0]),
    jnp.ones(2, bool),
    0.1,
  )
  np.testing.assert_allclose(t1["mi"], want, rtol=1e-5)


def test_deterministic_loss_is_the_eval_forward_and_leaves_q9_to_the_spec():
  spec, params, trainable, frozen, aux, batch = _setup()
  _, t = _loss(spec, trainable, frozen, aux, batch, deterministic=True, with_outputs=True)
  ev = NTKCL(spec).apply({"params": params}, batch["image"], train=False, per_pass=True)
  for k in ("c", "p", "m"):
    np.testing.assert_allclose(t["outputs"]["features"][k], ev[k], rtol=1e-5, atol=1e-5)
  assert set(t["outputs"]["proxy_logits"]) == {"c", "p", "m"}
  # deterministic=False: the EMA channel pass has dropout as `spec.ema_branch_dropout` says (Q9).
  _, tt = _loss(spec, trainable, frozen, aux, batch, with_outputs=True)
  assert spec.ema_branch_dropout
  assert np.abs(tt["outputs"]["features"]["passes"]["c_ema"] - ev["passes"]["c_ema"]).max() > 1e-3
