"""Ahead-of-time preflight: compile a run's jitted functions for a TPU slice you do not have.

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

Per function it reports XLA's compiled memory (argument, output, aliased, temp bytes per device;
peak = argument + output − aliased + temp, against the chip's HBM), FLOPs and bytes accessed
(`cost_analysis`, per device and per image), the collectives of the compiled HLO, the compile
time, and a roofline *upper bound* on images/s from published chip peaks (`CHIPS`). Everything
is a compile-time estimate for the target, not a measurement on it. Exit status: 0 all fit,
1 a function does not fit in HBM, 2 a usage error (unknown target, invalid config).

Not compiled: the method's own extra programs (`Method.programs`, e.g. the linear or ridge
predictor; their signatures are the method's), the host-side end-of-task work, and GPU targets.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "CHIPS",
  "TARGETS",
  "ChipSpec",
  "Target",
  "UnknownTargetError",
  "collectives",
  "preflight",
  "resolve_target",
]

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """Published per-chip peaks (one JAX device per chip: v4/v5p run as megacore).

  bf16_flops: dense bf16 matmul peak, FLOP/s. hbm_bytes: HBM capacity. hbm_bw: HBM bytes/s.
  """

  name: str
  bf16_flops: float
  hbm_bytes: int
  hbm_bw: float
  source: str


CHIPS: dict[str, ChipSpec] = {
  # https://cloud.google.com/tpu/docs/v4 ("System architecture"): 275 TFLOP/s bf16 peak per chip,
  # 32 GiB HBM2, 1,200 GB/s.
  "v4": ChipSpec("TPU v4", 275e12, 32 * GiB, 1200e9, "cloud.google.com/tpu/docs/v4"),
  # https://cloud.google.com/tpu/docs/v5e ("System architecture"): 197 TFLOP/s bf16 per chip,
  # 16 GiB HBM2, 819 GB/s.
  "v5e": ChipSpec("TPU v5e", 197e12, 16 * GiB, 819e9, "cloud.google.com/tpu/docs/v5e"),
  # https://cloud.google.com/tpu/docs/v5p ("System architecture"): 459 TFLOP/s bf16 per chip,
  # 95 GiB HBM2e, 2,765 GB/s.
  "v5p": ChipSpec("TPU v5p", 459e12, 95 * GiB, 2765e9, "cloud.google.com/tpu/docs/v5p"),
  # https://cloud.google.com/tpu/docs/v6e ("System architecture"): 918 TFLOP/s bf16 per chip,
  # 32 GiB HBM, 1,640 GB/s.
  "v6e": ChipSpec("TPU v6e", 918e12, 32 * GiB, 1640e9, "cloud.google.com/tpu/docs/v6e"),
}

# float32 matmuls on the TPU MXU run as bf16 passes (`jax.lax.Precision`'s docstring: DEFAULT 1,
# HIGH 3, HIGHEST 6): the matmul peak at `model.matmul_precision` is bf16_flops / passes. Derived
# from the docs, not a published figure.
PRECISION_PASSES = {"default": 1, "high": 3, "highest": 6}

# Accelerator types as Cloud TPU names them → (topology, chip). v4 and v5p names count
# TensorCores (2 per chip, one JAX device per chip); v5e (v5litepod) and v6e names count chips.
TARGETS: dict[str, tuple[str, str]] = {
  "v4-8": ("v4:2x2x1", "v4"),
  "v4-16": ("v4:2x2x2", "v4"),
  "v4-32": ("v4:2x2x4", "v4"),
  "v4-64": ("v4:2x4x4", "v4"),
  "v4-128": ("v4:4x4x4", "v4"),
  "v5p-8": ("v5p:2x2x1", "v5p"),
  "v5p-16": ("v5p:2x2x2", "v5p"),
  "v5p-32": ("v5p:2x2x4", "v5p"),
  "v5p-64": ("v5p:2x4x4", "v5p"),
  "v5p-128": ("v5p:4x4x4", "v5p"),
  "v5litepod-1": ("v5e:1x1", "v5e"),
  "v5litepod-4": ("v5e:2x2", "v5e"),
  "v5litepod-8": ("v5e:2x4", "v5e"),
  "v5litepod-16": ("v5e:4x4", "v5e"),
  "v5litepod-32": ("v5e:4x8", "v5e"),
  "v5litepod-64": ("v5e:8x8", "v5e"),
  "v5litepod-128": ("v5e:8x16", "v5e"),
  "v5litepod-256": ("v5e:16x16", "v5e"),
  "v6e-1": ("v6e:1x1", "v6e"),
  "v6e-4": ("v6e:2x2", "v6e"),
  "v6e-8": ("v6e:2x4", "v6e"),
}
RAW_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):\d+(x\d+){1,2}$")
CPU_TARGET = "cpu"  # this machine's devices (what the tests run the trainer on)

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_HLO_OP = re.compile(
  r"=\s*(?P<shape>.+?)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\("
)
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64|c64|c128)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4}
_BYTES |= {"u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


class UnknownTargetError(ValueError):
  """A --target that is neither a known accelerator type nor a topology string."""


@dataclasses.dataclass(frozen=True)
class Target:
  """What preflight compiles for: its name, the devices of its mesh and its chip (None: CPU)."""

  name: str
  topology: str
  devices: Sequence[Any]
  chip: ChipSpec | None


def valid_targets_text() -> str:
  return (
    f"valid targets: {', '.join(TARGETS)}, {CPU_TARGET}, or a topology "
    "<v4|v5e|v5p|v6e>:<AxB[xC]> (e.g. v5e:2x2, v4:2x2x1)."
  )


def _one_device_per_chip(devices: Sequence[Any]) -> list[Any]:
  """TPU v4's topology lists both TensorCores of a chip; JAX on a v4 runs megacore (one device
  per chip), as `jax.make_mesh` requires: keep core 0 of each chip."""
  return [d for d in devices if getattr(d, "core_on_chip", 0) == 0]


def resolve_target(name: str) -> Target:
  """`name` → its devices (TPU device descriptions, or this machine's CPUs for "cpu").

  Raises:
    UnknownTargetError: listing the valid targets.
  """
  if name == CPU_TARGET:
    return Target(name, CPU_TARGET, jax.devices("cpu"), None)
  if name in TARGETS:
    topology, chip = TARGETS[name]
  elif RAW_TOPOLOGY.match(name):
    topology, chip = name, name.partition(":")[0]
  else:
    raise UnknownTargetError(f"unknown --target {name!r}; {valid_targets_text()}")
  from jax.experimental import topologies

  dims = [int(x) for x in topology.partition(":")[2].split("x")]
  kwargs = {}
  if math.prod(dims) < 4:  # libtpu's default host is 2x2x1 chips: smaller slices are one host
    kwargs["chips_per_host_bounds"] = [*dims, *[1] * (3 - len(dims))]
  try:
    desc = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs)
  except Exception as e:  # libtpu missing or busy, or a topology it rejects
    import importlib.util

    message = str(e).splitlines()[0][:300]
    if importlib.util.find_spec("libtpu") is None:
      hint = " Install libtpu: pip install 'jax[tpu]==0.9.2'."
    elif "lockfile" in message:  # libtpu admits one process at a time unless told otherwise
      hint = " Another process holds libtpu; rerun with ALLOW_MULTIPLE_LIBTPU_LOAD=1."
    else:
      hint = ""
    raise UnknownTargetError(
      f"--target {name!r} ({topology}): no TPU topology ({type(e).__name__}: {message}).{hint} "
      f"{valid_targets_text()}"
    ) from e
  return Target(name, topology, _one_device_per_chip(desc.devices), CHIPS[chip])


# ------------------------------------------------------------------------------------------------
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
  from ntkcl_jax.seed_stack import SeedStack
  from ntkcl_jax.steps import build_programs

  plan = plan_lib.resolve(config)
  batch_sizes = {"train.batch_size": plan.batch_size, "eval.batch_size": plan.eval_batch_size}
  stack = SeedStack.make(plan.seeds, plan.stacked, batch_sizes, plan.seed_axis_size, devices)
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
  frozen, aux = frozen_and_aux(state, backbone, task_aux)
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


# ------------------------------------------------------------------------------------------------
# Analysis of a compiled function.


def _array_bytes(text: str) -> list[int]:
  return [
    _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    for dtype, dims in _ARRAY.findall(text)
  ]


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {"count", "bytes"}} of the collectives in compiled HLO text (per device: the result
  size of each op; an async `-start` op counts its largest buffer, once)."""
  found: dict[str, dict[str, int]] = {}
  for line in hlo_text.splitlines():
    m = _HLO_OP.search(line)
    if not m:
      continue
    sizes = _array_bytes(m["shape"])
    entry = found.setdefault(m["op"], {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += (max(sizes) if m["start"] else sum(sizes)) if sizes else 0
  return found


def _cost(compiled: Any) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return dict(cost or {})


def analyse(
  name: str,
  lowered: Any,
  images: int,
  num_devices: int,
  chip: ChipSpec | None,
  passes: int,
  analytic_per_image: float | None,
) -> dict[str, Any]:
  """Compiles `lowered` and reads its memory, cost, collectives and roofline bound."""
  t0 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:  # XLA TPU refuses a program larger than HBM
    if "RESOURCE_EXHAUSTED" not in str(e) or chip is None:
      raise
    return {
      "function": name,
      "compile_s": round(time.perf_counter() - t0, 2),
      "images_per_call": images,
      "hbm_bytes": chip.hbm_bytes,
      "fits": False,
      "compile_error": str(e).splitlines()[0][:500],
    }
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  arg, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
  alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
  peak = arg + out - alias + temp
  cost = _cost(compiled)
  flops, accessed = cost.get("flops"), cost.get("bytes accessed")
  r: dict[str, Any] = {
    "function": name,
    "compile_s": round(compile_s, 2),
    "images_per_call": images,
    "memory_per_device": {
      "argument_bytes": arg,
      "output_bytes": out,
      "aliased_bytes": alias,
      "temp_bytes": temp,
      "peak_bytes": peak,
    },
    "flops_per_device": flops,
    "flops_per_image": None if flops is None else flops * num_devices / images,
    "analytic_matmul_flops_per_image": analytic_per_image,
    "bytes_accessed_per_device": accessed,
    "collectives": collectives(compiled.as_text()),
  }
  if chip is not None:
    r["hbm_bytes"] = chip.hbm_bytes
    r["fits"] = peak <= chip.hbm_bytes
    r["margin_bytes"] = chip.hbm_bytes - peak
    if flops:
      t_compute = flops / (chip.bf16_flops / passes)
      t_memory = (accessed or 0.0) / chip.hbm_bw
      r["roofline_bound"] = {
        "images_per_s_upper_bound": images / max(t_compute, t_memory),
        "bound_by": "compute" if t_compute >= t_memory else "hbm bandwidth",
        "step_s_lower_bound": max(t_compute, t_memory),
      }
  return r


def preflight(
  config: Any, target: Target, functions: Sequence[str] | None = None
) -> dict[str, Any]:
  """Lowers and compiles the run's functions for `target`; the report (JSON-serialisable).

  Args:
    functions: a subset of ("train_step", "features", "predict") to compile (default all).
  """
  from ntkcl_jax.flops import analytic_flops

  plan, method, stack, programs = build(config, target.devices)
  args = abstract_args(plan, method, stack, programs)
  passes = PRECISION_PASSES[plan.matmul_precision]
  analytic = analytic_flops(method.spec, plan.num_classes, plan.head_width, plan.batch_size)
  fns = {"train_step": programs.train_step, "features": programs.features}
  fns["predict"] = programs.predict
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
    lowered = fns[name].lower(*fn_args)
    results.append(
      analyse(
        name, lowered, images[name], len(target.devices), target.chip, passes, per_image[name]
      )
    )
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
    "functions": results,
    "fits": all(r.get("fits", True) for r in results),
    "environment": {
      "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "jax": jax.__version__,
      "libtpu": _libtpu_version(),
      "host_cpu": _cpu_model(),
      "python": platform.python_version(),
      "estimate": "deviceless compile (XLA cost and memory analysis), not a measurement",
    },
  }


def _libtpu_version() -> str | None:
  from importlib import metadata

  try:
    return metadata.version("libtpu")
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


# ------------------------------------------------------------------------------------------------
# Text report.


def _mib(x: float | None) -> str:
  if x is None:
    return "—"
  if abs(x) < 2**20:
    return f"{x / 2**10:,.1f} KiB"
  return f"{x / 2**20:,.1f} MiB"


def _num(x: float | None, unit: str = "") -> str:
  if x is None:
    return "—"
  for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale:
      return f"{x / scale:.3g} {prefix}{unit}"
  return f"{x:.3g} {unit}"


def format_report(report: dict[str, Any]) -> str:
  chip = report["chip"]
  lines = [
    f"preflight {report['target']} ({report['topology']}): {report['devices']} x "
    f"{report['device_kind']}, mesh {report['mesh']}; method {report['method']}, seeds "
    f"{report['seeds']}{' stacked' if report['stacked'] else ''}, batch {report['batch_size']} "
    f"(eval {report['eval_batch_size']}), precision {report['matmul_precision']}, remat "
    f"{report['remat']}",
    "Compile-time estimates for the target (XLA memory/cost analysis of a deviceless compile), "
    "not measurements.",
  ]
  for r in report["functions"]:
    if "compile_error" in r:
      lines.append(
        f"\n{r['function']} ({r['images_per_call']} images/call): DOES NOT FIT in "
        f"{_mib(r['hbm_bytes'])} HBM; XLA refused to compile it: {r['compile_error']}"
      )
      continue
    m = r["memory_per_device"]
    fit = ""
    if "fits" in r:
      verdict = "fits" if r["fits"] else "DOES NOT FIT"
      fit = f" of {_mib(r['hbm_bytes'])} HBM: {verdict} (margin {_mib(r['margin_bytes'])})"
    lines += [
      f"\n{r['function']} ({r['images_per_call']} images/call, compiled in {r['compile_s']} s)",
      f"  memory/device: argument {_mib(m['argument_bytes'])}, output {_mib(m['output_bytes'])}, "
      f"aliased {_mib(m['aliased_bytes'])}, temp {_mib(m['temp_bytes'])}; "
      f"peak {_mib(m['peak_bytes'])}{fit}",
      f"  FLOPs: {_num(r['flops_per_device'], 'FLOP')}/device/call, "
      f"{_num(r['flops_per_image'], 'FLOP')}/image (analytic matmuls: "
      f"{_num(r['analytic_matmul_flops_per_image'], 'FLOP')}/image); bytes accessed "
      f"{_mib(r['bytes_accessed_per_device'])}/device",
    ]
    coll = r["collectives"]
    lines.append(
      "  collectives: "
      + (
        ", ".join(f"{k} x{v['count']} ({_mib(v['bytes'])})" for k, v in sorted(coll.items()))
        or "none"
      )
    )
    if "roofline_bound" in r:
      b = r["roofline_bound"]
      lines.append(
        f"  roofline upper bound: {b['images_per_s_upper_bound']:,.0f} images/s "
        f"({b['bound_by']}-bound; a bound from {chip['source']} peaks, not a measurement)"
      )
  if report["not_compiled"]:
    lines.append(f"\nnot compiled (method programs): {', '.join(report['not_compiled'])}")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Command line.


def main(
  config: Any, target_name: str, json_path: str | None, functions: Sequence[str] | None = None
) -> int:
  """The command: 0 when every function fits, 1 when one does not, 2 (via `cli.fail`) on a
  usage error (unknown target, invalid config)."""
  from ntkcl_jax.cli import fail

  try:
    target = resolve_target(target_name)
  except UnknownTargetError as e:
    fail(str(e))
  try:
    report = preflight(config, target, functions)
  except (ValueError, NotImplementedError) as e:
    fail(str(e))
  print(format_report(report))
  if json_path:
    with open(json_path, "w") as f:
      json.dump(report, f, indent=1)
      f.write("\n")
  bad = [r["function"] for r in report["functions"] if not r.get("fits", True)]
  if bad:
    print(
      f"error: {', '.join(bad)} does not fit in the {_mib(report['chip']['hbm_bytes'])} HBM of a "
      f"{report['chip']['name']} chip on {target.name}; lower train.batch_size / eval.batch_size, "
      "use --config.model.remat=full, or a larger slice.",
      file=sys.stderr,
    )
    return 1
  return 0


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
  )
  _TARGET = flags.DEFINE_string("target", None, f"What to compile for; {valid_targets_text()}")
  _JSON = flags.DEFINE_string("json", None, "Also write the report as JSON to this file.")
  flags.mark_flags_as_required(["config", "target"])
  from ntkcl_jax.cli import parse_flags

  app.run(
    lambda argv: sys.exit(main(_CONFIG.value, _TARGET.value, _JSON.value)), flags_parser=parse_flags
  )
