"""Image sources: indexable datasets with original class ids (SPEC 6).

A *source* is one split of one dataset: a random-access collection of N images with original class
ids. Everything else (class order, task split, batching, transforms) lives in `stream.py`. Sources
never import TensorFlow, the model or the config system.

Protocol (`Source`)::

  labels        (N,) int64 original class ids in [0, num_classes)
  class_names   list of num_classes names; original id = position in this list
  num_classes   int
  image_shape   (H, W, 3) when every image has that shape (in-memory arrays), else None
  len(source)   N
  image(i)      uint8 (H, W, 3); grayscale replicated to 3 channels, RGB for files
  images(idx)   (n, H, W, 3) uint8 array when image_shape is set, else a list of n such arrays
  example_keys()  list of N strings naming each example (relative path, or "name:split:index")

Modules, one per source kind: `base` (the protocol, `SubsetSource`, `cap_per_class`), `arrays`
(`ArraySource` in memory, `animal_mnist`, `fashion_mnist`), `files` (`FileSource`,
`ImageFolderSource`, `ManifestSource`), `domainnet` (`domainnet_yaml`), `tfds` (`TFDSSource`),
`registry` (`BENCHMARKS`, `make_source(name, split, data_dir)`, which picks one per benchmark) and
`membership` (`manifest_hash` / `source_manifest_hash`: the split-membership hash the trainer stores
in the checkpoint metadata and checks on resume, SPEC 6, 8). The names below are importable from
this package; module-level constants and helpers (the Animal-MNIST split constants,
`domainnet.load_split_yaml`, `files.check_files_exist`) from their module.

Expected on-disk layouts for the folder benchmarks (``imagenet_r``, ``imagenet_a``, ``domainnet``,
``oxford_pets``, ``eurosat``, ``plantvillage``, ``vtab``, ``kvasir``), checked in this order:

1. DomainNet only: ``data_dir/domainnet_{train,test}.yaml`` (keys ``data`` = image paths,
   ``targets`` = int class ids), paths rebased on ``data_dir`` (see `domainnet_yaml`).
2. Manifest: ``data_dir/classes.txt`` (one class name per line; line number = original id) and
   ``data_dir/{train,test}.csv`` (rows ``path,class_name``; paths relative to ``data_dir``).
3. Folder tree as in the reference: ``data_dir/{train,test}/<class_name>/<image>`` with ImageFolder
   semantics (original id = index in the case-sensitive ``sorted()`` list of class folders).
"""

from ntkcl_jax.data.sources.arrays import (
  ANIMAL_MNIST_CLASSES,
  FASHION_MNIST_CLASSES,
  ArraySource,
  animal_mnist,
  animal_mnist_split_indices,
  fashion_mnist,
)
from ntkcl_jax.data.sources.base import SPLITS, Source, SubsetSource, cap_per_class
from ntkcl_jax.data.sources.domainnet import DOMAINNET_DOMAINS, domainnet_yaml
from ntkcl_jax.data.sources.files import (
  IMG_EXTENSIONS,
  FileSource,
  ImageFolderSource,
  ManifestSource,
  folder_classes,
)
from ntkcl_jax.data.sources.membership import (
  check_membership,
  manifest_hash,
  membership,
  source_manifest_hash,
)
from ntkcl_jax.data.sources.registry import BENCHMARKS, Benchmark, make_source
from ntkcl_jax.data.sources.tfds import TFDSSource

__all__ = [
  "ANIMAL_MNIST_CLASSES",
  "BENCHMARKS",
  "DOMAINNET_DOMAINS",
  "FASHION_MNIST_CLASSES",
  "IMG_EXTENSIONS",
  "SPLITS",
  "ArraySource",
  "Benchmark",
  "FileSource",
  "ImageFolderSource",
  "ManifestSource",
  "Source",
  "SubsetSource",
  "TFDSSource",
  "animal_mnist",
  "animal_mnist_split_indices",
  "cap_per_class",
  "check_membership",
  "domainnet_yaml",
  "fashion_mnist",
  "folder_classes",
  "make_source",
  "manifest_hash",
  "membership",
  "source_manifest_hash",
]
