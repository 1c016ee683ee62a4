"""The preflight command (`python -m ntkcl_jax.preflight`): exit 0 all fit, 1 one does not, 2 usage."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from ntkcl_jax.preflight import UnknownTargetError, format_report, preflight, resolve_target
from ntkcl_jax.preflight.report import mib


def main(
  config: Any, target_name: str, json_path: str | None, functions: Sequence[str] | None = None
) -> int:
  """The command: 0 when every function fits, 1 when one does not, 2 (via `cli.fail`) on a
  usage error (unknown target, invalid config)."""
  from ntkcl_jax.cli import fail

  try:
    target = resolve_target(target_name)
  except UnknownTargetError as e:
    fail(str(e))
  try:
    report = preflight(config, target, functions)
  except (ValueError, NotImplementedError) as e:
    fail(str(e))
  print(format_report(report))
  if json_path:
    with open(json_path, "w") as f:
      json.dump(report, f, indent=1)
      f.write("\n")
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
