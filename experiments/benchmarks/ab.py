"""Side-by-side timing of variants of the jitted NTK-CL step, in one process, call by call.

Commands (from the repository root)::

  python -m experiments.benchmarks ab --size vitb --phase train --variants base,remat_dots_all --rounds 3
  python -m experiments.benchmarks ab --size vitb --phase eval --variants base,concurrency_sched

Every variant is built and compiled in this process (`stepcase.build_phase`, each with its
own inputs and donated state), then the variants are called in turn, alternating the order each
round (A B, B A, A B, ...), so a slow spell on a shared machine hits them alike. A variant changes
the model switches (the `step` benchmark's cfg keys, e.g. remat) and/or XLA compiler options of its
compilation only (`compile(compiler_options=...)`, the per-executable form of `XLA_FLAGS`).
Reported per variant: median and min call time, and the median over rounds of its time divided by
the first variant's in the same round (< 1: faster). `--check` also compares the variants' loss
terms (train) or predictions (eval) on call 0 against the first variant's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

from experiments.benchmarks import harness
from experiments.benchmarks.stepcase import SWITCH_DEFAULTS, build_phase, make_call

# name -> (cfg overrides, XLA compiler options)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
  "base": ({}, {}),
  "remat_none": ({"remat": "none"}, {}),
  "remat_dots_all": ({"remat": "dots_all"}, {}),
  "remat_full": ({"remat": "full"}, {}),
  "concurrency_sched": ({}, {"xla_cpu_enable_concurrency_optimized_scheduler": True}),
  "no_concurrency_sched": ({}, {"xla_cpu_enable_concurrency_optimized_scheduler": False}),
  "xnnpack": ({}, {"xla_cpu_use_xnnpack": True}),
  "onednn": ({}, {"xla_cpu_use_onednn": True}),
  "no_fusion_emitters": ({}, {"xla_cpu_use_fusion_emitters": False}),
  "vector_width_512": ({}, {"xla_cpu_prefer_vector_width": 512}),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
  """The `ab` subcommand's options."""
  p.add_argument("--size", choices=("vitb", "tiny"), default="vitb")
  p.add_argument("--phase", choices=("train", "eval"), default="train")
  p.add_argument("--ptm", action="store_true")
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--variants", default="base,remat_dots_all", help=f"from {sorted(VARIANTS)}")
  p.add_argument("--rounds", type=int, default=3, help="timed calls per variant")
  p.add_argument("--check", action="store_true", help="compare call-0 outputs with the first")
  p.add_argument("--json", default=None, help="write the result to this JSON file")


def run(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
  """Runs the `ab` benchmark; `p.error` reports a bad option."""
  import jax
  import numpy as np

  names = [v.strip() for v in args.variants.split(",") if v.strip()]
  for n in names:
    if n not in VARIANTS:
      p.error(f"unknown variant {n!r}; valid: {sorted(VARIANTS)}")
  print(
    f"CPU {harness.cpu_name()}, {os.cpu_count()} CPUs, jax {jax.__version__}, load "
    f"{os.getloadavg()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
    flush=True,
  )
  calls, first, compile_s = {}, {}, {}
  for n in names:
    over, options = VARIANTS[n]
    cfg = {
      "size": args.size,
      "ptm": args.ptm,
      "dtype": "float32",
      "phase": args.phase,
      "repeats": args.rounds,
      "batch": args.batch,
      **SWITCH_DEFAULTS,
      **over,
    }
    built = build_phase(cfg)
    t0 = time.perf_counter()
    compiled = built["fn"].lower(*built["args"]).compile(compiler_options=options or None)
    compile_s[n] = time.perf_counter() - t0
    calls[n] = make_call(built, compiled)
    first[n] = jax.device_get(calls[n](0))  # warm-up
    print(f"{n}: compiled in {compile_s[n]:.1f} s", flush=True)
  times: dict[str, list[float]] = {n: [] for n in names}
  for rnd in range(args.rounds):
    for n in harness.alternate(names, rnd):
      t0 = time.perf_counter()
      calls[n](rnd + 1)
      times[n].append(time.perf_counter() - t0)
    print(f"round {rnd}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names), flush=True)
  base = names[0]
  rows = []
  for n in names:
    ratios = [t / b for t, b in zip(times[n], times[base])]
    rows.append(
      {
        "variant": n,
        "overrides": VARIANTS[n][0],
        "compiler_options": VARIANTS[n][1],
        "compile_s": compile_s[n],
        "times_s": times[n],
        "median_s": statistics.median(times[n]),
        "min_s": min(times[n]),
        "time_ratio_median": statistics.median(ratios),
        "time_ratio_of_medians": statistics.median(times[n]) / statistics.median(times[base]),
      }
    )
    if args.check:
      a = jax.tree_util.tree_leaves(first[base])
      b = jax.tree_util.tree_leaves(first[n])
      rows[-1]["max_abs_diff_call0"] = max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(a, b)
      )
  print(f"\n{'variant':<22} {'median s':>9} {'min s':>8} {'ratio':>7}  (ratio: median per round)")
  for r in rows:
    extra = f"  max|diff| {r['max_abs_diff_call0']:.3g}" if "max_abs_diff_call0" in r else ""
    print(
      f"{r['variant']:<22} {r['median_s']:9.2f} {r['min_s']:8.2f} "
      f"{r['time_ratio_median']:7.3f}{extra}"
    )
  out = {
    "cpu": harness.cpu_name(),
    "load_avg_end": os.getloadavg(),
    "size": args.size,
    "phase": args.phase,
    "ptm": args.ptm,
    "batch": args.batch,
    "rounds": args.rounds,
    "rows": rows,
  }
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return 0
