"""The run's jitted functions, assembled in one place from the plan, the method and the seeds.

`build_programs(plan, method, stack)` returns every function the trainer compiles: the train
loop step (vmapped over seeds when stacked), the eval feature and predict functions, and the
method's own (`Method.programs`, e.g. a linear-head or ridge predictor). Building them reads no
data or weights and compiles nothing (jit is lazy), so a compile-only tool calls it with a
topology mesh (`seed_stack(plan, <topology devices>)`) and lowers the functions on
`jax.ShapeDtypeStruct` inputs (`ntkcl_jax.preflight`). Every function is traced under the
stack's mesh (`sharding.under_mesh`), so the step's `sharding.gather_batch` constraints name it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import optax

from ntkcl_jax.methods import Method, ProgramParts
from ntkcl_jax.models.ntkcl import NTKCL
from ntkcl_jax.optim import make_optimizer
from ntkcl_jax.plan import RunPlan
from ntkcl_jax.seed_stack import SeedStack
from ntkcl_jax.seeds import skip_empty_batches
from ntkcl_jax.sharding import under_mesh
from ntkcl_jax.train_step import make_loop_step, with_matmul_precision

__all__ = ["Programs", "build_programs", "optimizer", "seed_stack"]


@dataclasses.dataclass(frozen=True)
class Programs:
  """The jitted functions of a run (shapes fixed across tasks: one compilation each).

  Attributes:
    model: the method's model (`NTKCL(method.spec)`). tx: the optimiser (`optimizer(plan)`).
    train_step: (train state, health, frozen, aux, batch, schedule) → (train state, health,
      terms); donates its first two arguments (`train_step.make_loop_step`). None for a method
      that takes no steps (`Method.takes_steps`).
    features: the run's (eval params, images) → features, (K, b, D) when stacked else (b, D).
    seed_features: one seed's (params, images (b, H, W, C)) → (b, D) (what hooks read).
    predict: the run's (eval params, prototypes, num_seen, images) → (top-1, top-k).
    extra: the method's own jitted functions by name (`Method.programs`).
  """

  model: NTKCL
  tx: optax.GradientTransformation
  train_step: Callable[..., Any] | None
  features: Callable[..., Any]
  seed_features: Callable[..., Any]
  predict: Callable[..., Any]
  extra: Mapping[str, Callable[..., Any]]


def optimizer(plan: RunPlan) -> optax.GradientTransformation:
  """The update direction of every method's step (`optim.make_optimizer`)."""
  return make_optimizer(plan.weight_decay, plan.momentum)


def seed_stack(plan: RunPlan, devices: Sequence[Any] | None = None) -> SeedStack:
  """The run's seeds on a mesh of `devices` (default `jax.devices()`; preflight passes a target
  topology's): one plain run, or the stacked seeds on the (seed, data) mesh."""
  batch_sizes = {"train.batch_size": plan.batch_size, "eval.batch_size": plan.eval_batch_size}
  return SeedStack.make(plan.seeds, plan.stacked, batch_sizes, plan.seed_axis_size, devices)


def build_programs(plan: RunPlan, method: Method, stack: SeedStack) -> Programs:
  """Assembles (without compiling) the jitted functions of `method` on `stack`'s mesh."""
  model = NTKCL(method.spec)
  tx = optimizer(plan)
  precision = plan.matmul_precision
  check_aux = plan.quirks.nonfinite_aux == "mask_or_raise"
  backbone_axis = None if plan.shared_backbone else 0  # in_axes of the backbone in a stacked run

  def traced(fn: Callable[..., Any]) -> Callable[..., Any]:
    """At the run's matmul precision, traced under its mesh (`sharding.gather_batch`)."""
    return under_mesh(with_matmul_precision(fn, precision), stack.mesh)

  def jit(fn: Callable[..., Any]) -> Callable[..., Any]:
    return jax.jit(traced(fn))

  train_step = None
  if method.takes_steps:
    loop_step = make_loop_step(method.train_step(model, tx), check_aux)
    if stack.stacked:
      # (state, health, frozen, aux, batch, schedule): per seed, but a shared backbone
      loop_step = stack.vmap(
        skip_empty_batches(loop_step, batch_argnum=4, num_carried=2),
        (0, 0, {"backbone": backbone_axis, "peft": 0}, 0, 0, 0),
      )
    train_step = jax.jit(traced(loop_step), donate_argnums=(0, 1))

  param_axes = {"backbone": backbone_axis, "peft": 0, "fusion": 0}
  feature_fn = method.feature_fn(model)
  features = jit(stack.vmap(feature_fn, (param_axes, 0)))
  return Programs(
    model=model,
    tx=tx,
    train_step=train_step,
    features=features,
    seed_features=jit(feature_fn),
    predict=jit(stack.vmap(method.predict_fn(model), (param_axes, 0, None, 0))),
    extra=method.programs(ProgramParts(model, stack, jit, param_axes, features)),
  )
