"""The preflight command (`python -m ntkcl_jax.preflight`): exit 0 all fit, 1 one does not, 2 usage.

With `--max-seeds` / `--max-batch` it searches the largest stacked seed count / per-seed train
batch that fits (`capacity.search`): exit 0 with an answer, 1 when not even the smallest fits.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from ntkcl_jax.preflight import UnknownTargetError, format_report, preflight, resolve_target
from ntkcl_jax.preflight import capacity as capacity_lib
from ntkcl_jax.preflight.report import mib


def main(
  config: Any,
  target_name: str,
  json_path: str | None,
  functions: Sequence[str] | None = None,
  max_seeds: bool = False,
  max_batch: bool = False,
  max_ntk_block: bool = False,
  capacity_limit: int | None = None,
  slices: int = 1,
) -> int:
  """The command: 0 when every function fits, 1 when one does not, 2 (via `cli.fail`) on a
  usage error (unknown target, invalid config, both searches at once).

  Args:
    max_seeds / max_batch / max_ntk_block: search the largest K stacked seeds /
      `train.batch_size` / NTK probe block (`analysis.batch_size`) that fits instead (0: an
      answer, 1: not even the smallest fits); `functions` is then ignored.
    capacity_limit: the largest value searched (default `capacity.DEFAULT_LIMITS`).
    slices: compile for a multi-slice job of `slices` copies of the target slice.
  """
  from ntkcl_jax.cli import fail

  searches = {
    capacity_lib.SEEDS: max_seeds,
    capacity_lib.BATCH: max_batch,
    capacity_lib.NTK_BLOCK: max_ntk_block,
  }
  asked = [what for what, on in searches.items() if on]
  if len(asked) > 1:
    fail(
      f"{', '.join(capacity_lib.FLAGS[w] for w in asked)} search one at a time; pass one of them."
    )
  if capacity_limit is not None and capacity_limit < 1:
    fail(f"--capacity-limit={capacity_limit} must be >= 1.")
  try:
    target = resolve_target(target_name, slices)
  except UnknownTargetError as e:
    fail(str(e))
  if asked:
    return _capacity(config, target, asked[0], capacity_limit, json_path)
  try:
    report = preflight(config, target, functions)
  except (ValueError, NotImplementedError) as e:
    fail(str(e))
  print(format_report(report))
  _write_json(json_path, report)
  bad = [r["function"] for r in report["functions"] if not r.get("fits", True)]
  if bad:
    print(
      f"error: {', '.join(bad)} does not fit in the {mib(report['chip']['hbm_bytes'])} HBM of a "
      f"{report['chip']['name']} chip on {target.name}; lower train.batch_size / eval.batch_size, "
      "use --config.model.remat=full, or a larger slice.",
      file=sys.stderr,
    )
    return 1
  return 0


def _write_json(json_path: str | None, report: dict[str, Any]) -> None:
  if json_path:
    with open(json_path, "w") as f:
      json.dump(report, f, indent=1)
      f.write("\n")


def _capacity(config: Any, target: Any, what: str, limit: int | None, json_path: str | None) -> int:
  """`--max-seeds` / `--max-batch`: the search, its report and exit status."""
  from ntkcl_jax.cli import fail

  if target.chip is None:
    fail(
      f"{capacity_lib.FLAGS[what]} needs a TPU or GPU target (memory to fit); got {target.name}."
    )
  try:
    report, capacity = capacity_lib.search(
      config,
      target,
      what,
      limit,
      on_probe=lambda r: print(capacity_lib.format_probe(what, r), file=sys.stderr, flush=True),
    )
  except (ValueError, NotImplementedError) as e:
    fail(str(e))
  if report is None:
    fail(
      f"{capacity_lib.FLAGS[what]}: no valid value in 1..{capacity['limit']} for the mesh of "
      f"{target.name} ({len(target.devices)} devices); check train.batch_size / eval.batch_size / "
      "train.seed_axis_size."
    )
  print(format_report(report))
  print()
  print(capacity_lib.format_capacity(capacity))
  _write_json(json_path, {**report, "capacity": capacity})
  hbm = f"the {mib(report['chip']['hbm_bytes'])} HBM of a {report['chip']['name']} chip on {target.name}"
  if capacity["answer"] is None:
    smallest = capacity["smallest_valid"]
    if what == capacity_lib.SEEDS:
      change = "lower train.batch_size, use --config.model.remat=full, or a larger slice"
      value = f"{smallest} seed{'s' * (smallest > 1)}"
    elif what == capacity_lib.NTK_BLOCK:
      change = "lower analysis.projection_dim or use analysis.implementation=2"
      value = f"a probe block of {smallest}"
    else:
      change = "use fewer --config.seeds, --config.model.remat=full, or a larger slice"
      value = f"train.batch_size={smallest}"
    print(f"error: not even {value} fits in {hbm}; {change}.", file=sys.stderr)
    return 1
  if not capacity["confirmed_fits"]:
    bad = [r["function"] for r in report["functions"] if not r.get("fits", True)]
    print(
      f"error: at {capacity['search']}={capacity['answer']} the train step fits but "
      f"{', '.join(bad)} {'do' if len(bad) > 1 else 'does'} not fit in {hbm}; lower "
      "eval.batch_size.",
      file=sys.stderr,
    )
    return 1
  return 0
