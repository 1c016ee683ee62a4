"""The source protocol, shared helpers and the subset view (SPEC 6); see `ntkcl_jax.data.sources`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

SPLITS = ("train", "test")


@runtime_checkable
class Source(Protocol):
  """One split of one dataset; the contract is in the `ntkcl_jax.data.sources` docstring."""

  labels: np.ndarray
  class_names: list[str]

  @property
  def num_classes(self) -> int: ...

  @property
  def image_shape(self) -> tuple[int, int, int] | None: ...

  def __len__(self) -> int: ...

  def image(self, i: int) -> np.ndarray: ...

  def images(self, idx: Sequence[int] | np.ndarray) -> np.ndarray | list[np.ndarray]: ...

  def example_keys(self) -> list[str]: ...


def _to_rgb(img: np.ndarray) -> np.ndarray:
  """(H, W), (H, W, 1) or (H, W, 3) uint8 -> (H, W, 3) uint8 (grayscale replicated)."""
  img = np.asarray(img)
  if img.dtype != np.uint8:
    raise ValueError(f"images must be uint8, got {img.dtype}.")
  if img.ndim == 2:
    img = img[..., None]
  if img.ndim != 3 or img.shape[-1] not in (1, 3):
    raise ValueError(f"an image must be (H, W), (H, W, 1) or (H, W, 3); got {img.shape}.")
  if img.shape[-1] == 1:
    img = np.repeat(img, 3, axis=-1)
  return img


def _check_labels(labels: np.ndarray, num_classes: int, what: str) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{what}: labels must be a 1-D int array, got {labels.shape} {labels.dtype}.")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
      f"{what}: labels must lie in [0, {num_classes}) (one per class name); found range "
      f"[{labels.min()}, {labels.max()}]."
    )
  return labels.astype(np.int64)


def _check_split(split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  return split


class SourceBase:
  """`num_classes` from `class_names`, and `images` as one `image` call per index (lazy sources)."""

  class_names: list[str]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def images(self, idx: Sequence[int] | np.ndarray) -> list[np.ndarray]:
    return [self.image(i) for i in np.asarray(idx, dtype=np.int64)]


class SubsetSource:
  """A view of `base` restricted to `indices` (in that order); same classes and ids."""

  def __init__(self, base: Source, indices: np.ndarray):
    self.base = base
    self.indices = np.asarray(indices, dtype=np.int64)
    self.labels = np.asarray(base.labels)[self.indices]
    self.class_names = list(base.class_names)

  @property
  def num_classes(self) -> int:
    return self.base.num_classes

  @property
  def image_shape(self) -> tuple[int, int, int] | None:
    return getattr(self.base, "image_shape", None)

  def __len__(self) -> int:
    return int(self.indices.size)

  def image(self, i: int) -> np.ndarray:
    return self.base.image(int(self.indices[int(i)]))

  def images(self, idx: Sequence[int] | np.ndarray):
    return self.base.images(self.indices[np.asarray(idx, dtype=np.int64)])

  def example_keys(self) -> list[str]:
    keys = self.base.example_keys()
    return [keys[i] for i in self.indices]


def cap_per_class(source: Source, n: int) -> Source:
  """The first `n` examples of every class (index order); `source` itself when n < 0."""
  if n < 0:
    return source
  labels = np.asarray(source.labels)
  keep = np.concatenate([np.flatnonzero(labels == c)[:n] for c in range(source.num_classes)])
  return SubsetSource(source, np.sort(keep))
