"""Split membership: the manifest hash of a source, kept in checkpoint metadata (SPEC 6, 8)."""

from __future__ import annotations

import hashlib
import os
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from ntkcl_jax.data.sources.base import Source


def manifest_hash(entries: Iterable[tuple[str, int]]) -> str:
  """sha256 hex digest of the sorted ``(key, label)`` list (split membership + ids; SPEC 6).

  Each entry is serialised as ``f"{key}\\t{int(label)}\\n"`` (UTF-8); entries are sorted first,
  so the hash does not depend on listing order.
  """
  digest = hashlib.sha256()
  for key, label in sorted((str(k), int(v)) for k, v in entries):
    digest.update(f"{key}\t{label}\n".encode())
  return digest.hexdigest()


def source_manifest_hash(source: Source) -> str:
  """`manifest_hash` of ``zip(source.example_keys(), source.labels)``."""
  return manifest_hash(zip(source.example_keys(), source.labels.tolist()))


_MEMBERSHIP_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def membership(train: Source, test: Source) -> dict[str, dict[str, Any]]:
  """What a checkpoint records of the data: ``{split: {"examples": N, "sha256": hash}}``.

  The hash is `source_manifest_hash` of that split (after any per-class cap), so it changes when an
  example is added, removed, renamed or relabelled. Computed once per source object (the trainer
  calls this at every save).
  """
  out = {}
  for split, source in (("train", train), ("test", test)):
    try:
      cached = _MEMBERSHIP_CACHE.get(source)
    except TypeError:  # a source class that is not weak-referenceable or hashable: no cache
      cached = None
    if cached is None:
      cached = {"examples": len(source), "sha256": source_manifest_hash(source)}
      try:
        _MEMBERSHIP_CACHE[source] = cached
      except TypeError:
        pass
    out[split] = dict(cached)
  return out


def check_membership(
  saved: Mapping[str, Mapping[str, Any]] | None,
  current: Mapping[str, Mapping[str, Any]],
  workdir: str | os.PathLike,
) -> None:
  """Refuses to resume a checkpoint of other data: raises ValueError naming what changed.

  Args:
    saved: the `membership` stored in the checkpoint's metadata; None for a checkpoint written
      before membership was recorded, which passes (there is nothing to compare).
    current: `membership` of the data this run reads.
    workdir: named in the message.
  """
  if saved is None:
    return
  changed = [
    f"{split}: {saved[split]['examples']} examples (sha256 {saved[split]['sha256'][:12]}…) at the "
    f"checkpoint, now {current[split]['examples']} (sha256 {current[split]['sha256'][:12]}…)"
    for split in sorted(current)
    if split in saved and dict(saved[split]) != dict(current[split])
  ]
  if changed:
    raise ValueError(
      f"The checkpoint in {workdir} was trained on other data than this run reads (same config, "
      f"different split membership; SPEC 6): {'; '.join(changed)}. The checkpoint is left as it "
      "is. Restore the original data (the same files, file lists or data.data_dir) to resume it, "
      "or start this data in a new --workdir."
    )
