"""Ahead-of-time preflight: compile a run's jitted functions for a TPU slice or NVIDIA GPUs you do
not have.

`python -m ntkcl_jax.preflight --config experiments/configs/<name>.py --target v5litepod-8
[--config.key=value ...] [--json FILE]` resolves the run's plan (`plan.resolve`: no data or
weights), builds the method, a `SeedStack` on a mesh of the target's devices (TPU device
descriptions from `jax.experimental.topologies.get_topology_desc`, no TPU needed) and the run's
jitted functions (`steps.build_programs`, the trainer's one assembly), then lowers and compiles
them on `jax.ShapeDtypeStruct` inputs that carry the trainer's shardings. The input trees come
from the trainer's own pure builders (`session.initial_run_state`, `task_loop.task_train_state`,
`task_loop.task_step_trees`, `task_loop.frozen_and_aux`, `session.eval_params`) under
`jax.eval_shape`; the shardings are the `SeedStack`'s (`sharding`, `backbone_sharding`,
`batch_sharding`), i.e. what `stack.put` / `place_backbone` / `put_batch` give the trainer.
GPU targets (`--target h100x8`: `gpus.py`) take the CUDA plugin's compile-only devices instead.

Per function it reports XLA's compiled memory (argument, output, aliased, temp bytes per device;
peak = argument + output − aliased + temp, against the chip's HBM), FLOPs and bytes accessed
(`cost_analysis`, per device and per image; for NVIDIA GPUs, whose deviceless compile has no
cost analysis, FLOPs are the matmuls and convolutions counted in the optimised HLO and bytes
accessed are unknown), the collectives of the compiled HLO, the compile time, and a roofline
*upper bound* on images/s from published chip peaks (`CHIPS`). Everything is a compile-time
estimate for the target, not a measurement on it; a GPU compile also does no autotuning (gemm
choices and temp sizes may differ on the device). Exit status: 0 all fit, 1 a function does not
fit in HBM, 2 a usage error (unknown target, invalid config, the target's plugin missing).

With `analysis.enabled` (or `functions` naming it) it also compiles `ntk_block`, the NTK hook's
kernel for two probe blocks on one device (`ntk_block_lowered`). `--slices N` compiles for a
multi-slice TPU job (the mesh from `sharding.mesh_of`, as the trainer builds it).

Not compiled: the method's own extra programs (`Method.programs`, e.g. the linear or ridge
predictor; their signatures are the method's) and the host-side end-of-task work.
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntkcl_jax.preflight.compiled import COLLECTIVES, analyse, collectives
from ntkcl_jax.preflight.report import format_report
from ntkcl_jax.preflight.targets import (
  CHIPS,
  TARGETS,
  ChipSpec,
  Target,
  UnknownTargetError,
  resolve_target,
  valid_targets_text,
)

__all__ = [
  "CHIPS",
  "COLLECTIVES",
  "FUNCTIONS",
  "TARGETS",
  "ChipSpec",
  "Target",
  "UnknownTargetError",
  "abstract_args",
  "build",
  "collectives",
  "format_report",
  "preflight",
  "resolve_target",
  "valid_targets_text",
]

# The trainer's inputs, abstract.


def _spec(tree: Any, sharding: Any) -> Any:
  """Leaves (arrays or ShapeDtypeStructs) → ShapeDtypeStructs placed with `sharding`. Strong
  types: the trainer places host copies (`stack.put`), which carry no weak type."""
  return jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree
  )


def build(config: Any, devices: Sequence[Any]) -> tuple[Any, Any, Any, Any]:
  """(plan, method, stack, programs) of `config` on a mesh of `devices` (the trainer's path)."""
  from ntkcl_jax import methods
  from ntkcl_jax import plan as plan_lib
  from ntkcl_jax.steps import build_programs, seed_stack

  plan = plan_lib.resolve(config)
  stack = seed_stack(plan, devices)
  method = methods.build(plan)
  return plan, method, stack, build_programs(plan, method, stack)


def abstract_args(plan: Any, method: Any, stack: Any, programs: Any) -> dict[str, tuple]:
  """Per compiled function, its arguments as the trainer passes them at task 0, abstract.

  Returns:
    {"train_step": (train state, health, frozen, aux, batch, schedule) (when the method takes
    steps), "features": (eval params, images), "predict": (eval params, prototypes, num_seen,
    images)}.
  """
  from ntkcl_jax.config import init_key
  from ntkcl_jax.models.ntkcl import init_params
  from ntkcl_jax.session import eval_params, initial_run_state
  from ntkcl_jax.task_loop import (
    TRAIN_BATCH_KEYS,
    frozen_and_aux,
    task_step_trees,
    task_train_state,
  )

  spec, seeds = method.spec, plan.seeds
  inits = jax.eval_shape(lambda: [init_params(spec, init_key(s), None) for s in seeds])
  state = jax.eval_shape(lambda p: initial_run_state(method, programs, stack, p), inits)
  keys = [jax.random.key(s) for s in seeds]
  train = jax.eval_shape(
    lambda p: task_train_state(method, programs.tx, stack, p, keys), state["train"].params
  )
  backbone = jax.eval_shape(
    lambda p: stack.backbone_tree([x["backbone"] for x in p], plan.shared_backbone), inits
  )
  host_protos = [np.zeros(state["prototypes"].shape[-2:], np.float32)] * stack.size
  steps = [1] * stack.size
  task_aux, schedule, health = task_step_trees(
    plan, method, stack, 0, keys, steps, max(plan.epochs, 1), host_protos
  )
  state = _spec({**state, "train": train}, stack.sharding)
  backbone = _spec(backbone, stack.backbone_sharding(plan.shared_backbone))
  task_aux, schedule, health = _spec((task_aux, schedule, health), stack.sharding)
  frozen, aux = frozen_and_aux(state, backbone, task_aux, method)
  size, lead = plan.data.image_size, (stack.size,) if stack.stacked else ()

  def images(batch_size: int) -> jax.ShapeDtypeStruct:  # TaskStream batches: float32 NHWC
    return jax.ShapeDtypeStruct(
      (*lead, batch_size, size, size, 3), jnp.float32, sharding=stack.batch_sharding
    )

  b = plan.batch_size
  row = {"label": jnp.int32, "mask": jnp.bool_}
  batch = {
    k: images(b)
    if k == "image"
    else jax.ShapeDtypeStruct((*lead, b), row[k], sharding=stack.batch_sharding)
    for k in TRAIN_BATCH_KEYS
  }
  params = eval_params(state, backbone)
  k_0, s_0 = plan.data.splits[0]
  out = {
    "features": (params, images(plan.eval_batch_size)),
    "predict": (params, state["prototypes"], k_0 + s_0, images(plan.eval_batch_size)),
  }
  if programs.train_step is not None:
    out = {"train_step": (state["train"], health, frozen, aux, batch, schedule), **out}
  return out


def ntk_block_lowered(
  config: Any, plan: Any, method: Any, device: Any
) -> tuple[Any, dict[str, int]]:
  """The NTK hook's kernel Θ(x1, x2) for two blocks of b probes on one `device`, lowered on
  abstract inputs; and {"block": b, "probes": the run's probe count}.

  b is `analysis.batch_size`, or every probe of the run (T (n_train + n_test)) when 0 (no
  blocking). The kernel is the hook's own (`analysis.hook.kernel_meters`: output, projection,
  parameter set, implementation, the tripled kernel when on) w.r.t. one seed's θ_A; x1 and x2 are
  distinct blocks (the off-diagonal case, two Jacobians: the larger). The hook runs on one device.
  """
  from analysis import measure
  from analysis.hook import NTKSettings, kernel_meters
  from ntkcl_jax.config import init_key
  from ntkcl_jax.models.ntkcl import init_params

  settings, spec = NTKSettings.from_config(config), method.spec
  meter, tripled = kernel_meters(settings, spec)
  probes = plan.num_tasks * (settings.n_train + settings.n_test)
  block = settings.batch_size or probes
  mesh = jax.sharding.Mesh(np.array([device]), ("ntk",))
  one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = jax.eval_shape(lambda: init_params(spec, init_key(plan.seeds[0]), None))
  theta, rest = (_spec(t, one) for t in measure.split_params(params, settings.params))
  v, dim = spec.vit, spec.feature_dim
  images = jax.ShapeDtypeStruct(
    (block, v.image_size, v.image_size, v.channels), jnp.float32, sharding=one
  )
  if settings.output == "prototype_logits":
    kwargs = {"prototypes": (plan.num_classes, dim)}
  elif settings.projection == "gaussian":
    kwargs = {"projection": (settings.projection_dim, dim)}
  else:
    kwargs = {"projection": (min(measure.EXACT_CHUNK, dim), dim)}
  kwargs = {
    k: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=one) for k, shape in kwargs.items()
  }
  lowered = (tripled or meter).lower_block(theta, images, images, rest=rest, **kwargs)
  return lowered, {"block": block, "probes": probes}


FUNCTIONS = ("train_step", "features", "predict", "ntk_block")


def preflight(
  config: Any, target: Target, functions: Sequence[str] | None = None
) -> dict[str, Any]:
  """Lowers and compiles the run's functions for `target`; the report (JSON-serialisable).

  Args:
    functions: a subset of `FUNCTIONS` to compile (default: the first three, and "ntk_block",
      the NTK hook's kernel for one pair of probe blocks, when `analysis.enabled`).
  """
  from ntkcl_jax.flops import analytic_flops

  unknown = sorted(set(functions or ()) - set(FUNCTIONS))
  if unknown:
    raise ValueError(f"--functions: unknown {', '.join(unknown)}; valid: {', '.join(FUNCTIONS)}.")
  plan, method, stack, programs = build(config, target.devices)
  args = abstract_args(plan, method, stack, programs)
  analytic = analytic_flops(method.spec, plan.num_classes, plan.head_width, plan.batch_size)
  images = {
    "train_step": stack.size * plan.batch_size,
    "features": stack.size * plan.eval_batch_size,
    "predict": stack.size * plan.eval_batch_size,
  }
  per_image = {
    "train_step": analytic["train"],
    "features": analytic["forward"],
    "predict": analytic["eval"],
  }
  from ntkcl_jax.methods.ntkcl import NTKCLMethod

  if not isinstance(method, NTKCLMethod):  # the analytic count is NTK-CL's step
    per_image = dict.fromkeys(per_image)
  results = []
  for name, fn_args in args.items():
    if functions is not None and name not in functions:
      continue
    lowered = getattr(programs, name).lower(*fn_args)  # `abstract_args` keys name `Programs` fields
    results.append(
      analyse(
        name,
        lowered,
        images[name],
        len(target.devices),
        target.chip,
        plan.matmul_precision,
        per_image[name],
      )
    )
  analysis = None
  wanted = "ntk_block" in functions if functions is not None else config.analysis.enabled
  if wanted:
    lowered, analysis = ntk_block_lowered(config, plan, method, target.devices[0])
    # the kernel runs at "highest" precision (`analysis.ntk_dispatch`), on one device
    images_per_call = 2 * analysis["block"]
    results.append(analyse("ntk_block", lowered, images_per_call, 1, target.chip, "highest", None))
  dev = target.devices[0]
  return {
    "target": target.name,
    "topology": target.topology,
    "devices": len(target.devices),
    "device_kind": dev.device_kind,
    "mesh": dict(stack.mesh.shape),
    "chip": dataclasses.asdict(target.chip) if target.chip else None,
    "method": plan.method,
    "seeds": list(plan.seeds),
    "stacked": plan.stacked,
    "batch_size": plan.batch_size,
    "eval_batch_size": plan.eval_batch_size,
    "matmul_precision": plan.matmul_precision,
    "remat": method.spec.remat,
    "image_size": plan.data.image_size,
    "not_compiled": sorted(programs.extra),
    "ntk": analysis,
    "functions": results,
    "fits": all(r.get("fits", True) for r in results),
    "environment": {
      "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "jax": jax.__version__,
      "libtpu": _version("libtpu"),
      "jax_cuda12_plugin": _version("jax-cuda12-plugin"),
      "host_cpu": _cpu_model(),
      "python": platform.python_version(),
      "estimate": _estimate(target.chip),
    },
  }


def _estimate(chip: ChipSpec | None) -> str:
  """What the report's figures are: for a GPU, a compile without its autotuning."""
  if chip is not None and chip.is_gpu:
    return (
      f"deviceless compile for {chip.name} (no autotuning: gemm choices and temp sizes may "
      "differ on the device)"
    )
  return "deviceless compile (XLA cost and memory analysis), not a measurement"


def _version(package: str) -> str | None:
  from importlib import metadata

  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return None


def _cpu_model() -> str:
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()
