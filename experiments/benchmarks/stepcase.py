"""The `step` benchmark's case: builds, compiles and times one (configuration, phase) of the jitted
NTK-CL train or eval step, in its own process (`run_worker`, through `harness`); plus the sizes and
the optimisation switches (the analytic FLOP count is `ntkcl_jax.flops`). Shared by `step`, `ab` and
`profile`.

What is measured is described in `step.py`'s docstring; the timing loop, the memory fields and
the worker protocol are `harness`'s.
"""

from __future__ import annotations

import os
import time
from typing import Any

from experiments.benchmarks import harness
from ntkcl_jax.flops import analytic_flops

SIZES = {
  # name -> (ViTSpec kwargs, batch, num_classes C, task (k_t, s_t), fixed_197_tokens)
  "vitb": (dict(), 16, 100, (10, 10), True),
  "tiny": (
    dict(image_size=28, patch_size=4, width=64, depth=4, num_heads=4, mlp_dim=128),
    32,
    10,
    (2, 2),
    False,
  ),
}

SWITCH_DEFAULTS = {
  "share_block0": True,
  "last_block_cls_only": True,
  "remat": "dots",
  "grad_frozen": False,
  "donate": True,
}
TRAIN_ONLY = ("remat", "grad_frozen", "donate")  # switches that do not touch the eval step


# ------------------------------------------------------------------------------------------------
# Worker: one (configuration, phase) in a fresh process.


def _cost_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def case_config(cfg: dict[str, Any]):
  """The run config of one case: `SIZES[cfg["size"]]`'s geometry, classes and batch on
  `ntkcl_jax.base_config()` (reference mode, random backbone), with the case's PTM pass, dtype
  and remat. The task is task 1 of a stream whose first task has k_t classes and the others s_t."""
  from ntkcl_jax import ViTSpec, base_config

  vit_kw, batch_size, num_classes, (k_t, s_t), fixed_197 = SIZES[cfg["size"]]
  vit = ViTSpec(**vit_kw)
  c = base_config()
  c.quirks.prompt_tokens = "fixed_197" if fixed_197 else "from_config"
  for key in ("image_size", "patch_size", "width", "depth", "num_heads", "mlp_dim"):
    c.backbone[key] = getattr(vit, key)
  c.backbone.checkpoint_path = ""
  c.data.num_classes, c.data.init_cls, c.data.increment = num_classes, k_t, s_t
  c.train.batch_size = cfg.get("batch") or batch_size
  c.model.use_init_ptm = cfg["ptm"]
  c.model.dtype = cfg["dtype"]
  c.model.remat = cfg["remat"]
  return c


def _grad_frozen_method(method_cls):
  """`method_cls` whose train step also takes the gradient w.r.t. `frozen` (and discards it, its
  norm joining the terms so XLA cannot drop it): the cost the trainable/frozen split avoids."""
  import jax
  import optax

  from ntkcl_jax import TrainState, loss_fn

  class GradFrozen(method_cls):
    def train_step(self, model, tx):
      plan = self.plan

      def train_step(state, frozen, aux, batch, key, lr):
        grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
        (_, terms), (grads, frozen_grads) = grad_fn(
          state.params,
          frozen,
          aux,
          batch,
          key,
          model=model,
          weights=plan.loss_weights,
          batch_size=plan.batch_size,
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree_util.tree_map(lambda p, u: p - lr * u, state.params, updates)
        terms["grad_norm"] = optax.global_norm(grads)
        terms["frozen_grad_norm"] = optax.global_norm(frozen_grads)
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1), terms

      return train_step

  return GradFrozen


def assemble_config(config, spec_changes: dict[str, Any] | None = None, wrap_method=None):
  """(plan, method, stack, programs) of `config`, assembled as the trainer assembles a run
  (`plan.resolve`, the configured method, `SeedStack.make`, `steps.build_programs`).

  Args:
    spec_changes: `ModelSpec` fields set on the plan's spec (switches with no config key).
    wrap_method: method class -> the class to build instead (e.g. `_grad_frozen_method`).
  """
  import dataclasses

  from ntkcl_jax import SeedStack, methods, steps
  from ntkcl_jax import plan as plan_lib

  plan = plan_lib.resolve(config)
  if spec_changes:
    plan = dataclasses.replace(plan, spec=dataclasses.replace(plan.spec, **spec_changes))
  method_cls = methods.method_class(plan.method)
  method = (wrap_method(method_cls) if wrap_method else method_cls)(plan)
  batch_sizes = {"train.batch_size": plan.batch_size, "eval.batch_size": plan.batch_size}
  stack = SeedStack.make(plan.seeds, plan.stacked, batch_sizes, plan.seed_axis_size)
  return plan, method, stack, steps.build_programs(plan, method, stack)


def assemble(cfg: dict[str, Any]):
  """`assemble_config` of one case (`case_config`), with its model switches (`share_block0`,
  `last_block_cls_only`) on the spec and, for `grad_frozen`, the gradient-of-frozen step."""
  switches = {k: cfg[k] for k in ("share_block0", "last_block_cls_only")}
  wrap = _grad_frozen_method if cfg.get("grad_frozen") else None
  return assemble_config(case_config(cfg), switches, wrap)


def train_args(plan, method, stack, programs, seeds, task, steps: int) -> list[Any]:
  """The six arguments of `Programs.train_step` (state, health, frozen, aux, batch, schedule) at
  the start of task t, placed as the trainer places them (`task_loop.start_task`, `_step_inputs`).

  Args:
    seeds: per seed of `stack`, (init params, (C, D) host prototypes before the task, host
      batch {"image", "label", "mask"} of B rows).
    task: (t, k_t, s_t). steps: the schedule's steps per epoch (one epoch).
  """
  import jax
  import jax.numpy as jnp

  from ntkcl_jax import Health, TaskSchedule, TrainState, reg_targets, split_trainable

  t, k_t, s_t = task
  states, peft, auxes, batches, schedules = [], [], [], [], []
  for i, (params, protos, batch) in enumerate(seeds):
    task_key = jax.random.key(1000 + i)
    trainable, frozen = split_trainable({**params, "proxy_head": method.task_proxy_head(task_key)})
    states.append(
      TrainState(params=trainable, opt_state=programs.tx.init(trainable), step=jnp.int32(0))
    )
    peft.append(frozen["peft"])
    aux = method.task_aux(protos, t, k_t, s_t)
    # copies: the state is donated, the snapshot must not alias its buffers (as in the trainer)
    aux = {**aux, "prototypes": protos, "reg_snapshot": reg_targets(trainable)}
    auxes.append(jax.tree_util.tree_map(jnp.copy, aux))
    batches.append(batch)
    schedules.append(TaskSchedule.make(task_key, plan.lr, 1, steps))
  backbones = [params["backbone"] for params, _, _ in seeds]
  if stack.stacked and not plan.shared_backbone:  # each seed's own random backbone
    backbone = stack.put(stack.stack(backbones))
  else:
    backbone = stack.replicate(backbones[0])
  host_batch = next(stack.batches(lambda i, *_: iter([batches[i]]), plan.batch_size, length=1))
  return [
    stack.put(stack.stack(states)),
    stack.put(stack.stack([Health.fresh()] * stack.size)),
    {"backbone": backbone, "peft": stack.put(stack.stack(peft))},
    stack.put(stack.stack(auxes)),
    stack.put_batch(host_batch, plan.batch_size),
    stack.put(stack.stack(schedules)),
  ]


def build_phase(cfg: dict[str, Any]) -> dict[str, Any]:
  """The trainer's jitted step of one (configuration, phase) and its inputs, not yet compiled.

  train: `Programs.train_step` (the loop step the trainer runs: loss, SGD update, on-device lr
  and key from the step counter, the non-finite check), on task 1's inputs as the trainer builds
  them (`Method.task_aux`, a fresh proxy head and optimiser state, `TaskSchedule`); eval:
  `Programs.predict` (eval-mode features and the section-weighted prototype logits, top-1/top-k).

  Returns {"fn": the `jax.jit` function, "args": its arguments (train: state, health, frozen,
  aux, batch, schedule; eval: params, prototypes, num_seen, images), "carry": how many leading
  arguments a call returns (train: 2, donated; eval: 0), "spec", "batch_size", "num_classes",
  "head_width", "devices" (of the trainer's mesh, which splits the batch), "init_s",
  "rss_after_init_bytes"}. Used by `run_worker`, `ab.py` and
  `profiling.py`.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ntkcl_jax import init_params

  _, _, num_classes, (k_t, s_t), _ = SIZES[cfg["size"]]
  plan, method, stack, programs = assemble(cfg)
  spec, batch_size = method.spec, plan.batch_size
  v = spec.vit
  t0 = time.perf_counter()
  params = init_params(spec, jax.random.key(0))
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(batch_size, v.image_size, v.image_size, 3)).astype(np.float32)
  protos = np.zeros((num_classes, method.feature_dim), np.float32)
  protos[:k_t] = rng.normal(size=(k_t, method.feature_dim))  # the old classes' rows
  jax.block_until_ready(params)
  out = {
    "spec": spec,
    "batch_size": batch_size,
    "num_classes": num_classes,
    "head_width": plan.head_width,
    "devices": stack.mesh.devices.size,
    "init_s": time.perf_counter() - t0,
    "rss_after_init_bytes": harness.proc_status_bytes("VmRSS"),
  }
  one = stack.stack  # one seed's tree -> the run's (a plain run: the tree itself)
  if cfg["phase"] == "train":
    labels = k_t + rng.integers(0, s_t, size=batch_size)
    batch = {"image": images, "label": labels.astype(np.int32), "mask": np.ones(batch_size, bool)}
    fn = programs.train_step
    if not cfg["donate"]:  # the trainer's step inside an undonating jit (inner donation unused)
      fn = jax.jit(lambda *a: programs.train_step(*a))
    out["fn"], out["carry"] = fn, 2
    out["args"] = train_args(
      plan, method, stack, programs, [(params, protos, batch)], (1, k_t, s_t), cfg["repeats"] + 1
    )
  else:
    eval_params = {k: params[k] for k in ("backbone", "peft", "fusion")}
    protos[k_t : k_t + s_t] = rng.normal(size=(s_t, method.feature_dim))
    out["fn"], out["carry"] = programs.predict, 0
    out["args"] = [
      stack.put(one([eval_params])),
      stack.put(one([jnp.asarray(protos)])),
      jnp.int32(k_t + s_t),
      stack.put_batch({"image": images}, batch_size)["image"],
    ]
  return out


def make_call(built: dict[str, Any], compiled) -> Any:
  """call(i) for `harness.time_calls`: one finished call of `compiled` on `built`'s inputs
  (train: the state and health are carried from call to call, as they are donated; the step's
  key and lr come from the state's step counter, as in the trainer). Returns the outputs that
  are not carried (train: the loss terms)."""
  import jax

  args, carry = list(built["args"]), built["carry"]

  def call(i):
    out = compiled(*args)
    jax.block_until_ready(out)
    if not carry:
      return out
    args[:carry] = out[:carry]
    return out[carry]

  return call


def run_worker(cfg: dict[str, Any]) -> dict[str, Any]:
  """Builds, compiles and times one phase ("train" or "eval") of one configuration."""
  import jax
  import numpy as np

  load_before = os.getloadavg()[0]
  built = build_phase(cfg)
  spec, batch_size = built["spec"], built["batch_size"]
  t0 = time.perf_counter()
  compiled = built["fn"].lower(*built["args"]).compile()
  compile_s = time.perf_counter() - t0

  flops = _cost_flops(compiled)
  first, timing = harness.time_calls(make_call(built, compiled), cfg["repeats"], batch_size)
  finite = None
  if cfg["phase"] == "train":
    finite = bool(np.isfinite(float(first["total"])))

  mem = compiled.memory_analysis()
  dev = jax.local_devices()[0]
  stats = dev.memory_stats() or {}
  return {
    **cfg,
    "batch": batch_size,
    "devices": built["devices"],
    "platform": dev.platform,
    "device_kind": dev.device_kind,
    "init_s": built["init_s"],
    "compile_s": compile_s,
    **timing,
    # XLA's count is the per-device program's: the mesh's devices each run 1/devices of the batch
    "xla_flops_per_img": (None if flops is None else flops * built["devices"] / batch_size),
    # the analytic count covers the shipped step (frozen weights get no gradient)
    "analytic_flops_per_img": (
      None
      if cfg.get("grad_frozen")
      else analytic_flops(spec, built["num_classes"], built["head_width"], batch_size)[cfg["phase"]]
    ),
    "xla_temp_bytes": getattr(mem, "temp_size_in_bytes", None),
    "peak_rss_bytes": harness.peak_rss_bytes(),
    "rss_after_init_bytes": built["rss_after_init_bytes"],
    "device_peak_bytes": stats.get("peak_bytes_in_use"),
    "loss_finite": finite,
    "load_avg_before": load_before,
    "load_avg_after": os.getloadavg()[0],
  }
