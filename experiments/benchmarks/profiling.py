"""Where the time of the jitted NTK-CL train or eval step goes, per kind of XLA operation.

Commands (from the repository root)::

  python -m experiments.benchmarks profile --size vitb --phase train            # ViT-B/16, batch 16
  python -m experiments.benchmarks profile --size tiny --phase eval --calls 5
  python -m experiments.benchmarks profile --size vitb --dump /tmp/hlo_vitb      # + XLA dump (text HLO)

The step is built exactly as the `step` benchmark builds it (`stepcase.build_phase`, default
switches), compiled, called once to warm up, then `--calls` calls are traced with
`jax.profiler`. Each executed XLA operation (a thunk of the CPU runtime: a dot, a fusion, a copy,
a custom call, ...) is an event named after its HLO instruction; the event durations are summed
per kind of instruction, read from the optimised HLO (`compiled.as_text()`):

* dot (2-D): a dot with a weight (QKV, projections, MLP, adapters, heads) or its gradient;
  dot (batched): a dot with batch dimensions (attention scores and A·V, per image and head);
  dot (fusion): a fusion around a dot;
* conv: the patch embedding (and its gradient);
* fusion (elementwise / reduce): fused elementwise work, LayerNorm, softmax, GELU, reductions;
* layout: transposes, copies and fusions that only move data (transpose, copy, bitcast, reshape,
  slice, concatenate, pad, broadcast);
* linalg: eigh / SVD / QR / triangular solve custom calls (L_orth's basis, if in the step);
* other.

and per part of the step, from the instruction's `op_name` metadata: forward, backward
(`transpose(` in the name) and the remat recomputation inside the backward
(`rematted_computation`), and per pass of `NTKCL` (`_block0`, `_channel_pass`, ...). The tables
give event time per call, its share of the traced wall time and the operation counts. Events of
independent operations can overlap on the CPU's threads, so shares can add up to more than 100 %
(compare shares with each other, not with the wall time). Dots also get GFLOP (from the HLO
shapes) per second of event time. XLA's own `cost_analysis()` (FLOPs, bytes accessed) is printed
too; `--json` keeps every operation's time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import tempfile
import time
from typing import Any

from experiments.benchmarks import harness
from experiments.benchmarks.stepcase import SWITCH_DEFAULTS, build_phase, make_call

LAYOUT_OPS = {
  "transpose",
  "copy",
  "bitcast",
  "reshape",
  "slice",
  "dynamic-slice",
  "dynamic-update-slice",
  "concatenate",
  "pad",
  "broadcast",
  "copy-start",
  "copy-done",
  "parameter",
  "constant",
  "get-tuple-element",
  "tuple",
  "iota",
}
LINALG_TARGETS = ("syevd", "gesdd", "gesvd", "geqrf", "orgqr", "trsm", "potrf", "getrf", "eig")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\b([a-z][a-z0-9\-]*)\((.*)$")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def parse_hlo(text: str) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
  """Instruction name -> {"opcode", "calls", "op_name", "target", "computation"}, and
  computation name -> the opcodes it holds."""
  instrs: dict[str, dict[str, Any]] = {}
  comps: dict[str, list[str]] = collections.defaultdict(list)
  comp = None
  for line in text.splitlines():
    if line.rstrip().endswith("{") and "=" not in line.split("{")[0].split("(")[0]:
      m = _COMP.match(line)
      comp = m.group(1) if m else None
      continue
    m = _INSTR.match(line)
    if not m or comp is None:
      continue
    name, opcode, rest = m.groups()
    calls = re.search(r"calls=%?([\w.\-]+)", rest)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    target = re.search(r'custom_call_target="([^"]*)"', rest)
    shape = re.search(r"=\s*(.*?)\s+" + re.escape(opcode) + r"\(", line)
    operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
    lhs_c = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
    instrs[name] = {
      "opcode": opcode,
      "shape": shape.group(1) if shape else "",
      "operands": operands,
      "lhs_contracting": [int(v) for v in lhs_c.group(1).split(",") if v] if lhs_c else [],
      "calls": calls.group(1) if calls else None,
      "op_name": op_name.group(1) if op_name else "",
      "target": target.group(1) if target else "",
      "computation": comp,
      "line": rest if opcode == "dot" else "",
    }
    comps[comp].append(opcode)
  return instrs, comps


def _dims(shape: str) -> list[int]:
  m = re.search(r"\[([\d,]*)\]", shape)
  return [int(v) for v in m.group(1).split(",") if v] if m else []


def dot_flops(info: dict[str, Any], instrs: dict[str, dict[str, Any]]) -> float:
  """2·(output elements)·(contracted size) of a plain `dot` instruction; 0 otherwise."""
  if info["opcode"] != "dot" or not info["operands"]:
    return 0.0
  out, lhs = _dims(info["shape"]), _dims(instrs.get(info["operands"][0], {}).get("shape", ""))
  k = 1
  for d in info["lhs_contracting"]:
    k *= lhs[d] if d < len(lhs) else 1
  n = 1
  for d in out:
    n *= d
  return 2.0 * n * k


def kind_of(info: dict[str, Any], comps: dict[str, list[str]]) -> str:
  """The kind of one executed instruction (see the module docstring)."""
  op = info["opcode"]
  inner = comps.get(info["calls"] or "", []) if op == "fusion" else [op]
  if op == "custom-call":
    t = info["target"].lower()
    if any(k in t for k in LINALG_TARGETS):
      return "linalg"
    return "dot" if ("matmul" in t or "dot" in t) else f"custom-call:{info['target']}"
  if "convolution" in inner:
    return "conv"
  if "dot" in inner:
    if op == "dot":
      return "dot (batched)" if "lhs_batch_dims" in info.get("line", "") else "dot (2-D)"
    return "dot (fusion)"
  if all(o in LAYOUT_OPS for o in inner):
    return "layout"
  if any(o in ("reduce", "reduce-window") for o in inner):
    return "fusion (reduce)"
  if op in ("fusion", "add", "multiply", "subtract", "divide", "exponential", "select", "maximum"):
    return "fusion (elementwise)"
  return op


def part_of(op_name: str) -> str:
  """forward, backward, or the remat recomputation inside the backward, from `op_name`."""
  if "rematted_computation" in op_name:
    return "remat recompute"
  if "transpose(" in op_name:
    return "backward"
  return "forward"


PASSES = ("_block0", "_plain_pass", "_channel_pass", "_patch_pass", "fusion")


def pass_of(op_name: str) -> str:
  """Which pass of `NTKCL` (or "loss/optimizer") an operation belongs to, from `op_name`."""
  for name in PASSES:
    if f"NTKCL.{name}" in op_name or f"NTKCL/{name}" in op_name:
      return name.strip("_")
  return "loss/optimizer/other"


def trace_events(log_dir: str) -> list[tuple[str, float]]:
  """(event name, duration s) of every XLA-operation event in the trace under `log_dir`."""
  import jax

  path = glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True)[0]
  data = jax.profiler.ProfileData.from_file(path)
  out = []
  for plane in data.planes:
    for line in plane.lines:
      if line.name == "python":
        continue
      for e in line.events:
        if e.name.startswith(("end: ", "ThreadpoolListener", "$")):
          continue
        out.append((e.name, e.duration_ns * 1e-9))
  return out


def profile(cfg: dict[str, Any], calls: int, dump: str | None) -> dict[str, Any]:
  import jax

  built = build_phase(cfg)
  t0 = time.perf_counter()
  compiled = built["fn"].lower(*built["args"]).compile()
  compile_s = time.perf_counter() - t0
  text = compiled.as_text()
  if dump:
    os.makedirs(dump, exist_ok=True)
    with open(os.path.join(dump, f"{cfg['size']}_{cfg['phase']}_optimized.hlo.txt"), "w") as f:
      f.write(text)
  instrs, comps = parse_hlo(text)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  call = make_call(built, compiled)
  call(0)
  with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    with jax.profiler.trace(d):
      for i in range(calls):
        call(i + 1)
    wall = time.perf_counter() - t0
    events = trace_events(d)
  by_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
  by_part: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
  by_kind_part: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
  by_pass: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
  top: dict[str, float] = collections.defaultdict(float)
  dot_rates: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
  unmatched: dict[str, float] = collections.defaultdict(float)
  for name, dur in events:
    info = instrs.get(name)
    if info is None:
      unmatched[name] += dur
      continue
    k, p, q = kind_of(info, comps), part_of(info["op_name"]), pass_of(info["op_name"])
    for table, key in (
      (by_kind, k),
      (by_part, p),
      (by_kind_part, f"{p} | {k}"),
      (by_pass, f"{q} | {p}"),
    ):
      table[key][0] += dur
      table[key][1] += 1
    top[name] += dur
    if k.startswith("dot"):
      dot_rates[f"{p} | {k}"][0] += dur
      dot_rates[f"{p} | {k}"][1] += dot_flops(info, instrs)
  total_events = sum(v[0] for v in by_kind.values())

  def rows(table):
    return sorted(
      (
        {
          "key": key,
          "s_per_call": t / calls,
          "share_of_wall": t / wall,
          "count_per_call": n / calls,
        }
        for key, (t, n) in table.items()
      ),
      key=lambda r: -r["s_per_call"],
    )

  return {
    "cfg": cfg,
    "cpu": harness.cpu_name(),
    "load_avg": os.getloadavg(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "compile_s": compile_s,
    "calls": calls,
    "wall_s_per_call": wall / calls,
    "events_s_per_call": total_events / calls,
    "unmatched_s_per_call": sum(unmatched.values()) / calls,
    "top_unmatched": sorted(unmatched.items(), key=lambda kv: -kv[1])[:20],
    "xla_flops": float(cost.get("flops", 0.0)),
    "xla_bytes_accessed": float(cost.get("bytes accessed", 0.0)),
    "xla_transcendentals": float(cost.get("transcendentals", 0.0)),
    "by_kind": rows(by_kind),
    "by_part": rows(by_part),
    "by_part_kind": rows(by_kind_part),
    "by_pass": rows(by_pass),
    "dot_gflop_per_event_s": {
      key: {
        "event_s_per_call": t / calls,
        "gflop_per_call": f / 1e9 / calls,
        "gflop_per_event_s": f / 1e9 / t if t else None,
      }
      for key, (t, f) in sorted(dot_rates.items())
    },
    "op_seconds": {n: t / calls for n, t in top.items()},
    "top_ops": [
      {"name": n, "s_per_call": t / calls, "kind": kind_of(instrs[n], comps)}
      for n, t in sorted(top.items(), key=lambda kv: -kv[1])[:25]
    ],
  }


def print_profile(r: dict[str, Any]) -> None:
  print(
    f"{r['cfg']['size']} {r['cfg']['phase']} ptm={r['cfg']['ptm']}: {r['wall_s_per_call']:.3f} s "
    f"per call (events {r['events_s_per_call']:.3f} s), compile {r['compile_s']:.1f} s, XLA "
    f"{r['xla_flops'] / 1e9:.0f} GFLOP, {r['xla_bytes_accessed'] / 1e9:.1f} GB accessed; "
    f"CPU {r['cpu']}, load {r['load_avg'][0]:.2f}"
  )
  for title, key in (
    ("kind", "by_kind"),
    ("part", "by_part"),
    ("part | kind", "by_part_kind"),
    ("pass | part", "by_pass"),
  ):
    print(f"\n{'by ' + title:<42} {'s/call':>8} {'share':>6} {'ops/call':>8}")
    for row in r[key]:
      print(
        f"{row['key']:<42} {row['s_per_call']:8.3f} {row['share_of_wall']:6.1%} "
        f"{row['count_per_call']:8.0f}"
      )
  print("\ndots: GFLOP per call and GFLOP per second of event time (2 threads may overlap)")
  for key, v in r["dot_gflop_per_event_s"].items():
    rate = v["gflop_per_event_s"]
    print(
      f"  {key:<40} {v['event_s_per_call']:8.3f} s {v['gflop_per_call']:8.1f} GFLOP "
      f"{rate if rate is None else round(rate, 1)} GFLOP/s"
    )
  print("\ntop operations")
  for row in r["top_ops"][:15]:
    print(f"  {row['name']:<50} {row['kind']:<22} {row['s_per_call']:.3f} s")


def add_arguments(p: argparse.ArgumentParser) -> None:
  """The `profile` subcommand's options."""
  p.add_argument("--size", choices=("vitb", "tiny"), default="vitb")
  p.add_argument("--phase", choices=("train", "eval"), default="train")
  p.add_argument("--ptm", action="store_true", help="with the PTM pass")
  p.add_argument("--calls", type=int, default=2, help="traced calls after one warm-up")
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--dump", default=None, help="write the optimised HLO text here")
  p.add_argument("--json", default=None, help="write the result to this JSON file")


def run(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
  """Runs the `profile` benchmark; `p.error` reports a bad option."""
  cfg = {
    "size": args.size,
    "ptm": args.ptm,
    "dtype": "float32",
    "phase": args.phase,
    "repeats": args.calls,
    "batch": args.batch,
    **SWITCH_DEFAULTS,
  }
  r = profile(cfg, args.calls, args.dump)
  print_profile(r)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(r, f, indent=1)
  return 0
