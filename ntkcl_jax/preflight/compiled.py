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


def _tuple_elements(shape: str) -> list[str]:
  """The top-level elements of an HLO tuple shape "(a, (b, c), d)" (a non-tuple: [shape])."""
  shape = shape.strip()
  if not shape.startswith("("):
    return [shape]
  parts, depth, start = [], 0, 1
  for i, ch in enumerate(shape[1:-1], 1):
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "," and depth == 0:
      parts.append(shape[start:i].strip())
      start = i + 1
  return [*parts, shape[start:-1].strip()]


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {"count", "bytes"}} of the collectives in compiled HLO text (per device: the bytes
  of each op's result). Async ops count at their `-start`: all-reduce-start's result is the
  reduced buffer(s) (XLA:GPU combines several into a tuple); the other `-start` ops' result is
  (operand(s), result(s)[, context]), of which the second element counts (a tuple when several
  operands are combined).

  Transfers between the slices of a multi-slice TPU job count as "dcn-<type>" (e.g.
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
    shape = m["shape"]
    if m["start"] and m["op"] != "all-reduce":
      parts = _tuple_elements(shape)
      shape = parts[1] if len(parts) > 1 else shape
    entry = found.setdefault(m["op"], {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += sum(_array_bytes(shape))
  return found


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTRUCTION = re.compile(
  r"^\s+(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.+?)\s+(?P<op>[a-z][\w\-]*)\("
  r"(?P<operands>[^)]*)\)(?P<attrs>.*)$"
)
_CALLEE = re.compile(r"\b(?P<kind>calls|body|branch_computations)=(?P<names>\{[^}]*\}|%?[\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_GEMM_CONTRACTING = re.compile(r'"lhs_contracting_dimensions":\[([^\]]*)\]')
_DOT_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_DIM_LABELS = re.compile(r"dim_labels=(\w+)_(\w+)->(\w+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def _dims(shape: str) -> list[int]:
  """Dimensions of the first array in `shape` (a tuple's first element: a custom call's result
  before its workspace)."""
  m = _ARRAY.search(shape)
  return [int(d) for d in m[2].split(",") if d] if m else []


def _conv_flops(out: list[int], kernel: list[int], rhs_labels: str) -> float:
  """2 × output elements × (kernel elements / output features): each output element is a dot
  of kernel spatial size × input features per group."""
  return 2.0 * math.prod(out) * math.prod(kernel) / kernel[rhs_labels.index("o")]


def hlo_matmul_flops(hlo_text: str) -> float:
  """Matmul and convolution FLOPs of one device's compiled (optimised) HLO module text.

  XLA's cost analysis gives no FLOPs to the library calls that do a GPU's matmuls, so they are
  counted from the HLO instead (2 FLOPs per multiply-add):
    - `dot` (fused into Triton gemm fusions, or standalone): 2 × result elements × the product
      of the lhs contracting dimensions (the lhs operand's shape from its defining instruction);
    - cuBLAS custom calls (target `__cublas$...`, result (out, workspace)): the same, with the
      contracting dimensions from `gemm_backend_config.dot_dimension_numbers`;
    - `convolution` and cuDNN convolution custom calls (`__cudnn$conv...`, result (out,
      scratch)): 2 × forward output elements × kernel elements / output features, the forward
      output and kernel taken from operands or result by the call's direction (Forward...:
      (input, kernel) → output; BackwardInput: (output grad, kernel) → input grad;
      BackwardFilter: (input, output grad) → kernel), the output-feature dimension from
      `dim_labels`.
  Not counted: elementwise work, reductions, other custom calls (e.g. cuDNN fused attention).
  Each computation counts once per call site (`calls=`, e.g. fusions), a while body × its
  `known_trip_count` (1 when unknown), a conditional its most expensive branch.

  Returns:
    FLOPs per execution of the ENTRY computation (per device for an SPMD-partitioned module).
  """
  shapes: dict[str, str] = {}
  own: dict[str, float] = {}
  calls: dict[str, list[tuple[str, list[str], int]]] = {}
  entry = comp = None
  for line in hlo_text.splitlines():
    c = _COMPUTATION.match(line)
    if c:
      comp = c["name"]
      entry = comp if line.startswith("ENTRY") else entry
      own[comp], calls[comp] = 0.0, []
      continue
    m = _INSTRUCTION.match(line) if comp is not None else None
    if m is None:
      continue
    shapes[m["name"]] = m["shape"]
    op, attrs = m["op"], m["attrs"]
    operands = re.findall(r"%([\w.\-]+)", m["operands"])
    own[comp] += _instruction_flops(op, m["shape"], operands, attrs, shapes)
    for callee in _CALLEE.finditer(attrs):
      names = re.findall(r"%?([\w.\-]+)", callee["names"])
      trip = _TRIP_COUNT.search(attrs)
      calls[comp].append((callee["kind"], names, int(trip[1]) if trip else 1))
  memo: dict[str, float] = {}

  def total(name: str) -> float:
    if name not in memo:
      flops = own.get(name, 0.0)
      for kind, names, trip in calls.get(name, []):
        sub = [total(n) for n in names]
        if kind == "branch_computations":
          flops += max(sub, default=0.0)
        else:
          flops += (trip if kind == "body" else 1) * sum(sub)
      memo[name] = flops
    return memo[name]

  return total(entry) if entry else 0.0


def _instruction_flops(
  op: str, shape: str, operands: list[str], attrs: str, shapes: dict[str, str]
) -> float:
  """One instruction's matmul/convolution FLOPs (`hlo_matmul_flops`); 0 for anything else."""
  target = _TARGET.search(attrs) if op == "custom-call" else None
  if op == "dot" or (target and target[1].startswith("__cublas$")):
    m = _DOT_CONTRACTING.search(attrs) if op == "dot" else _GEMM_CONTRACTING.search(attrs)
    lhs = _dims(shapes.get(operands[0], "")) if operands else []
    if m is None or not lhs:
      return 0.0
    contracted = [lhs[int(d.strip('" '))] for d in m[1].split(",") if d.strip('" ')]
    return 2.0 * math.prod(_dims(shape)) * math.prod(contracted)
  labels = _DIM_LABELS.search(attrs)
  if labels is None or not (
    op == "convolution" or (target and target[1].startswith("__cudnn$conv"))
  ):
    return 0.0
  operand_dims = [_dims(shapes.get(o, "")) for o in operands[:2]]
  if len(operand_dims) < 2:
    return 0.0
  if target and "BackwardInput" in target[1]:
    out, kernel = operand_dims
  elif target and "BackwardFilter" in target[1]:
    out, kernel = operand_dims[1], _dims(shape)
  else:
    out, kernel = _dims(shape), operand_dims[1]
  return _conv_flops(out, kernel, labels[2])


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
  precision: str,
  analytic_per_image: float | None,
) -> dict[str, Any]:
  """Compiles `lowered` and reads its memory, cost, collectives and roofline bound.

  FLOPs come from XLA's cost analysis ("flops_source": "cost_analysis"); where it has none (the
  CUDA plugin's deviceless compile returns no cost analysis), from the matmuls and convolutions
  of the optimised HLO ("hlo_matmul_count", `hlo_matmul_flops`). The roofline takes the chip's
  float32 matmul peak at `precision` (`ChipSpec.f32_matmul_flops`).
  """
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
  hlo_text = compiled.as_text()
  flops, accessed, source = cost.get("flops"), cost.get("bytes accessed"), "cost_analysis"
  if not flops:
    flops, source = hlo_matmul_flops(hlo_text), "hlo_matmul_count"
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
    "flops_per_image": flops * num_devices / images,
    "flops_source": source,
    "analytic_matmul_flops_per_image": analytic_per_image,
    "bytes_accessed_per_device": accessed,
    "collectives": collectives(hlo_text),
  }
  if chip is not None:
    r["hbm_bytes"] = chip.hbm_bytes
    r["fits"] = peak <= chip.hbm_bytes
    r["margin_bytes"] = chip.hbm_bytes - peak
    if flops:
      t_compute = flops / chip.f32_matmul_flops(precision)
      t_memory = (accessed or 0.0) / chip.hbm_bw
      r["roofline_bound"] = {
        "images_per_s_upper_bound": images / max(t_compute, t_memory),
        "bound_by": "compute" if t_compute >= t_memory else "hbm bandwidth",
        "step_s_lower_bound": max(t_compute, t_memory),
        "compute_only": accessed is None,  # no bytes-accessed estimate (GPU targets)
      }
  return r
