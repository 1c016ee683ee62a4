"""Images/s per seed of the stacked (vmapped) train step at K = 1, 2, 5 seeds.

Command (from the repository root)::

  python -m experiments.benchmarks seeds                       # demo geometry, K = 1, 2, 5
  python -m experiments.benchmarks seeds --ks 1,2,5 --rounds 3 --repeats 5 --json

What is measured: the demo's train step (`experiments/configs/demo.py`: the shipped tiny ViT
loaded from `ntkcl_jax/assets/tiny_vit_fmnist.npz`, 28 px, width 64, depth 4, batch 32, reference
mode, full loss) at task 1 (k_t = s_t = 2 of C = 10), as the trainer builds it
(`steps.build_programs`, through `stepcase.assemble_config`): with `config.seeds` = 0..K-1, the
step vmapped over K stacked seeds (one shared backbone, everything else per seed), and, as the
baseline, the plain single-run step ("plain"). Both are the trainer's loop step (lr and key from
the step counter, the non-finite check, state and health donated). All variants are
compiled first (compile time reported apart), then timed in `--rounds` rounds that alternate their
order (forward, then reversed), each variant `--repeats` calls per round ending in
`block_until_ready`; the median over all calls is reported.

Per variant: seconds per step, images/s per seed (B / step time: how fast each run advances) and
in total (K·B / step time), and `vs_sequential` = total images/s over the plain step's, i.e. how
much faster K seeds finish stacked than one after another. One device (the default CPU device);
the CPU model and load average are printed. `--json` prints one JSON object as the last line.

Measured before it timed the trainer's loop step (AMD EPYC, 2 shared CPUs, load 11-15): s/step
plain 0.48, K=1 0.55, K=2 0.86, K=5 3.13; images/s per seed 66, 58, 37, 10; in total 66, 58, 74,
51, i.e. 1.00, 0.87, 1.12, 0.77 x sequential. Two busy cores leave no idle compute for stacking to
fill; the gain is meant for accelerators, where a batch of 16-32 leaves most of a chip idle.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

from experiments.benchmarks import harness


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
  return harness.cpu_name(platform.processor() or "unknown")


def build(num_seeds: list[int], batch: int):
  """{name: (jitted step, its six arguments, K)} for "plain" and each K: the trainer's step
  (`steps.build_programs`) of the demo config, single-run and with `config.seeds` = 0..K-1."""
  import jax
  import numpy as np

  from experiments.benchmarks import stepcase
  from experiments.configs import demo
  from ntkcl_jax import init_params, load_augreg

  def variant(seeds: str):
    config = demo.get_config()
    config.seeds = seeds
    config.train.batch_size = batch
    plan, method, stack, programs = stepcase.assemble_config(config)
    spec, num_classes, (k_t, s_t) = method.spec, plan.num_classes, plan.data.splits[1]
    backbone = load_augreg(plan.backbone_path, spec.vit)
    size = spec.vit.image_size
    runs = []
    for seed in plan.seeds:
      rng = np.random.default_rng(seed)
      protos = np.zeros((num_classes, method.feature_dim), np.float32)
      protos[:k_t] = rng.normal(size=(k_t, method.feature_dim))
      host_batch = {
        "image": rng.uniform(size=(batch, size, size, 3)).astype(np.float32),
        "label": (k_t + rng.integers(0, s_t, batch)).astype(np.int32),
        "mask": np.ones(batch, bool),
      }
      runs.append((init_params(spec, jax.random.key(seed), backbone), protos, host_batch))
    args = stepcase.train_args(plan, method, stack, programs, runs, (1, k_t, s_t), 10**6)
    return programs.train_step, args, len(plan.seeds)

  variants = {"plain": variant("")}
  for k in num_seeds:
    variants[f"K={k}"] = variant(",".join(str(s) for s in range(k)))
  return variants


def measure(variants: dict[str, Any], rounds: int, repeats: int, batch: int) -> list[dict]:
  import jax

  compiled, args_of, times = {}, {}, {name: [] for name in variants}
  compile_s = {}
  for name, (fn, args, _) in variants.items():
    t0 = time.perf_counter()
    compiled[name] = fn.lower(*args).compile()
    compile_s[name] = time.perf_counter() - t0
    args_of[name] = list(args)
    out = compiled[name](*args_of[name])  # first call: untimed
    jax.block_until_ready(out)
    args_of[name][:2] = out[:2]  # (state, health): donated, carried
  names = list(variants)
  for r in range(rounds):
    for name in names if r % 2 == 0 else names[::-1]:
      for _ in range(repeats):
        t0 = time.perf_counter()
        out = compiled[name](*args_of[name])
        jax.block_until_ready(out)
        times[name].append(time.perf_counter() - t0)
        args_of[name][:2] = out[:2]
  plain = batch / statistics.median(times["plain"])
  out = []
  for name, (_, _, k) in variants.items():
    med = statistics.median(times[name])
    out.append(
      {
        "variant": name,
        "num_seeds": k,
        "batch": batch,
        "compile_s": compile_s[name],
        "median_s": med,
        "min_s": min(times[name]),
        "img_s_per_seed": batch / med,
        "img_s_total": k * batch / med,
        "vs_sequential": k * batch / med / plain,
        "times_s": times[name],
      }
    )
  return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The `seeds` subcommand's options."""
  parser.add_argument("--ks", default="1,2,5", help="numbers of stacked seeds")
  parser.add_argument("--batch", type=int, default=32, help="per-seed batch (the demo's 32)")
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--json", action="store_true", help="print one JSON object last")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
  """Runs the `seeds` benchmark; `parser.error` reports a bad option."""
  import jax

  ks = [int(k) for k in args.ks.split(",")]
  load_before = os.getloadavg()[0]
  results = measure(build(ks, args.batch), args.rounds, args.repeats, args.batch)
  dev = jax.devices()[0]
  info = {
    "cpu_model": cpu_model(),
    "cpu_count": os.cpu_count(),
    "platform": dev.platform,
    "device_kind": dev.device_kind,
    "jax": jax.__version__,
    "load_avg_before": load_before,
    "load_avg_after": os.getloadavg()[0],
    "rounds": args.rounds,
    "repeats": args.repeats,
  }
  print(f"{info['cpu_model']} ({info['cpu_count']} CPUs), {dev.device_kind}, jax {jax.__version__}")
  print(f"load average {load_before:.1f} before, {info['load_avg_after']:.1f} after")
  head = f"{'variant':8} {'K':>2} {'s/step':>8} {'img/s/seed':>10} {'img/s tot':>9} {'vs seq':>6} {'compile s':>9}"
  print(head)
  print("-" * len(head))
  for r in results:
    print(
      f"{r['variant']:8} {r['num_seeds']:2d} {r['median_s']:8.4f} {r['img_s_per_seed']:10.1f} "
      f"{r['img_s_total']:9.1f} {r['vs_sequential']:6.2f} {r['compile_s']:9.1f}"
    )
  if args.json:
    print(json.dumps({**info, "results": results}))
  return 0
