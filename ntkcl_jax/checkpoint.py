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
  """A checkpoint's array shapes or tree structure differ from the configured model's.

  Raised by `RunCheckpoints.restore` before anything is read into memory or written: the workdir
  is left as it was. `mismatches` holds one `(leaf path, stored shape, expected shape)` per leaf
  that differs, `None` standing for "absent" on that side (empty when orbax itself refused the
  tree; its message is then quoted).
  """

  def __init__(
    self,
    message: str,
    mismatches: tuple[tuple[str, tuple[int, ...] | None, tuple[int, ...] | None], ...] = (),
  ):
    super().__init__(message)
    self.mismatches = mismatches


# At most this many leaves are listed in the message (all of them are in `.mismatches`).
_MAX_LISTED = 25
_HOW_TO_FIX = (
  "Nothing in the workdir was changed. The checkpoint was written by a run with another model "
  "layout: another config (model, method, backbone, data.num_classes/init_cls/increment, "
  "ridge head), or an older ntkcl-jax (e.g. a run truncated by train.max_tasks before prototype "
  "rows and the proxy-head width came from the whole task sequence). Either start over in a new "
  "--workdir, or rerun with the config (and ntkcl-jax version) that wrote it."
)


def _leaf_paths(tree: Any) -> dict[str, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in flat}


def _shape(leaf: Any) -> tuple[int, ...] | None:
  """A stored leaf's shape from its orbax metadata (None if it records none)."""
  shape = getattr(leaf, "shape", None)
  return None if shape is None else tuple(shape)


def _describe(have: tuple[int, ...] | None, want: tuple[int, ...] | None) -> str:
  if have is None:
    return f"not in the checkpoint, expected {want}"
  if want is None:
    return f"stored {have}, not in the configured model"
  return f"stored {have}, expected {want}"


def _mismatch_message(
  where: pathlib.Path,
  mismatches: list[tuple[str, tuple[int, ...] | None, tuple[int, ...] | None]],
) -> str:
  lines = [f"  {path}: {_describe(have, want)}" for path, have, want in mismatches[:_MAX_LISTED]]
  if len(mismatches) > _MAX_LISTED:
    lines.append(f"  ... and {len(mismatches) - _MAX_LISTED} more leaves")
  return (
    f"Checkpoint {where} does not match the configured model: {len(mismatches)} leaf "
    f"path(s) differ (stored in the checkpoint vs expected by the model):\n"
    + "\n".join(lines)
    + f"\n{_HOW_TO_FIX}"
  )


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

    Every leaf is checked against the checkpoint's metadata first: nothing is read or written
    unless all paths and shapes agree.

    Raises:
      CheckpointShapeError: naming every leaf whose shape differs, that the checkpoint lacks or
        that the model lacks (stored vs expected shapes), and how to fix it.
    """
    where = self.directory / str(number)
    mismatches = self._mismatches(number, abstract_state)
    if mismatches:
      raise CheckpointShapeError(_mismatch_message(where, mismatches), tuple(mismatches))
    try:
      out = self.manager.restore(
        number,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
        ),
      )
    except ValueError as e:  # any structure orbax refuses that the metadata check did not see
      raise CheckpointShapeError(
        f"Checkpoint {where} does not restore into the configured model: {e}\n{_HOW_TO_FIX}"
      ) from e
    return out["state"], out["meta"]

  def restore_on_one_device(self, number: int) -> tuple[Any, dict[str, Any]]:
    """Restores every array as stored (shapes, dtypes) onto this process's first device, whatever
    devices wrote it (a pod or multi-GPU run read back in Colab or on a laptop)."""
    metadata = self.manager.item_metadata(number)
    state = metadata.get("state") if metadata is not None else None
    if state is None:
      raise FileNotFoundError(f"Checkpoint {self.directory / str(number)} holds no state.")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), state
    )
    return self.restore(number, abstract)

  def _mismatches(
    self, number: int, abstract_state: Any
  ) -> list[tuple[str, tuple[int, ...] | None, tuple[int, ...] | None]]:
    """(path, stored shape, expected shape) of every leaf that differs; None = absent."""
    metadata = self.manager.item_metadata(number)
    state = metadata.get("state") if metadata is not None else None
    wanted = {p: tuple(x.shape) for p, x in _leaf_paths(abstract_state).items()}
    if state is None:  # no state item at all: every expected leaf is missing
      return [(p, None, shape) for p, shape in wanted.items()]
    stored = {p: _shape(x) for p, x in _leaf_paths(state).items()}
    out = []
    for path in sorted(set(wanted) | set(stored)):
      if path not in stored:
        out.append((path, None, wanted[path]))
      elif path not in wanted:
        out.append((path, stored[path] or (), None))
      elif stored[path] is not None and stored[path] != wanted[path]:
        out.append((path, stored[path], wanted[path]))
    return out

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
