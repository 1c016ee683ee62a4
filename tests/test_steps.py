"""`steps.build_programs` needs no data or weights: every method's jitted functions lower on
`jax.ShapeDtypeStruct` inputs built with `jax.eval_shape` (what a compile-only preflight does)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkcl_jax import methods
from ntkcl_jax import plan as plan_lib
from ntkcl_jax.config import init_key
from ntkcl_jax.models.ntkcl import init_params
from ntkcl_jax.seed_stack import SeedStack
from ntkcl_jax.session import initial_state
from ntkcl_jax.sharding import make_mesh
from ntkcl_jax.steps import build_programs
from ntkcl_jax.task_loop import frozen_and_aux
from ntkcl_jax.train_step import Health, TaskSchedule
from tests import tiny_configs as tc


def _abstract(tree):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


@pytest.mark.parametrize("name", sorted(methods.BUILTIN))
def test_programs_lower_on_abstract_inputs(name):
  plan = plan_lib.resolve(tc.method_config(name))
  method = methods.build(plan)
  stack = SeedStack.single(make_mesh())
  programs = build_programs(plan, method, stack)
  params = jax.eval_shape(lambda: init_params(method.spec, init_key(0), None))
  state = jax.eval_shape(lambda p: initial_state(method, programs, p, jax.random.key(0)), params)
  k_t, s_t = plan.data.splits[0]
  protos = np.zeros(state["prototypes"].shape, np.float32)
  task_aux = _abstract(method.task_aux(protos, 0, k_t, s_t))
  frozen, aux = frozen_and_aux(state, params["backbone"], task_aux, method)
  b, size = plan.batch_size, plan.data.image_size
  batch = {
    "image": jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32),
    "label": jax.ShapeDtypeStruct((b,), jnp.int32),
    "mask": jax.ShapeDtypeStruct((b,), jnp.bool_),
  }
  schedule = jax.eval_shape(lambda: TaskSchedule.make(jax.random.key(0), plan.lr, 1, 2))
  health = jax.eval_shape(Health.fresh)
  if method.takes_steps:
    programs.train_step.lower(state["train"], health, frozen, aux, batch, schedule)
  else:
    assert programs.train_step is None
  eval_params = {
    "backbone": params["backbone"],
    "peft": {"current": state["train"].params["peft"]["current"], "ema": state["ema"]},
    "fusion": state["train"].params["fusion"],
  }
  images = jax.ShapeDtypeStruct((plan.eval_batch_size, size, size, 3), jnp.float32)
  out = jax.eval_shape(programs.features, eval_params, images)
  assert out.shape == (plan.eval_batch_size, method.feature_dim)
  programs.predict.lower(eval_params, state["prototypes"], 2, images)
