"""Jitted forward + loss + grad on a tiny config; frozen and dead parameters (SPEC 1.3, 1.5, 2.2)."""

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkcl_jax import losses
from ntkcl_jax.models.ntkcl import NTKCL, init_params
from ntkcl_jax.optim import make_optimizer, merge, path_labels
from ntkcl_jax.train_step import (
  TaskInfo,
  TrainState,
  init_proxy_head,
  loss_fn,
  make_train_step,
  reg_targets,
  split_trainable,
)
from tests.fakes import tiny_spec

NUM_CLASSES, BATCH = 6, 8


def _setup(corrected: bool):
  spec = tiny_spec(fusion_with_qk=not corrected, kaiming_mix=corrected)
  params = init_params(spec, jax.random.key(0))
  params["proxy_head"] = init_proxy_head(jax.random.key(1), spec.feature_dim, 3)
  trainable, frozen = split_trainable(params)
  aux = {
    "task": TaskInfo.make(task_start=0, num_new=2, n_old=0, use_reg=True),
    "prototypes": jnp.zeros((NUM_CLASSES, spec.feature_dim)),
    "orth_basis": jnp.asarray(losses.orthogonality_basis(np.zeros((2, spec.feature_dim)), 40)),
    "reg_snapshot": reg_targets(trainable),
  }
  rng = np.random.default_rng(0)
  batch = {
    "image": jnp.asarray(rng.uniform(size=(BATCH, 16, 16, 3)), jnp.float32),
    "label": jnp.asarray([0, 1, 0, 1, 1, 0, 0, 0], jnp.int32),
    "mask": jnp.asarray([True] * 6 + [False] * 2),
  }
  return spec, params, trainable, frozen, aux, batch


def _grads(spec, trainable, frozen, aux, batch):
  weights = losses.LossWeights(mi=0.2, mi_sign=-1)
  f = jax.jit(
    jax.grad(
      lambda t: loss_fn(
        t,
        frozen,
        aux,
        batch,
        jax.random.key(5),
        model=NTKCL(spec),
        weights=weights,
        batch_size=BATCH,
      )[0]
    )
  )
  return tu.flatten_dict(f(trainable), sep="/")


def test_partition_rules_cover_every_leaf_and_freeze_backbone_and_ema():
  _, params, trainable, frozen, _, _ = _setup(False)
  labels = tu.flatten_dict(path_labels(params), sep="/")
  assert all(v == "freeze" for k, v in labels.items() if k.startswith(("backbone/", "peft/ema/")))
  assert all(
    v == "train"
    for k, v in labels.items()
    if k.startswith(("peft/current/", "fusion/", "proxy_head/"))
  )
  assert set(trainable) == {"peft", "fusion", "proxy_head"} and set(trainable["peft"]) == {
    "current"
  }
  assert set(frozen) == {"backbone", "peft"} and set(frozen["peft"]) == {"ema"}
  with pytest.raises(ValueError, match="matches no partition rule"):
    path_labels({**params, "stray": {"kernel": jnp.zeros(2)}})


def test_reference_dead_parameters_get_exactly_zero_gradient():
  spec, _, trainable, frozen, aux, batch = _setup(False)
  g = _grads(spec, trainable, frozen, aux, batch)
  last = spec.vit.depth - 1
  for name, value in g.items():
    dead = (
      name.startswith(("fusion/query/", "fusion/key/"))  # Q1
      or any(name.endswith(s) for s in ("/mix/kernel", "/mix/bias", "/norm/scale"))  # Q2
      or f"/prompt_{last}/" in name  # last-block prompts never reach the CLS output
      or name.endswith("/down/kernel")  # up = 0 at init blocks the path to `down`
    )
    if dead:
      assert float(jnp.abs(value).max()) == 0.0, name
  for alive in (
    "peft/current/prompt_0/norm/bias",
    "peft/current/adapter_1/up/kernel",
    "fusion/value/kernel",
    "proxy_head/kernel",
    "proxy_head/sigma",
  ):
    assert float(jnp.abs(g[alive]).max()) > 0.0, alive


def test_corrected_mode_gradients_reach_gamma_then_mix_kernel():
  spec, _, trainable, frozen, aux, batch = _setup(True)
  assert "query" not in trainable["fusion"]  # value_only
  g = _grads(spec, trainable, frozen, aux, batch)
  last = spec.vit.depth - 1
  assert float(jnp.abs(g["peft/current/prompt_0/norm/scale"]).max()) > 0.0
  assert float(jnp.abs(g["peft/current/prompt_0/mix/kernel"]).max()) == 0.0  # γ = 0 blocks it
  assert all(float(jnp.abs(v).max()) == 0.0 for k, v in g.items() if f"/prompt_{last}/" in k)
  # One SGD step makes γ non-zero; then the mix kernel receives gradient.
  tx = make_optimizer(5e-4)
  state = TrainState(params=trainable, opt_state=tx.init(trainable), step=jnp.int32(0))
  step = jax.jit(make_train_step(NTKCL(spec), losses.LossWeights(), tx, BATCH))
  state, terms = step(state, frozen, aux, batch, jax.random.key(7), 0.5)
  assert np.isfinite(float(terms["total"]))
  g = _grads(spec, state.params, frozen, aux, batch)
  assert float(jnp.abs(g["peft/current/prompt_0/mix/kernel"]).max()) > 0.0


def test_train_step_updates_only_trainables_and_keeps_frozen_bitwise():
  spec, params, trainable, frozen, aux, batch = _setup(False)
  tx = make_optimizer(5e-4)
  state = TrainState(params=trainable, opt_state=tx.init(trainable), step=jnp.int32(0))
  step = jax.jit(make_train_step(NTKCL(spec), losses.LossWeights(), tx, BATCH))
  new, terms = step(state, frozen, aux, batch, jax.random.key(7), 0.1)
  assert set(terms) >= {"ce_c", "ce_p", "ce_m", "mi", "orth", "reg", "total", "grad_norm"}
  merged = tu.flatten_dict(merge(new.params, frozen), sep="/")
  before = tu.flatten_dict(params, sep="/")
  assert set(merged) == set(before)
  for k, v in merged.items():
    if k.startswith(("backbone/", "peft/ema/")):
      np.testing.assert_array_equal(v, before[k])
  # Weight decay moves even dead trainables (as in PyTorch SGD); the proxy head learns.
  assert (
    float(
      jnp.abs(
        new.params["fusion"]["query"]["kernel"] - trainable["fusion"]["query"]["kernel"]
      ).max()
    )
    > 0
  )
  assert int(new.step) == 1
