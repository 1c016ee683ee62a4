"""The one timing and measurement library of the benchmarks: memory fields, call timing, the
matmul rate, worker processes and JSON output.

Each benchmark runs every configuration in a fresh worker process (`run_worker_process`), so the
peak RSS it reports is that configuration's own. A worker is named by its function's import path,
``"package.module:function"`` (a function of one JSON-able dict returning one); the parent runs
``python -m experiments.benchmarks.harness <target> <cfg json>``, and the worker prints one line
``BENCH_RESULT <json>`` that the parent reads back.

Pure Python (no JAX, no NumPy): `parity/bench_official.py` runs through it in PyTorch workers
whose peak RSS is the measurement.
"""

from __future__ import annotations

import importlib
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
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def cpu_name(fallback: str = "cpu") -> str:
  """The CPU's model name from `/proc/cpuinfo`, or `fallback`."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return fallback


def device_info() -> dict[str, Any]:
  """What JAX runs on: backend, device kind, device and process counts, jax version (the fields
  of the trainer's `summary.json` "backend"). Imports JAX."""
  import jax

  return {
    "backend": jax.default_backend(),
    "device_kind": jax.devices()[0].device_kind,
    "device_count": jax.device_count(),
    "local_device_count": jax.local_device_count(),
    "process_count": jax.process_count(),
    "jax_version": jax.__version__,
  }


def peak_rss_bytes() -> int:
  """This process's peak RSS (`getrusage` ru_maxrss; it includes compilation) in bytes."""
  kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return kb if sys.platform == "darwin" else kb * 1024  # macOS reports bytes, Linux KiB


def time_calls(call: Callable[[int], Any], repeats: int, batch: int) -> tuple[Any, dict[str, Any]]:
  """Times `call(i)`: call 0 is the warm-up (compilation, caches), reported apart as
  `first_call_s`; calls 1..`repeats` are timed (wall and CPU time of this process).

  Returns call 0's result and the timing fields of a benchmark row: `first_call_s`, `times_s`,
  `median_s`, `min_s`, `img_s` and `img_s_best` (`batch` images per call), `cpu_s`,
  `median_cpu_s`. `call` must finish its work before returning (`block_until_ready`).
  """
  t0 = time.perf_counter()
  first = call(0)
  first_call_s = time.perf_counter() - t0
  times, cpu_times = [], []
  for i in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    call(i + 1)
    times.append(time.perf_counter() - t0)
    cpu_times.append(time.process_time() - c0)
  median = statistics.median(times)
  return first, {
    "first_call_s": first_call_s,
    "times_s": times,
    "median_s": median,
    "min_s": min(times),
    "img_s": batch / median,
    "img_s_best": batch / min(times),
    "cpu_s": cpu_times,
    "median_cpu_s": statistics.median(cpu_times),
  }


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


def dot_rates(rate_fns: dict[str, Callable[[], dict[str, Any]]], when: str) -> dict[str, Any]:
  """{dtype: `matmul_rate` result} of each `rate_fns[dtype]()`, each printed (`rate_line`)."""
  rates = {dtype: fn() for dtype, fn in rate_fns.items()}
  for rate in rates.values():
    print(rate_line(rate, when))
  return rates


def larger_rate(before: dict[str, Any], after: dict[str, Any]) -> tuple[float, float]:
  """(median FLOP/s, FLOPs per CPU-second), each the larger of two `matmul_rate` results: other
  jobs on a shared machine only ever slow a measurement down."""
  return (
    max(before["median_flop_s"], after["median_flop_s"]),
    max(before["flop_per_cpu_s"], after["flop_per_cpu_s"]),
  )


def resolve(target: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
  """The worker function named by `target`, ``"package.module:function"``."""
  module, _, name = target.partition(":")
  return getattr(importlib.import_module(module), name)


def run_worker_process(target: str, cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
  """Runs worker `target` on `cfg` in a fresh process and returns its BENCH_RESULT (or an
  "error")."""
  cmd = [sys.executable, "-m", "experiments.benchmarks.harness", target, json.dumps(cfg)]
  env = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
  }
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
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


def run_config(
  target: str, cfg: dict[str, Any], subprocess_mode: bool, timeout: float
) -> dict[str, Any]:
  """Worker `target` on `cfg` in a fresh process, or in this one (peak RSS then mixes)."""
  if not subprocess_mode:
    return resolve(target)(cfg)
  return run_worker_process(target, cfg, timeout)


def print_header(head: str) -> None:
  """A result table's column line, underlined."""
  print(head)
  print("-" * len(head))


def dot_fields(before: Any, after: Any, flop_s: Any, flop_per_cpu_s: Any) -> dict[str, Any]:
  """The matmul-rate fields of a script's JSON output (before / after the runs, the larger)."""
  return {
    "dot_before": before,
    "dot_after": after,
    "dot_flop_s": flop_s,
    "dot_flop_per_cpu_s": flop_per_cpu_s,
  }


def finish(as_json: bool, payload: dict[str, Any]) -> int:
  """Prints `payload` as one JSON object on the last line (`--json`) and returns the exit status:
  1 if any of `payload["results"]` is an error, else 0."""
  if as_json:
    print(json.dumps(payload))
  return 1 if any("error" in r for r in payload["results"]) else 0


def alternate(items: list[Any], rnd: int) -> list[Any]:
  """`items` in round `rnd`'s order: as given in even rounds, reversed in odd ones, so a slow
  spell on a shared machine does not always hit the same item (tables keep the best round)."""
  return items if rnd % 2 == 0 else items[::-1]


def progress_line(seconds: float, rnd: int, label: str, result: dict[str, Any]) -> str:
  """One printed progress line: elapsed time, round, configuration and images/s (or the error)."""
  status = result.get("error") or f"{result['img_s']:.3g} img/s"
  return f"  [{seconds:6.1f} s] round {rnd} {label}: {status}"


def _worker_main(argv: list[str]) -> int:
  """``python -m experiments.benchmarks.harness <target> <cfg json>``: one worker's run."""
  if len(argv) != 2:
    print("usage: python -m experiments.benchmarks.harness <module:function> <cfg json>")
    return 2
  print_result(resolve(argv[0])(json.loads(argv[1])))
  return 0


if __name__ == "__main__":
  sys.exit(_worker_main(sys.argv[1:]))
