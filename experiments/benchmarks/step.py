"""Throughput, FLOPs, memory and compile time of the jitted NTK-CL train and eval steps.

Commands (from the repository root)::

  python -m experiments.benchmarks step --size tiny                       # demo geometry, quick
  python -m experiments.benchmarks step --size vitb --repeats 3           # ViT-B/16 224 px, batch 16
  python -m experiments.benchmarks step --size all --ablate --json        # per-change table, JSON last
  python -m experiments.benchmarks step --size vitb --ptm off --dtype bfloat16 --repeats 2

What is measured, per configuration (size × PTM pass × dtype × optimisation switches) and phase:

* train: the trainer's own jitted step, `steps.build_programs(...).train_step`, assembled from the
  run plan as the trainer assembles it (`stepcase.assemble`: SGD with momentum and weight decay on
  the trainable partition, the full reference-mode loss: three CEs, L_MI, L_orth, L_reg; lr and key
  from the step counter; the non-finite check; state donated), at task 1 of the stream (k_t = s_t
  = 10 for ViT-B, 2 for tiny).
* eval: `Programs.predict`: eval-mode features and the section-weighted prototype logits
  (top-1/top-5), C = 100 (ViT-B) or 10 (tiny) classes.

The backbone is random (geometry is what matters for cost). Compile time (`lower` + `compile`)
and the first call are reported apart; the step time is the median and min of `--repeats` further
calls, each ended by `block_until_ready`. Every (configuration, phase) runs in a fresh subprocess,
so its peak memory is its own: host peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`, which includes
compilation) on CPU, the device's `memory_stats()["peak_bytes_in_use"]` on GPU/TPU; XLA's planned
temporary buffer (`compiled.memory_analysis().temp_size_in_bytes`) is printed too. The dense
matmul rate (a jitted n×n @ n×n dot, 2n³ FLOPs, float32 and bfloat16) is measured in this process
on the same device, before and after the configurations, to turn FLOP/s into a utilisation ratio.

Layout: this module is the subcommand and the parent (matmul rate, configurations, rounds,
baselines); `stepcase.py` builds and times one (configuration, phase) and holds the sizes and
switches; `ntkcl_jax.flops` holds `analytic_flops`; `step_tables.py` prints the tables; `harness.py` has the timing loop, memory
fields, worker processes and JSON output shared with the PyTorch baseline.

FLOPs per image come from XLA (`compiled.cost_analysis()["flops"]` / batch; it counts a dot as
2·M·N·K plus one per elementwise op) and from the analytic count of `analytic_flops` (matmuls
only, 2 per multiply-add; the formula is in its docstring).

Optimisation switches: `--no-share-block0` computes the embedding and block 0 in every pass,
`--no-cls-only` runs the last block on all tokens, `--remat {none,dots,full}` picks what each block
stores for the backward pass (`ModelSpec`); `--grad-frozen` also differentiates the frozen backbone
and EMA bank (what a step without the trainable/frozen split computes), `--no-donate` keeps the
state buffers undonated (train step only). `--ablate` runs, per size and PTM setting, all
optimisations on (the default) against each one changed alone (`ABLATIONS`; a train-only change
is measured on the train step only), and prints the ratio table.

Baseline for the float32 all_on rows: `--vs-official DIR` runs, right after each of our (PTM,
phase) workers, the official NTK-CL step itself (`experiments/parity/bench_official.py`: the
released code, unmodified, through the parity stand-ins; needs `pip install torch==2.13.0`) and
prints ours/official ratios of images/s and peak RSS from the same run; rounds alternate the
order. (The project's own PyTorch re-implementation of the step, `--vs-torch`, was retired in
favour of the official code.) The figures quoted in the performance targets (`REFERENCE`,
measured on other 2-core CPUs) are printed too, for orientation.

  python -m experiments.benchmarks step --size vitb --vs-official /tmp/ntkcl_official --rounds 2  # the
      # official step itself (experiments/parity/bench_official.py), same run, alternating order
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import time
from typing import Any

from experiments.benchmarks import harness
from experiments.benchmarks.step_tables import (
  ABLATIONS,
  ablation_table,
  print_reference,
  print_results,
  print_vs_baseline,
  variant,
)
from experiments.benchmarks.stepcase import (
  SWITCH_DEFAULTS,
  TRAIN_ONLY,
)

WORKER = "experiments.benchmarks.stepcase:run_worker"
BASELINES = {  # framework -> worker (PyTorch workers: no JAX imported there)
  "official": "experiments.parity.bench_official:run_worker",
}


def dot_rate(n: int, dtype: str, repeats: int) -> dict[str, Any]:
  """FLOP/s of a jitted (n, n) @ (n, n) dot in `dtype` (`harness.matmul_rate`)."""
  import jax
  import jax.numpy as jnp

  a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.dtype(dtype)) for i in (0, 1))
  f = jax.jit(jnp.dot)
  return harness.matmul_rate(lambda: jax.block_until_ready(f(a, b)), n, dtype, repeats)


def run_baseline(
  framework: str, cfg: dict[str, Any], timeout: float, **extra: Any
) -> dict[str, Any]:
  """A PyTorch baseline's worker (`BASELINES`: `parity/bench_official.py`, the released code
  itself, unmodified, through the parity stand-ins) for the same size, PTM, phase, repeats and
  batch, in its own process with all CPU threads, tagged as this command's all_on float32
  configuration."""
  keys = ("size", "ptm", "phase", "repeats", "batch")
  bcfg = {**{k: cfg[k] for k in keys}, "threads": os.cpu_count() or 1, **extra}
  r = harness.run_worker_process(BASELINES[framework], bcfg, timeout)
  return {**r, "dtype": "float32", **SWITCH_DEFAULTS, "framework": framework}


def add_arguments(p: argparse.ArgumentParser) -> None:
  """The `step` subcommand's options."""
  p.add_argument("--size", choices=("vitb", "tiny", "all"), default="tiny")
  p.add_argument("--ptm", choices=("off", "on", "both"), default="both", help="PTM pass")
  p.add_argument("--dtype", default="float32", help="float32, bfloat16 or both comma-separated")
  p.add_argument("--phase", choices=("train", "eval", "both"), default="both")
  p.add_argument("--repeats", type=int, default=None, help="timed calls (default 10 tiny, 3 ViT-B)")
  p.add_argument("--batch", type=int, default=None, help="override the size's batch")
  p.add_argument("--no-share-block0", action="store_true")
  p.add_argument("--no-cls-only", action="store_true")
  p.add_argument("--remat", choices=("none", "dots", "full"), default="dots")
  p.add_argument("--grad-frozen", action="store_true")
  p.add_argument("--no-donate", action="store_true")
  p.add_argument("--ablate", action="store_true", help="all on vs each switch changed alone")
  p.add_argument("--rounds", type=int, default=1, help="repeat all configs, alternating order")
  p.add_argument("--dot-size", type=int, default=2048)
  p.add_argument("--dot-repeats", type=int, default=5)
  p.add_argument("--no-subprocess", action="store_true", help="one process (peak RSS then mixes)")
  p.add_argument("--worker-timeout", type=float, default=3600.0)
  p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
  p.add_argument(
    "--vs-official",
    metavar="DIR",
    default=None,
    help="time the official NTK-CL step itself (extracted checkout DIR, run unmodified through "
    "experiments/parity's stand-ins) beside ours, alternating order",
  )
  p.add_argument(
    "--xla-flags", default=None, help="extra XLA_FLAGS for this run and its workers (appended)"
  )


def run(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
  """Runs the `step` benchmark; `p.error` reports a bad option combination."""
  if args.xla_flags:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()

  if args.vs_official and importlib.util.find_spec("torch") is None:
    p.error("--vs-official needs PyTorch: pip install torch==2.13.0 (the CPU wheel)")

  import jax

  dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
  for d in dtypes:
    if d not in ("float32", "bfloat16"):
      p.error(f"--dtype {d!r}: choose float32 and/or bfloat16")
  sizes = ["tiny", "vitb"] if args.size == "all" else [args.size]
  ptms = {"off": [False], "on": [True], "both": [False, True]}[args.ptm]
  phases = ["train", "eval"] if args.phase == "both" else [args.phase]
  chosen = {
    "share_block0": not args.no_share_block0,
    "last_block_cls_only": not args.no_cls_only,
    "remat": args.remat,
    "grad_frozen": args.grad_frozen,
    "donate": not args.no_donate,
  }
  variants = (
    [{**SWITCH_DEFAULTS, **over} for over, _ in ABLATIONS.values()] if args.ablate else [chosen]
  )

  dev = jax.local_devices()[0]
  print(
    f"device: {dev.platform} {dev.device_kind} x{jax.device_count()}, jax {jax.__version__}, "
    f"{os.cpu_count()} CPUs, load average {os.getloadavg()}, "
    f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
  )
  dot_fns = {
    d: (lambda d=d: dot_rate(args.dot_size, d, args.dot_repeats)) for d in ("float32", "bfloat16")
  }
  dots_before = harness.dot_rates(dot_fns, "before")

  results, official_results = [], []
  # Rounds alternate the variant order (A B C D, D C B A, ...); tables use each best round.
  for rnd in range(args.rounds):
    order = harness.alternate(variants, rnd)
    for size, ptm, dtype, sw, phase in itertools.product(sizes, ptms, dtypes, order, phases):
      if args.ablate and phase == "eval" and any(sw[k] != SWITCH_DEFAULTS[k] for k in TRAIN_ONLY):
        continue  # the eval step is the all_on one
      repeats = args.repeats or (10 if size == "tiny" else 3)
      cfg = {
        "size": size,
        "ptm": ptm,
        "dtype": dtype,
        "phase": phase,
        "repeats": repeats,
        "batch": args.batch,
        **sw,
      }
      baseline = dtype == "float32" and variant(sw) == "all_on"
      frameworks = ["jax"] + (["official"] if args.vs_official and baseline else [])
      for framework in harness.alternate(frameworks, rnd):
        t0 = time.perf_counter()
        if framework == "jax":
          r = harness.run_config(WORKER, cfg, not args.no_subprocess, args.worker_timeout)
        else:
          r = run_baseline(framework, cfg, args.worker_timeout, official=args.vs_official)
        (results if framework == "jax" else official_results).append(r)
        label = f"{framework} {size} ptm={ptm} {dtype} {variant(sw)} {phase}"
        print(harness.progress_line(time.perf_counter() - t0, rnd, label, r), flush=True)

  dots_after = harness.dot_rates(dot_fns, "after")
  larger = {d: harness.larger_rate(dots_before[d], dots_after[d]) for d in dots_before}
  dots = {d: rate for d, (rate, _) in larger.items()}
  dots_cpu = {d: per_cpu for d, (_, per_cpu) in larger.items()}
  print(
    "\nGFLOP/s and /dot32 use the analytic count and the larger of the two float32 dot medians "
    f"({dots['float32'] / 1e9:.1f} GFLOP/s); RSS = peak host RSS of the phase's own process "
    "(device peak on accelerators); temp = XLA's planned temporary buffer; load = 1-min load "
    "average after the phase; /dotcpu = the step's analytic FLOPs per CPU-second of its process "
    "over the dot's (less sensitive to other jobs on the machine).\n"
  )
  print_results(results, dots, dots_cpu)
  ref_rows = print_reference(results)
  official_rows = print_vs_baseline(
    results, official_results, "the official NTK-CL step itself (torch column = official)"
  )
  abl_rows = ablation_table(results) if args.ablate else []
  return harness.finish(
    args.json,
    {
      "device": f"{dev.platform} {dev.device_kind}",
      "jax": jax.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      **harness.dot_fields(dots_before, dots_after, dots, dots_cpu),
      "results": results,
      "reference": ref_rows,
      "official_results": official_results,
      "vs_official": official_rows,
      "ablation": abl_rows,
    },
  )
