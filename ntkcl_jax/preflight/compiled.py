"""What a compiled function costs: memory against HBM, FLOPs, collectives, a roofline bound."""

from __future__ import annotations

import math
import re
import time
from typing import Any

import jax

from ntkcl_jax.preflight.targets import ChipSpec

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_HLO_OP = re.compile(
  r"=\s*(?P<shape>.+?)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\("
)
# Multi-slice TPU programs move data between slices (over the data-centre network) with host
# transfers tagged by libtpu's megascale runtime: `send(...)`, frontend attribute
# `_xla_megascale_transfer_type="ALL_REDUCE"` (or ALL_GATHER, ...).
_DCN_SEND = re.compile(
  r"=\s*\((?P<shape>.*?)\)\s+send\(.*_xla_megascale_transfer_type=\"(?P<kind>[A-Z_]+)\""
)
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64|c64|c128)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4}
_BYTES |= {"u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


def _array_bytes(text: str) -> list[int]:
  return [
    _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    for dtype, dims in _ARRAY.findall(text)
  ]


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {"count", "bytes"}} of the collectives in compiled HLO text (per device: the result
  size of each op; an async `-start` op counts its largest buffer, once).

  Transfers between the slices of a multi-slice job count as "dcn-<type>" (e.g.
  "dcn-all-reduce"), with the bytes each device sends; the collectives without the prefix stay
  within a slice."""
  found: dict[str, dict[str, int]] = {}
  for line in hlo_text.splitlines():
    dcn = _DCN_SEND.search(line)
    if dcn:
      entry = found.setdefault("dcn-" + dcn["kind"].lower().replace("_", "-"), {"count": 0})
      entry["count"] += 1
      entry["bytes"] = entry.get("bytes", 0) + (_array_bytes(dcn["shape"]) or [0])[0]
      continue
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
