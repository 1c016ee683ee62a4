"""A run's host bookkeeping, saved in each checkpoint's JSON meta and restored on resume.

`RunProgress` is shared by the seeds of a run (task, epoch, step, saves, wall time); `SeedLog` is
what each seed writes (its steps, its metrics.jsonl size, its stage rows). A single run's meta
keeps its fields flat (as always); a stacked run's holds one `SeedLog` per seed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["RunProgress", "SeedLog", "progress_from_meta", "progress_meta"]


@dataclasses.dataclass
class RunProgress:
  """Mutable bookkeeping shared by the seeds of a run, saved in each checkpoint's JSON meta."""

  task: int = 0
  epoch: int = 0
  step_in_epoch: int = 0  # steps of the longest seed's epoch
  in_task: bool = False  # True once the task's proxy head / optimiser state exist
  save_number: int = 0
  total_steps: int = 0  # steps dispatched
  wall_time_s: float = 0.0


@dataclasses.dataclass
class SeedLog:
  """What each seed writes: its steps taken (metrics' step), metrics.jsonl size, stage rows."""

  seed: int
  total_steps: int = 0
  metrics_offset: int = 0
  stages: list = dataclasses.field(default_factory=list)


def progress_meta(progress: RunProgress, logs: list[SeedLog], stacked: bool) -> dict[str, Any]:
  """The checkpoint's "progress": a single run's fields flat (as always); per seed when stacked."""
  meta = dataclasses.asdict(progress)
  if stacked:
    meta["seeds"] = [dataclasses.asdict(log_) for log_ in logs]
  else:
    meta.update(metrics_offset=logs[0].metrics_offset, stages=logs[0].stages)
  return meta


def progress_from_meta(
  meta: dict[str, Any], seeds: tuple[int, ...], stacked: bool
) -> tuple[RunProgress, list[SeedLog]]:
  """Inverse of `progress_meta`; raises ValueError if the checkpoint holds other seeds."""
  progress = RunProgress(**{f.name: meta[f.name] for f in dataclasses.fields(RunProgress)})
  if not stacked:
    return progress, [
      SeedLog(seeds[0], meta["total_steps"], meta["metrics_offset"], meta["stages"])
    ]
  logs = [SeedLog(**entry) for entry in meta["seeds"]]
  if (
    tuple(log_.seed for log_ in logs) != seeds
  ):  # the config hash binds the workdir; belt and braces
    raise ValueError(f"checkpoint holds seeds {[g.seed for g in logs]}, the config {list(seeds)}.")
  return progress, logs
