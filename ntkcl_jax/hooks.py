"""Hooks the trainer calls at fixed points, with a read-only view of the run (STYLE 2).

`analysis.hook.NTKHook` is the main implementation; `main.py` composes hooks, the trainer only
calls them (`session.RunSession.call_hooks`).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any, Protocol

import jax
import numpy as np

from ntkcl_jax.data import TaskStream
from ntkcl_jax.models.ntkcl import ModelSpec


@dataclasses.dataclass(frozen=True)
class TaskView:
  """What a hook may read. Never the optimiser state or trainer locals.

  Attributes:
    task: the task just finished (-1 at `on_init`).
    num_tasks: T.
    params: full parameter tree {"backbone", "peft", "fusion"} (no proxy head), eval mode.
    prototypes: (C, D) host array, rows ≥ `num_seen` zero.
    num_seen: classes seen so far.
    spec: the model spec (build `NTKCL(spec)` to apply `params`).
    stream: the task stream (probe indices, eval batches).
    workdir: run directory; hooks write under it.
    accuracy_matrix: R so far (rows 0..task), NaN above the diagonal.
    is_writer: whether this process writes files (process 0).
    features: jitted (params, images (b,H,W,C)) -> (b, D) eval feature of the run's model.
  """

  task: int
  num_tasks: int
  params: Any
  prototypes: np.ndarray
  num_seen: int
  spec: ModelSpec
  stream: TaskStream
  workdir: pathlib.Path
  accuracy_matrix: np.ndarray
  is_writer: bool
  features: Callable[[Any, jax.Array], jax.Array]


class TaskHook(Protocol):
  def on_init(self, view: TaskView) -> None: ...

  def on_task_end(self, view: TaskView) -> None: ...

  def summary(self) -> dict[str, Any]:
    """Extra sections merged into summary.json (e.g. {"ntk": {...}})."""
    ...
