"""Data: class order and task split, sources, transforms, task stream (SPEC 2.5, 2.7, 6).

Plain arguments in, NumPy out; no model, flax or config imports, and no TensorFlow.
"""

from ntkcl_jax.data.class_order import class_order, label_to_task, relabel, task_splits
from ntkcl_jax.data.sources import (
  BENCHMARKS,
  ArraySource,
  FileSource,
  ImageFolderSource,
  ManifestSource,
  Source,
  SubsetSource,
  TFDSSource,
  animal_mnist,
  cap_per_class,
  check_membership,
  domainnet_yaml,
  fashion_mnist,
  make_source,
  manifest_hash,
  membership,
  source_manifest_hash,
)
from ntkcl_jax.data.stream import TaskStream

# Names only, no logic: the source names below repeat part of `sources.__all__` so that the
# package's public names are listed here explicitly (`duplicates` reports the two lists).
__all__ = [
  "BENCHMARKS",
  "ArraySource",
  "FileSource",
  "ImageFolderSource",
  "ManifestSource",
  "Source",
  "SubsetSource",
  "TFDSSource",
  "TaskStream",
  "animal_mnist",
  "cap_per_class",
  "check_membership",
  "class_order",
  "domainnet_yaml",
  "fashion_mnist",
  "label_to_task",
  "make_source",
  "manifest_hash",
  "membership",
  "relabel",
  "source_manifest_hash",
  "task_splits",
]
