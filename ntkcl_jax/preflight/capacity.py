"""Capacity search for the preflight command: how many stacked seeds (`--max-seeds`) or how large
a per-seed train batch (`--max-batch`) the target's per-device HBM holds.

`largest_fitting` is the search, on any predicate: a doubling phase from the smallest valid value,
then a bisection between the last value that fits and the first that does not, over valid values
only. It assumes fitting is monotone (if v fits, every smaller valid value fits) and compiles
nothing itself. Its answer is maximal in the sense that the next valid value above it was probed
and does not fit (or the answer is the largest valid value below the limit); values further up are
not checked.

`search` drives it with deviceless compiles (`preflight.preflight`): per probe it compiles only
the train step (the memory driver; every function when the method takes no steps), then confirms
the answer with a full preflight of all functions. The valid values are those the mesh accepts
(`seeds.seed_layout` / `sharding.check_batch_size`): seed counts whose (seed, data) layout splits
every batch evenly, batch sizes that are multiples of the data axis.

Stacked seeds on the auto layout (`train.seed_axis_size=0`: the seed axis is gcd(devices, K) wide)
are not strictly monotone: K = 3 on 4 devices puts all 3 seeds on every device, K = 4 one per
device. The answer is then the largest K the search reached, not necessarily the largest that
fits; set `train.seed_axis_size` to search one layout.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from ntkcl_jax.preflight.report import mib

SEEDS = "seeds"
BATCH = "train.batch_size"
NTK_BLOCK = "analysis.batch_size"
FLAGS = {SEEDS: "--max-seeds", BATCH: "--max-batch", NTK_BLOCK: "--max-ntk-block"}
DEFAULT_LIMITS = {SEEDS: 1024, BATCH: 65536, NTK_BLOCK: 4096}
# What each search compiles per probe: the train step (the memory driver of a run), or the NTK
# hook's kernel for a pair of probe blocks.
PROBED = {SEEDS: ("train_step",), BATCH: ("train_step",), NTK_BLOCK: ("ntk_block",)}


@dataclasses.dataclass(frozen=True)
class Search:
  """`largest_fitting`'s result: the answer (None: not even the smallest valid value fits, or no
  value is valid) and every probe as (value, fits), in the order probed."""

  answer: int | None
  probes: tuple[tuple[int, bool], ...]


def valid_values(valid: Callable[[int], bool] | Sequence[int], lo: int, hi: int) -> list[int]:
  """The valid values in [lo, hi], ascending: those `valid(v)` accepts, or those listed."""
  if callable(valid):
    return [v for v in range(lo, hi + 1) if valid(v)]
  return sorted({int(v) for v in valid if lo <= v <= hi})


def largest_fitting(
  fits: Callable[[int], bool], valid: Callable[[int], bool] | Sequence[int], lo: int, hi: int
) -> Search:
  """The largest valid value in [lo, hi] for which `fits` holds, assuming it is monotone.

  Doubling: from the smallest valid value v, probe the smallest valid value >= 2v (the largest
  valid value when none is) until one does not fit; then bisect over the valid values strictly
  between the last that fits and the first that does not. Each value is probed at most once.

  Args:
    fits: value → whether it fits (e.g. a compile).
    valid: value → whether the value may be probed, or the valid values themselves.
    lo, hi: the range searched, 1 <= lo (doubling needs a positive start).
  """
  if lo < 1:
    raise ValueError(f"largest_fitting: lo={lo} must be >= 1.")
  values = valid_values(valid, lo, hi)
  probes: list[tuple[int, bool]] = []

  def probe(i: int) -> bool:
    ok = bool(fits(values[i]))
    probes.append((values[i], ok))
    return ok

  if not values or not probe(0):
    return Search(None, tuple(probes))
  good, bad = 0, len(values)  # indices: the largest known to fit, the smallest known not to
  while good < len(values) - 1:
    i = min(bisect.bisect_left(values, 2 * values[good]), len(values) - 1)
    if probe(i):
      good = i
    else:
      bad = i
      break
  while bad - good > 1:
    mid = (good + bad) // 2
    if probe(mid):
      good = mid
    else:
      bad = mid
  return Search(values[good], tuple(probes))


# What the mesh accepts.


def seed_count_valid(
  num_devices: int, batch_sizes: dict[str, int], seed_axis_size: int = 0
) -> Callable[[int], bool]:
  """K → whether K stacked seeds lay out on `num_devices` with these batch sizes
  (`seeds.seed_layout`: the seed axis divides K and the devices, every batch the data axis)."""
  from ntkcl_jax.seeds import seed_layout

  def valid(k: int) -> bool:
    try:
      seed_layout(k, num_devices, batch_sizes, seed_axis_size=seed_axis_size or None)
    except ValueError:
      return False
    return True

  return valid


def batch_size_valid(
  num_devices: int, num_seeds: int, stacked: bool, seed_axis_size: int = 0
) -> Callable[[int], bool]:
  """B → whether a per-seed train batch of B rows splits evenly over the data axis (all devices in
  a plain run, devices / seed axis in a stacked one)."""
  if not stacked:
    return lambda b: b % num_devices == 0
  n_seed = seed_axis_size or math.gcd(num_devices, num_seeds)
  if num_devices % n_seed or num_seeds % n_seed:  # an invalid seed_axis_size: nothing lays out
    return lambda b: False
  n_data = num_devices // n_seed
  return lambda b: b % n_data == 0


def seeds_text(k: int) -> str:
  """K → the `config.seeds` of K stacked seeds: "0,1,...,K-1"."""
  return ",".join(str(s) for s in range(k))


def with_value(config: ml_collections.ConfigDict, what: str, value: int) -> Any:
  """A copy of `config` with K = `value` stacked seeds (`what` = SEEDS) or `train.batch_size`."""
  c = ml_collections.ConfigDict(config.to_dict())
  if what == SEEDS:
    c.seeds = seeds_text(value)
  elif what == BATCH:
    c.train.batch_size = int(value)
  elif what == NTK_BLOCK:
    c.analysis.batch_size = int(value)
  else:
    raise ValueError(f"unknown capacity search {what!r}; one of {', '.join(FLAGS)}.")
  return c


def valid_for(config: ml_collections.ConfigDict, what: str, num_devices: int) -> Callable:
  """The validity predicate of `what` for `config` on `num_devices` devices."""
  from ntkcl_jax.config import run_seeds

  if what == NTK_BLOCK:  # the kernel runs on one device: any block size
    return lambda b: True
  axis = int(config.train.seed_axis_size)
  if what == SEEDS:
    sizes = {"train.batch_size": config.train.batch_size, "eval.batch_size": config.eval.batch_size}
    return seed_count_valid(num_devices, sizes, axis)
  return batch_size_valid(num_devices, len(run_seeds(config)), bool(config.seeds), axis)


# The search with compiles.


def _probe_record(value: int, report: dict[str, Any]) -> dict[str, Any]:
  peaks = [
    r["memory_per_device"]["peak_bytes"] for r in report["functions"] if "memory_per_device" in r
  ]
  return {
    "value": value,
    "fits": report["fits"],
    "peak_bytes": max(peaks) if peaks else None,
    "functions": [r["function"] for r in report["functions"]],
    "compile_s": round(sum(r["compile_s"] for r in report["functions"]), 2),
    "mesh": report["mesh"],
  }


def search(
  config: ml_collections.ConfigDict,
  target: Any,
  what: str,
  limit: int | None = None,
  preflight: Callable[..., dict[str, Any]] | None = None,
  on_probe: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """The largest K seeds / train batch of `config` whose compiled functions fit `target`.

  Args:
    what: SEEDS or BATCH.
    limit: the largest value searched (default `DEFAULT_LIMITS[what]`).
    preflight: `preflight.preflight` (a stand-in in tests).
    on_probe: called with each probe's record as it completes (the command prints progress).
  Returns:
    (report, capacity): the full preflight report at the answer (at the smallest valid value when
    none fits: its searched functions only), and the search: answer, probes (value, fits, peak
    bytes per device, compile s, mesh), compile times.
  """
  if preflight is None:
    from ntkcl_jax.preflight import preflight
  limit = DEFAULT_LIMITS[what] if limit is None else int(limit)
  functions: Sequence[str] | None = PROBED[what]
  reports: dict[int, dict[str, Any]] = {}
  records: dict[int, dict[str, Any]] = {}

  def fits(value: int) -> bool:
    nonlocal functions
    report = preflight(with_value(config, what, value), target, functions)
    if not report["functions"] and functions is not None:  # the method takes no steps
      functions = None
      report = preflight(with_value(config, what, value), target, functions)
    reports[value], records[value] = report, _probe_record(value, report)
    if on_probe is not None:
      on_probe(records[value])
    return bool(report["fits"])

  t0 = time.perf_counter()
  valid = valid_for(config, what, len(target.devices))
  values = valid_values(valid, 1, limit)
  result = largest_fitting(fits, values, 1, limit)
  probe_s = sum(records[v]["compile_s"] for v, _ in result.probes)
  confirm_s = 0.0
  if result.answer is None:
    report = reports[values[0]] if values else None
  elif functions is None or what == NTK_BLOCK:  # the probe compiled all there is to confirm
    report = reports[result.answer]
  else:
    report = preflight(with_value(config, what, result.answer), target, None)
    confirm_s = sum(r["compile_s"] for r in report["functions"])
  capacity = {
    "search": what,
    "flag": FLAGS[what],
    "answer": result.answer,
    "seeds": seeds_text(result.answer) if what == SEEDS and result.answer else None,
    "limit": limit,
    "smallest_valid": values[0] if values else None,
    "largest_valid": values[-1] if values else None,
    "at_limit": bool(values) and result.answer == values[-1],
    "probed_functions": list(functions) if functions is not None else "all",
    "probes": [records[v] for v, _ in result.probes],
    "probe_compile_s": round(probe_s, 2),
    "confirm_compile_s": round(confirm_s, 2),
    "compile_s_total": round(probe_s + confirm_s, 2),
    "wall_s": round(time.perf_counter() - t0, 1),
    "confirmed_fits": None if report is None or result.answer is None else report["fits"],
  }
  return report, capacity


def format_probe(what: str, record: dict[str, Any]) -> str:
  """One probe as a progress line."""
  peak = record["peak_bytes"]
  return (
    f"probe {what}={record['value']} (mesh {record['mesh']}): "
    f"{'fits' if record['fits'] else 'DOES NOT FIT'}, peak "
    f"{mib(peak) if peak is not None else '(XLA refused to compile)'}/device, compiled in "
    f"{record['compile_s']} s"
  )


def _what_text(what: str) -> str:
  return {
    SEEDS: "stacked seeds K",
    BATCH: "train.batch_size (per seed)",
    NTK_BLOCK: "NTK probe block (analysis.batch_size)",
  }[what]


def format_capacity(capacity: dict[str, Any]) -> str:
  """The search as text: the answer, every probe, the compile time."""
  what, answer = capacity["search"], capacity["answer"]
  probed = capacity["probed_functions"]
  probed = ", ".join(probed) if isinstance(probed, list) else "all functions"
  head = (
    f"capacity search ({capacity['flag']}, {probed} compiled per probe, valid values "
    f"{capacity['smallest_valid']}..{capacity['largest_valid']}, limit {capacity['limit']}): "
  )
  if answer is None:
    head += f"no {_what_text(what)} fits"
  else:
    head += f"largest {_what_text(what)} that fits: {answer}"
    if capacity["seeds"]:
      head += f" (--config.seeds={capacity['seeds']})" if answer <= 8 else " (--config.seeds=0,...)"
    if capacity["at_limit"]:
      head += " (the largest valid value searched; more may fit: raise --capacity-limit)"
  probes = ", ".join(
    f"{p['value']} {'fits' if p['fits'] else 'DOES NOT FIT'} "
    f"({mib(p['peak_bytes']) if p['peak_bytes'] is not None else 'XLA refused'})"
    for p in capacity["probes"]
  )
  lines = [head, f"  probes (value: peak/device): {probes}"]
  lines.append(
    f"  compile time: {capacity['probe_compile_s']} s probing + {capacity['confirm_compile_s']} s "
    f"confirming the answer with every function = {capacity['compile_s_total']} s (search "
    f"wall time {capacity['wall_s']} s)"
  )
  return "\n".join(lines)
