"""Workdir bookkeeping of a run: its config binding, atomic JSON files, and the progress display.

`check_workdir_config` decides whether a workdir may be resumed with a given config (the config
binds a workdir once a checkpoint exists); `write_json` is the atomic writer of `config.json` and
`summary.json`; `ProgressBar` is the trainer's tqdm bar (plain log lines off a terminal).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import sys
from typing import Any

import ml_collections

from ntkcl_jax import config as config_lib
from ntkcl_jax import metrics

log = logging.getLogger("ntkcl_jax")


class WorkdirMismatchError(ValueError):
  """The workdir holds a run started with a different config."""


def write_json(path: pathlib.Path, obj: Any) -> None:
  """Atomic write: a killed run never leaves a truncated JSON file."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(metrics._plain(obj), indent=1, allow_nan=False))
  os.replace(tmp, path)


# Keys that change what a run writes beside its results, never the results: free on resume.
OUTPUT_ONLY_KEYS = ("train.tensorboard", "train.platform", "train.prefetch_batches")
# Keys added to the schema later, with the value that behaves like the code before them.
# matmul_precision: every workdir before the key was made on CPU, where XLA computes float32
# dots identically at every precision (tested), so "highest" reproduces them.
SCHEMA_ADDITIONS = {"model.remat": "none", "model.matmul_precision": "highest"}


def check_workdir_config(workdir: pathlib.Path, config: ml_collections.ConfigDict, write: bool):
  """Writes `config.json` on first use; refuses a workdir created with a different config.

  The config binds the workdir once a checkpoint exists: a start that failed before its first
  checkpoint (missing data, a typo in a value, a NaN at step 1) must not block the corrected rerun.
  """
  path = workdir / "config.json"
  flat = config_lib.flat_config(config)
  ckpt_dir = workdir / "checkpoints"
  has_run = ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
  if path.exists() and has_run:
    previous = json.loads(path.read_text())
    # A key added to the schema after the workdir was created matches when it holds the value
    # that reproduces the older code (its default, or `SCHEMA_ADDITIONS`); output-only keys
    # never bind a workdir.
    before = {**config_lib.flat_config(config_lib.base_config()), **SCHEMA_ADDITIONS}
    diff = [
      k
      for k in config_lib.config_diff(previous, flat)
      if k not in OUTPUT_ONLY_KEYS and (k in previous or flat.get(k) != before.get(k))
    ]
    if diff:
      shown = ", ".join(f"{k}: {previous.get(k)!r} -> {flat.get(k)!r}" for k in diff[:8])
      raise WorkdirMismatchError(
        f"Workdir {workdir} holds a run with a different config ({len(diff)} keys differ: "
        f"{shown}). Use a new --workdir, or rerun with the original config to resume."
      )
  elif write:
    workdir.mkdir(parents=True, exist_ok=True)
    write_json(path, flat)


class ProgressBar:
  """A progress bar on an interactive terminal, plain log lines otherwise."""

  def __init__(self, enabled: bool, every: int):
    self.enabled, self.every, self.bar = enabled, max(every, 1), None
    self.interactive = enabled and sys.stderr.isatty()

  def start(self, t: int, total: int, done: int):
    if self.interactive:
      from tqdm import tqdm

      self.bar = tqdm(total=total, initial=done, desc=f"task {t}", leave=False)

  def update(self, t: int, step: int, total: int, terms: dict[str, float] | None):
    """`terms` is None on steps whose terms stay on the device (not log or checkpoint steps)."""
    if self.bar is not None:
      self.bar.update(1)
      if terms is not None:
        self.bar.set_postfix(loss=f"{terms['total']:.4f}")
    elif self.enabled and terms is not None and (step % self.every == 0 or step == total):
      log.info("task %d step %d/%d loss %.4f", t, step, total, terms["total"])

  def close(self):
    if self.bar is not None:
      self.bar.close()
      self.bar = None
