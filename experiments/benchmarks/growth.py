"""Cost per task as the task stream grows: wall time and memory per task through `train.run`.

Command (from the repository root)::

  python -m experiments.benchmarks growth                      # 10 tasks x 1 class, tiny ViT
  python -m experiments.benchmarks growth --json --tasks 10 --train-per-class 128 --epochs 2

Runs the real trainer (`ntkcl_jax.train.run`) on the demo geometry (28 px, patch 4, width 64,
depth 4, heads 4, MLP 128, batch 32) with Animal-MNIST (or `--data fashion_mnist`) split into
`--tasks` tasks of one class each (init_cls = increment = 1), a capped number of training images
per class (so every task has the same number of steps) and a small test cap (evaluation covers
the test sets of all tasks seen so far, so its cost grows with t by design; keep it small).
The backbone is random unless `--backbone PATH` (cost does not depend on the weights).

`metrics.jsonl` has no timestamps, so a `TaskHook` records, at the end of every task (after its
training, EMA, prototypes, evaluation and checkpoint): wall time, the process's current RSS
(VmRSS) and its high-water mark (VmHWM, = ru_maxrss). Steps per task come from the eval lines'
cumulative `step`. Task 0 includes data loading and every compilation, so the variation ratios
(max/min, targets: time < 1.10, memory < 1.05) are computed over tasks 1..T-1; the time ratio is
given both per task and per training step. A max/min ratio also holds the noise of a shared
machine (one slow task), so the least-squares trend per task (relative to the mean) is printed
too: growth shows there, noise mostly does not.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any

import numpy as np

from experiments.benchmarks import harness


class TimingHook:
  """Wall time, RSS and high-water mark at the end of each task (a `ntkcl_jax.hooks.TaskHook`)."""

  def __init__(self, t_start: float):
    self.t_start = t_start
    self.records: list[dict[str, Any]] = []

  def on_init(self, view) -> None:
    del view

  def on_task_end(self, view) -> None:
    self.records.append(
      {
        "task": view.task,
        "num_seen": view.num_seen,
        "t": time.perf_counter() - self.t_start,
        "rss_bytes": harness.proc_status_bytes("VmRSS"),
        "hwm_bytes": harness.proc_status_bytes("VmHWM"),
      }
    )

  def summary(self) -> dict[str, Any]:
    return {"growth_timing": self.records}


def growth_table(records: list[dict[str, Any]], steps_cum: list[int]) -> dict[str, Any]:
  """Per-task durations and the max/min ratios over tasks 1..T-1 (task 0 holds compilation)."""
  rows, prev_t, prev_s = [], 0.0, 0
  for rec, s in zip(records, steps_cum):
    dt, steps = rec["t"] - prev_t, s - prev_s
    rows.append({**rec, "seconds": dt, "steps": steps, "s_per_step": dt / max(steps, 1)})
    prev_t, prev_s = rec["t"], s
  later = rows[1:]
  out: dict[str, Any] = {"tasks": rows}
  if len(later) >= 2:
    ratio = lambda k: max(r[k] for r in later) / min(r[k] for r in later)  # noqa: E731

    def slope(k):  # least-squares change per task, relative to the mean over tasks 1..T-1
      y = np.array([r[k] for r in later], np.float64)
      return float(np.polyfit(np.arange(len(y)), y, 1)[0] / y.mean())

    out.update(
      time_ratio=ratio("seconds"),
      time_per_step_ratio=ratio("s_per_step"),
      rss_ratio=ratio("rss_bytes"),
      hwm_ratio=ratio("hwm_bytes"),
      time_slope_per_task=slope("seconds"),
      rss_slope_per_task=slope("rss_bytes"),
      time_ok=ratio("seconds") < 1.10,
      rss_ok=ratio("rss_bytes") < 1.05,
    )
  return out


def add_arguments(p: argparse.ArgumentParser) -> None:
  """The `growth` subcommand's options."""
  p.add_argument("--data", choices=("animal_mnist", "fashion_mnist"), default="animal_mnist")
  p.add_argument("--tasks", type=int, default=10, help="tasks of one class each (<= 10)")
  p.add_argument("--train-per-class", type=int, default=128)
  p.add_argument("--test-per-class", type=int, default=16)
  p.add_argument("--epochs", type=int, default=2)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--mode", choices=("reference", "corrected"), default="reference")
  p.add_argument("--backbone", default="", help="AugReg .npz of the tiny geometry (default random)")
  p.add_argument("--workdir", default="", help="fresh directory (default: a temporary one)")
  p.add_argument("--json", action="store_true", help="print one JSON object on the last line")


def run(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
  """Runs the `growth` benchmark; `p.error` reports a bad option."""

  import logging

  from experiments.configs import demo
  from ntkcl_jax import run as train_run

  logging.getLogger("ntkcl_jax").setLevel(logging.ERROR)
  c = demo.get_config(f"mode={args.mode}")
  c.data.name = args.data
  c.data.init_cls, c.data.increment = 1, 1
  c.data.max_train_per_class = args.train_per_class
  c.data.max_test_per_class = args.test_per_class
  c.backbone.checkpoint_path = args.backbone
  c.train.epochs = args.epochs
  c.train.batch_size = args.batch
  c.train.max_tasks = args.tasks
  c.train.log_every_steps = 10**6
  c.train.checkpoint_every_steps = 0

  workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="bench_growth_"))
  if (workdir / "config.json").exists():
    p.error(f"--workdir {workdir} holds a run; give a fresh directory (a resumed run has no costs)")
  load_before = os.getloadavg()[0]
  t0 = time.perf_counter()
  hook = TimingHook(t0)
  summary = train_run(c, workdir, hooks=[hook])
  total_s = time.perf_counter() - t0
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  steps_cum = [x["step"] for x in lines if x.get("kind") == "eval"]
  table = growth_table(hook.records, steps_cum)
  if not args.workdir:
    shutil.rmtree(workdir, ignore_errors=True)

  print(
    f"{args.data}, {args.tasks} tasks x 1 class, {args.train_per_class} train / "
    f"{args.test_per_class} test images per class, {args.epochs} epochs, batch {args.batch}, "
    f"mode {args.mode}; total {total_s:.1f} s; load average {load_before:.1f} -> "
    f"{os.getloadavg()[0]:.1f}"
  )
  print(f"{'task':>4} {'seen':>4} {'steps':>5} {'s':>7} {'s/step':>7} {'RSS MB':>7} {'HWM MB':>7}")
  for r in table["tasks"]:
    print(
      f"{r['task']:4d} {r['num_seen']:4d} {r['steps']:5d} {r['seconds']:7.2f} "
      f"{r['s_per_step']:7.3f} {r['rss_bytes'] / 2**20:7.1f} {r['hwm_bytes'] / 2**20:7.1f}"
    )
  if "time_ratio" in table:
    print(
      f"tasks 1..{len(table['tasks']) - 1} max/min: time {table['time_ratio']:.3f} "
      f"(per step {table['time_per_step_ratio']:.3f}; target < 1.10: "
      f"{'ok' if table['time_ok'] else 'MISSED'}), RSS {table['rss_ratio']:.3f} "
      f"(target < 1.05: {'ok' if table['rss_ok'] else 'MISSED'}), "
      f"high-water {table['hwm_ratio']:.3f}"
    )
    print(
      f"least-squares trend over tasks 1..{len(table['tasks']) - 1}: time "
      f"{100 * table['time_slope_per_task']:+.2f}% per task, RSS "
      f"{100 * table['rss_slope_per_task']:+.2f}% per task (0 = flat; the max/min ratios above "
      "also hold the noise of a shared machine)"
    )
  if args.json:
    print(
      json.dumps({**table, "total_s": total_s, "avg_acc": summary["avg_acc"], "args": vars(args)})
    )
  return 0
