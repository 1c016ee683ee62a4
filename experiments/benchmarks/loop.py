"""Does the trainer keep the device busy? Trainer vs jitted step, host pipeline rate, feed threads.

Three measurements in one process:

1. **loop**: over one task of a config (default: the demo), the trainer's own images/s
   (`train.run`, its `summary["train_loop_time"]`: steps after the compiling first one, end-of-epoch
   fetches and checkpoints included) against the same jitted step (`steps.build_programs`'s
   `train_step`, assembled as the trainer assembles it) alone on batches placed beforehand. The two alternate (step, trainer, step, ...) and the
   ratio uses the mean of the step-alone runs around each trainer run.
2. **pipeline**: the host pipeline's rate (decode + train transform + ÷255 + batch assembly,
   `TaskStream.train_batches` with one worker thread) in images per wall second and per CPU
   second of this process ("per core"): at 224 px with the ViT-B/16 train transform
   (RandomResizedCrop scale (0.05, 1) + flip) from synthetic uint8 sources of two sizes
   (32x32 as CIFAR-100, 500x375 as a decoded ImageNet-R/DomainNet JPEG; no JPEG decode), and at
   the demo geometry (28 px from 28x28).
3. **feed**: how many host threads feed a given step time. The estimate is
   ceil(B / step_s / per-core rate) (linear scaling assumed); the measurement runs the real
   prefetcher (`ntkcl_jax.prefetch`) with n stream worker threads against a simulated accelerator step
   (a sleep: it uses no host CPU, as a GPU/TPU step does) of --feed-step-ms (default: 0.7 x the
   one-thread host batch time, so one thread cannot keep up), and reports the ratio achieved vs
   the step alone for n = 1 .. --max-threads and the smallest n with ratio >= 0.95.

  python -m experiments.benchmarks loop          # demo geometry, about 3-5 min on 2 cores
  python -m experiments.benchmarks loop --json   # ... and one JSON object, printed last
  python -m experiments.benchmarks loop --override train.batch_size=64 --pipeline-images 256

Timings on a shared machine are noisy: compare ratios within one run, not across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import statistics
import tempfile
import time
from typing import Any

import jax
import numpy as np

from experiments.benchmarks import harness, stepcase
from ntkcl_jax import build_stream, initial_params, prefetch
from ntkcl_jax import run as train_run
from ntkcl_jax.data import ArraySource, TaskStream, class_order

DEMO = os.path.join(harness.ROOT, "experiments", "configs", "demo.py")


def cpu_model() -> str:
  return harness.cpu_name(platform.processor() or "unknown")


def load_config(spec: str, overrides: list[str]):
  """`path.py[:arg]` → its `get_config(arg)`, then `key=value` overrides typed like the default."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  c = module.get_config(arg or None)
  for item in overrides:
    key, _, value = item.partition("=")
    section, _, name = key.rpartition(".")
    node = c[section] if section else c
    old = node[name]
    if isinstance(old, bool):
      node[name] = value.lower() in ("1", "true", "yes")
    elif isinstance(old, (int, float)):
      node[name] = type(old)(value)
    else:
      node[name] = value
  return c


# ------------------------------------------------------------------------------------------------
# 1. Trainer vs the jitted step alone.


def step_alone_setup(config, stream: TaskStream, num_batches: int):
  """The trainer's compiled step for task 0 (`steps.build_programs`, assembled as the trainer
  assembles it: `stepcase.assemble_config`) with `num_batches` batches placed beforehand."""
  plan, method, stack, programs = stepcase.assemble_config(config)
  params = initial_params(config, method.spec)
  k_t, s_t = stream.splits[0]
  B = plan.batch_size
  protos = np.zeros((plan.num_classes, method.feature_dim), np.float32)
  host = stream.train_batches(0, 0, B, seed=config.seed)
  host_batches = []
  for b in host:
    host_batches.append({k: b[k] for k in ("image", "label", "mask")})
    if len(host_batches) == num_batches:
      break
  host.close()
  steps = stream.steps_per_epoch(0, B)
  state, health, frozen, aux, _, schedule = stepcase.train_args(
    plan, method, stack, programs, [(params, protos, host_batches[0])], (0, k_t, s_t), steps
  )
  batches = [stack.put_batch(b, B) for b in host_batches]
  step = programs.train_step
  box = {"state": state, "health": health}

  def run(n: int) -> float:
    """Seconds for n steps, dispatched back to back, one sync at the end."""
    t0 = time.perf_counter()
    for j in range(n):
      box["state"], box["health"], terms = step(
        box["state"], box["health"], frozen, aux, batches[j % len(batches)], schedule
      )
    jax.block_until_ready(terms)
    return time.perf_counter() - t0

  t0 = time.perf_counter()
  run(1)  # compile
  return run, time.perf_counter() - t0


def trainer_rate(config) -> dict[str, Any]:
  with tempfile.TemporaryDirectory() as workdir:
    summary = train_run(config, workdir)
  timing = summary["train_loop_time"][0]
  return {**timing, "img_s": timing["images"] / timing["seconds"]}


def bench_loop(config, repeats: int) -> dict[str, Any]:
  config = config_lib_copy(config, {"train.max_tasks": 1, "analysis.enabled": False})
  stream = build_stream(config)
  B = config.train.batch_size
  steps = stream.steps_per_epoch(0, B) * config.train.epochs
  run_step, compile_s = step_alone_setup(config, stream, num_batches=4)
  timed = steps - 1  # the trainer times every step after its first
  alone, trainer = [], []
  alone.append(B * timed / run_step(timed))
  for _ in range(repeats):
    trainer.append(trainer_rate(config))
    alone.append(B * timed / run_step(timed))
  ratios = [
    tr["img_s"] / statistics.mean(alone[j : j + 2]) for j, tr in enumerate(trainer)
  ]  # each trainer run against the step-alone runs before and after it
  return {
    "config": {
      **{f"backbone.{k}": v for k, v in config.backbone.to_dict().items()},
      **{f"train.{k}": v for k, v in config.train.to_dict().items()},
      "data.name": config.data.name,
    },
    "batch_size": B,
    "timed_steps": timed,
    "step_compile_s": compile_s,
    "step_alone_img_s": alone,
    "trainer_img_s": [tr["img_s"] for tr in trainer],
    "checkpoint_seconds": [round(tr["checkpoint_seconds"], 2) for tr in trainer],
    "ratio": ratios,
    "ratio_median": statistics.median(ratios),
    "step_ms": 1e3 * B / statistics.median(alone),
  }


def config_lib_copy(config, changes: dict[str, Any]):
  c = config.copy_and_resolve_references()
  for key, value in changes.items():
    section, _, name = key.rpartition(".")
    (c[section] if section else c)[name] = value
  return c


# ------------------------------------------------------------------------------------------------
# 2. Host pipeline rate; 3. threads to feed a step.


def synthetic_stream(
  source_hw: tuple[int, int],
  image_size: int,
  n: int,
  crop_scale_min: float,
  num_workers: int,
  resize_size: int | None = None,
) -> TaskStream:
  """One task of n random uint8 (H, W, 3) images in two classes."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, *source_hw, 3), dtype=np.uint8)
  labels = np.arange(n) % 2
  src = ArraySource(images, labels, ["a", "b"], name="synthetic")
  return TaskStream(
    src,
    src,
    order=class_order(0, 2),
    init_cls=2,
    increment=2,
    image_size=image_size,
    resize_size=resize_size or image_size,
    crop_scale=(crop_scale_min, 1.0),
    num_workers=num_workers,
  )


def pipeline_rate(stream: TaskStream, batch_size: int, repeats: int = 2) -> dict[str, Any]:
  """Images per wall second and per CPU second over one epoch (best of `repeats`)."""
  best = None
  for r in range(repeats):
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    for b in stream.train_batches(0, r, batch_size, seed=0):
      n += int(b["mask"].sum())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    res = {"images": n, "img_s": n / wall, "img_per_cpu_s": n / max(cpu, 1e-9)}
    if best is None or res["img_s"] > best["img_s"]:
      best = res
  best["batch_ms"] = 1e3 * batch_size / best["img_s"]
  return best


def feed_ratio(stream: TaskStream, batch_size: int, step_s: float, prefetch_size: int) -> float:
  """(steps x step_s) / wall over one epoch: the prefetcher feeding a sleeping 'device' step."""
  steps = stream.steps_per_epoch(0, batch_size)
  it = prefetch(stream.train_batches(0, 0, batch_size, seed=0), None, prefetch_size)
  with contextlib.closing(it):
    next(it)  # the first batch has nothing to hide behind (the compile step, in a real run)
    time.sleep(step_s)
    t0 = time.perf_counter()
    for _ in it:
      time.sleep(step_s)
    wall = time.perf_counter() - t0
  return (steps - 1) * step_s / wall


def bench_feed(args, demo_rate: dict[str, Any]) -> dict[str, Any]:
  B = args.feed_batch
  one_thread_ms = 1e3 * B / demo_rate["img_s"]
  step_ms = args.feed_step_ms or args.feed_step_fraction * one_thread_ms
  measured, enough = [], None
  for n in range(1, args.max_threads + 1):
    stream = synthetic_stream((28, 28), 28, args.feed_images, 0.35, n, 32)
    ratio = feed_ratio(stream, B, step_ms / 1e3, args.prefetch)
    measured.append({"threads": n, "ratio": ratio})
    if enough is None and ratio >= 0.95:
      enough = n
  return {
    "geometry": "demo (28 px from 28x28)",
    "batch_size": B,
    "one_thread_batch_ms": one_thread_ms,
    "step_ms": step_ms,
    "threads_estimate": math.ceil(one_thread_ms / step_ms),
    "measured": measured,
    "threads_for_095": enough,
  }


def threads_needed(per_core_img_s: float, batch_size: int, step_ms: float) -> int:
  """Cores whose combined rate (linear scaling) builds one batch per step."""
  return math.ceil(batch_size / (step_ms / 1e3) / per_core_img_s)


def add_arguments(p: argparse.ArgumentParser) -> None:
  """The `loop` subcommand's options."""
  p.add_argument("--config", default=DEMO, help="config file[:args] for the loop measurement")
  p.add_argument("--override", action="append", default=[], help="key=value (repeatable)")
  p.add_argument("--repeats", type=int, default=2, help="trainer runs (alternating with steps)")
  p.add_argument("--skip-loop", action="store_true", help="pipeline and feed only")
  p.add_argument("--skip-host", action="store_true", help="loop only (no pipeline, no feed)")
  p.add_argument("--pipeline-size", type=int, default=224, help="output side of the ViT transform")
  p.add_argument("--pipeline-images", type=int, default=128, help="images per pipeline epoch")
  p.add_argument("--pipeline-batch", type=int, default=32)
  p.add_argument("--feed-batch", type=int, default=32)
  p.add_argument("--feed-images", type=int, default=1024)
  p.add_argument("--feed-step-ms", type=float, default=0.0)
  p.add_argument("--feed-step-fraction", type=float, default=0.7)
  p.add_argument("--max-threads", type=int, default=os.cpu_count() or 1)
  p.add_argument("--prefetch", type=int, default=2, help="prefetch queue size")
  p.add_argument(
    "--step-ms", type=float, action="append", default=[], help="also size threads for these steps"
  )
  p.add_argument("--json", action="store_true", help="print one JSON object last")


def run(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
  """Runs the `loop` benchmark; `p.error` reports a bad option."""

  out: dict[str, Any] = {
    "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    "cpu": cpu_model(),
    "cpu_count": os.cpu_count(),
    "load_avg_start": os.getloadavg()[0],
    "backend": harness.device_info(),
  }
  # 2. host pipeline first (no compiled program competing for the cores yet)
  P = args.pipeline_size
  if not args.skip_host:
    host_part(args, out)
  if not args.skip_loop:
    config = load_config(args.config, args.override)
    loop = bench_loop(config, args.repeats)
    out["loop"] = loop
    print(
      f"loop: trainer {[round(x) for x in loop['trainer_img_s']]} img/s vs step alone "
      f"{[round(x) for x in loop['step_alone_img_s']]} img/s; ratio {loop['ratio_median']:.3f} "
      f"(step {loop['step_ms']:.1f} ms, B={loop['batch_size']}, {loop['timed_steps']} steps; "
      f"checkpoint saves {loop['checkpoint_seconds']} s, not in the trainer's time)"
    )
    args.step_ms.append(loop["step_ms"])
  if not args.skip_host:
    per_core = out["pipeline"][f"{P}px_from_375x500"]["img_per_cpu_s"]
    out["threads_needed"] = [
      {
        "step_ms": ms,
        "batch_size": args.pipeline_batch,
        "pipeline": f"{P}px_from_375x500",
        "cores": threads_needed(per_core, args.pipeline_batch, ms),
      }
      for ms in args.step_ms
    ]
    for t in out["threads_needed"]:
      print(
        f"{P} px pipeline feeding a {t['step_ms']:.1f} ms step of {t['batch_size']}: "
        f"{t['cores']} core(s) (linear scaling from one core)"
      )
  out["load_avg_end"] = os.getloadavg()[0]
  if args.json:
    print(json.dumps(out, default=str))
  return 0


def host_part(args, out: dict[str, Any]) -> None:
  """Pipeline rates (2.) and feed threads (3.) into `out`."""
  P = args.pipeline_size
  out["pipeline"] = {
    f"{P}px_from_32x32": pipeline_rate(
      synthetic_stream((32, 32), P, args.pipeline_images, 0.05, 1), args.pipeline_batch
    ),
    f"{P}px_from_375x500": pipeline_rate(
      synthetic_stream((375, 500), P, args.pipeline_images, 0.05, 1), args.pipeline_batch
    ),
    "demo_28px_from_28x28": pipeline_rate(
      synthetic_stream((28, 28), 28, max(args.pipeline_images, 512), 0.35, 1, 32),
      args.pipeline_batch,
    ),
  }
  for name, r in out["pipeline"].items():
    print(
      f"pipeline {name}: {r['img_s']:.0f} img/s (1 thread), {r['img_per_cpu_s']:.0f} img per "
      f"CPU-second, {r['batch_ms']:.1f} ms per batch of {args.pipeline_batch}"
    )
  out["feed"] = bench_feed(args, out["pipeline"]["demo_28px_from_28x28"])
  f = out["feed"]
  print(
    f"feed: step {f['step_ms']:.2f} ms vs one-thread host batch {f['one_thread_batch_ms']:.2f} ms;"
    f" ratio by threads {[(m['threads'], round(m['ratio'], 3)) for m in f['measured']]}; "
    f">= 0.95 with {f['threads_for_095']} thread(s) (estimate {f['threads_estimate']})"
  )
