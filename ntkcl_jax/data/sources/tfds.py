"""A prepared TFDS dataset read through ``tfds.data_source`` (array_record; no TensorFlow)."""

from __future__ import annotations

import os

import numpy as np

from ntkcl_jax.data.sources.base import SourceBase, _check_labels, _to_rgb


class TFDSSource(SourceBase):
  """A prepared TFDS dataset read through ``tfds.data_source`` (random access, no TensorFlow).

  Reading needs only tensorflow-datasets; *preparing* a dataset (``tfds build`` /
  ``download_and_prepare``, and ``tfds.load``) needs TensorFlow and the network, so do that once
  elsewhere with ``tfds build <name> --file_format=array_record`` and copy the result into
  ``data_dir``. Labels are read once at construction (this decodes every example).

  Args:
    name: TFDS name, e.g. "cifar100" (fine labels = CIFAR-100 canonical ids).
    split: TFDS split string ("train", "test", ...).
    data_dir: TFDS data dir (None = TFDS default, ``~/tensorflow_datasets``).
    image_key, label_key: feature names.
  """

  image_shape = None

  def __init__(
    self,
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    image_key: str = "image",
    label_key: str = "label",
  ):
    import tensorflow_datasets as tfds  # optional, heavy import

    try:
      self._ds = tfds.data_source(
        name, split=split, data_dir=None if data_dir is None else str(data_dir), download=False
      )
    except (NotImplementedError, FileNotFoundError, AssertionError, KeyError) as e:
      raise FileNotFoundError(
        f"TFDS dataset {name!r} (split {split!r}) is not prepared in array_record format in "
        f"{data_dir or '~/tensorflow_datasets'}. Prepare it where TensorFlow and the network are "
        f"available (`tfds build {name} --file_format=array_record`) and copy the folder "
        f"{name}/<version>/ there; nothing is downloaded at run time."
      ) from e
    self.name, self.split = name, split
    self._image_key, self._label_key = image_key, label_key
    label_feature = self._ds.dataset_info.features[label_key]
    self.class_names = [str(n) for n in label_feature.names]
    labels = [int(self._ds[i][label_key]) for i in range(len(self._ds))]
    self.labels = _check_labels(np.asarray(labels, dtype=np.int64), len(self.class_names), name)

  def __len__(self) -> int:
    return len(self._ds)

  def image(self, i: int) -> np.ndarray:
    return _to_rgb(np.asarray(self._ds[int(i)][self._image_key]))

  def example_keys(self) -> list[str]:
    return [f"{self.name}:{self.split}:{i}" for i in range(len(self))]
