"""Orbax checkpoints of a run: `Composite(state=StandardSave, meta=JsonSave)` (SPEC 8).

Checkpoints live in `workdir/checkpoints/<n>` with a monotonically increasing save number `n`.
Orbax writes each one to a temporary directory and renames it into place when complete, so a run
killed mid-write leaves the previous checkpoint intact; only `max_to_keep` are kept.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointShapeError(ValueError):
  """A checkpoint's array shapes differ from the configured model's."""


def _leaf_paths(tree: Any) -> dict[str, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in flat}


class RunCheckpoints:
  """Save / restore (state pytree, JSON meta) pairs under `workdir/checkpoints`."""

  def __init__(self, workdir: str | pathlib.Path, *, max_to_keep: int = 2, async_save: bool = True):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
      ),
      # Handlers, not just item names: a manager that has not saved in this process needs them
      # to read `item_metadata` (else None, and every leaf looks missing on resume).
      item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )

  def latest(self) -> int | None:
    return self.manager.latest_step()

  def save(self, number: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts an (async) save; call `wait()` before relying on it."""
    self.manager.save(
      number,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=True,
    )

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def read_meta(self, number: int) -> dict[str, Any]:
    return self.manager.restore(number, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
      "meta"
    ]

  def restore(self, number: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores into the layout, dtypes and shardings of `abstract_state`.

    Raises:
      CheckpointShapeError: naming the first leaf whose shape (or presence) differs.
    """
    stored = _leaf_paths(self.manager.item_metadata(number)["state"])
    wanted = _leaf_paths(abstract_state)
    for path, leaf in wanted.items():
      if path not in stored:
        raise CheckpointShapeError(
          f"Checkpoint {self.directory / str(number)} has no leaf '{path}'; it was written by a "
          "run with another model or method. Use a fresh --workdir."
        )
      if tuple(stored[path].shape) != tuple(leaf.shape):
        raise CheckpointShapeError(
          f"Leaf '{path}' is {tuple(stored[path].shape)} in checkpoint "
          f"{self.directory / str(number)} but {tuple(leaf.shape)} in the model; the checkpoint "
          "comes from a different model size or task layout. Use a fresh --workdir or the "
          "matching config."
        )
    out = self.manager.restore(
      number,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
      ),
    )
    return out["state"], out["meta"]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
