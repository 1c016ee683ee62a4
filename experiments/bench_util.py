"""Measurement helpers shared by the benchmark scripts (memory, call timing, worker processes).

Each benchmark runs every configuration in a fresh worker process (`run_worker_process`), so the
peak RSS it reports is that configuration's own; the worker prints one line
``BENCH_RESULT <json>`` that the parent reads back.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def proc_status_bytes(field: str) -> int:
  """A `/proc/self/status` memory field ("VmRSS", "VmHWM") in bytes; 0 where /proc is missing."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def peak_rss_bytes() -> int:
  """This process's peak RSS (`getrusage` ru_maxrss; it includes compilation) in bytes."""
  kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return kb if sys.platform == "darwin" else kb * 1024  # macOS reports bytes, Linux KiB


def matmul_rate(
  matmul: Callable[[], Any], n: int, dtype: str, repeats: int, budget_s: float = 60.0
) -> dict[str, Any]:
  """FLOP/s of `matmul()`, one finished (n, n) @ (n, n) product (2n³ FLOPs) per call.

  One untimed warm-up call, then up to `repeats` timed calls (fewer if `budget_s` runs out).
  Returns median and best FLOP/s, FLOPs per CPU-second of this process (less sensitive to other
  jobs on a shared machine), the call times and the 1-minute load average after.
  """
  matmul()
  times, cpu, start = [], [], time.perf_counter()
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    matmul()
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
    if time.perf_counter() - start > budget_s:
      break
  flops = 2.0 * n**3
  return {
    "n": n,
    "dtype": dtype,
    "median_flop_s": flops / statistics.median(times),
    "best_flop_s": flops / min(times),
    "flop_per_cpu_s": flops / statistics.median(cpu),
    "times_s": times,
    "load_avg": os.getloadavg()[0],
  }


def rate_line(rate: dict[str, Any], when: str) -> str:
  """One printed line for a `matmul_rate` result measured `when` ("before", "after")."""
  return (
    f"dot {rate['n']}^3 {rate['dtype']} {when}: {rate['median_flop_s'] / 1e9:.1f} GFLOP/s median, "
    f"{rate['best_flop_s'] / 1e9:.1f} best (load {rate['load_avg']:.1f})"
  )


def larger_rate(before: dict[str, Any], after: dict[str, Any]) -> tuple[float, float]:
  """(median FLOP/s, FLOPs per CPU-second), each the larger of two `matmul_rate` results: other
  jobs on a shared machine only ever slow a measurement down."""
  return (
    max(before["median_flop_s"], after["median_flop_s"]),
    max(before["flop_per_cpu_s"], after["flop_per_cpu_s"]),
  )


def run_worker_process(script: str, cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
  """Runs `python script --worker <cfg json>` and returns its BENCH_RESULT (or an "error")."""
  cmd = [sys.executable, os.path.abspath(script), "--worker", json.dumps(cfg)]
  env = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
  }
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
  except subprocess.TimeoutExpired:
    return {**cfg, "error": f"timed out after {timeout:.0f} s (raise --worker-timeout)"}
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX) :])
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
  return {**cfg, "error": f"worker exited {proc.returncode}: " + " | ".join(tail)}


def print_result(result: dict[str, Any]) -> None:
  """The worker's side of `run_worker_process`."""
  print(RESULT_PREFIX + json.dumps(result), flush=True)
