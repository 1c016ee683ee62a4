"""In-memory sources: `ArraySource`, Animal-MNIST and Fashion-MNIST (SPEC 6)."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pathlib
import pickle
from collections.abc import Sequence

import numpy as np

from ntkcl_jax.data.sources.base import SourceBase, _check_labels, _check_split, _to_rgb

# Label order of the animal-mnist 0.4 arrays: the alphabetical list of its package description
# ("Bear, Bird, Cat, Cow, Dog, Elephant, Giraffe, Horse, Sheep, Zebra"), label i = i-th name.
ANIMAL_MNIST_CLASSES = [
  "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra",
]  # fmt: skip
FASHION_MNIST_CLASSES = [
  "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
ANIMAL_MNIST_SPLIT_SEED = 12345
ANIMAL_MNIST_TRAIN_PER_CLASS = 800


class ArraySource(SourceBase):
  """In-memory images with original class ids.

  Args:
    images: (N, H, W), (N, H, W, 1) or (N, H, W, 3) uint8; grayscale is replicated to 3 channels on
      access (stored as given).
    labels: (N,) int original class ids in ``[0, len(class_names))``.
    class_names: list of C names.
    name: used in example keys ``"{name}:{index}"`` and messages.
    key_indices: (N,) ints used in the example keys instead of ``0..N-1`` (e.g. the positions in
      the unsplit array, so that the manifest hash records split membership).
  """

  def __init__(
    self,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    name: str = "array",
    key_indices: np.ndarray | None = None,
  ):
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
      raise ValueError(
        f"ArraySource images must be uint8 (N, H, W[, 1|3]); got {images.shape} {images.dtype}."
      )
    if images.ndim == 4 and images.shape[-1] not in (1, 3):
      raise ValueError(f"ArraySource images need 1 or 3 channels; got {images.shape}.")
    self.class_names = [str(c) for c in class_names]
    self.labels = _check_labels(labels, len(self.class_names), f"ArraySource {name!r}")
    if self.labels.shape[0] != images.shape[0]:
      raise ValueError(f"{images.shape[0]} images but {self.labels.shape[0]} labels.")
    self._images = images
    self.name = name
    self._key_indices = (
      np.arange(len(self.labels)) if key_indices is None else np.asarray(key_indices)
    )

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (int(self._images.shape[1]), int(self._images.shape[2]), 3)

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def image(self, i: int) -> np.ndarray:
    return _to_rgb(self._images[int(i)])

  def images(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
    """(n, H, W, 3) uint8 for the given indices (one fancy-indexing gather)."""
    batch = self._images[np.asarray(idx, dtype=np.int64)]
    if batch.ndim == 3:
      batch = batch[..., None]
    if batch.shape[-1] == 1:
      batch = np.repeat(batch, 3, axis=-1)
    return batch

  def example_keys(self) -> list[str]:
    return [f"{self.name}:{int(i)}" for i in self._key_indices]


# Animal-MNIST (PyPI animal-mnist 0.4) and Fashion-MNIST (Debian dataset-fashion-mnist).


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def animal_mnist_dir() -> pathlib.Path:
  spec = importlib.util.find_spec("animal_mnist")  # locates without importing the package
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "The animal-mnist package is not installed; `pip install animal-mnist==0.4` (2.6 MB wheel, "
      "MIT). Its arrays are read directly; its own loader (which imports TensorFlow) is not used."
    )
  return pathlib.Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"


def _load_animal_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
  folder = animal_mnist_dir()
  arrays = []
  for stem in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
    path = folder / stem
    if not path.exists():
      raise FileNotFoundError(f"animal-mnist data file {path} is missing; reinstall animal-mnist.")
    with gzip.open(path, "rb") as f:
      arrays.append(np.asarray(pickle.load(f)))  # gzip-pickled NumPy arrays of the package
  images, labels = arrays
  return images.astype(np.uint8), labels.astype(np.int64)


def animal_mnist_split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
  """The fixed Animal-MNIST train/test split [PROJ] (the package ships no split).

  One ``rng = np.random.RandomState(12345)``; for each class c = 0..9 in turn, ``members`` = the
  indices with label c in ascending order and ``perm = rng.permutation(len(members))``; the first
  800 of ``members[perm]`` are train, the remaining 200 test. Each split is returned sorted
  ascending (positions in the unsplit 10,000-image array).
  """
  rng = np.random.RandomState(ANIMAL_MNIST_SPLIT_SEED)
  train, test = [], []
  for c in range(int(labels.max()) + 1):
    members = np.flatnonzero(labels == c)
    perm = rng.permutation(members.size)
    train.append(members[perm[:ANIMAL_MNIST_TRAIN_PER_CLASS]])
    test.append(members[perm[ANIMAL_MNIST_TRAIN_PER_CLASS:]])
  return {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}


def animal_mnist(split: str) -> ArraySource:
  """Animal-MNIST: 10 classes x 1,000 28x28 grayscale silhouettes (PyPI ``animal-mnist`` 0.4).

  Read from ``animal_mnist/data/Animal_MNIST/animal_{data,label}_version_3.gz`` of the installed
  package. Split: 800 train / 200 test per class (8,000 / 2,000), see
  `animal_mnist_split_indices`. Class names: `ANIMAL_MNIST_CLASSES`.

  Args:
    split: "train" or "test".
  Returns:
    ArraySource with (N, 28, 28) images; example keys ``"animal_mnist:<position in the package
    array>"``.
  """
  split = _check_split(split)
  images, labels = _load_animal_mnist_arrays()
  idx = animal_mnist_split_indices(labels)[split]
  return ArraySource(
    images[idx], labels[idx], ANIMAL_MNIST_CLASSES, name="animal_mnist", key_indices=idx
  )


def _read_idx(path: pathlib.Path, expected_magic: int) -> np.ndarray:
  with gzip.open(path, "rb") as f:
    raw = f.read()
  magic = int.from_bytes(raw[:4], "big")
  if magic != expected_magic:
    raise ValueError(f"{path} is not an IDX file with magic {expected_magic} (found {magic}).")
  ndim = raw[3]
  dims = [int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
  return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_files(
  split: str, data_dir: str | os.PathLike = FASHION_MNIST_DIR
) -> tuple[pathlib.Path, pathlib.Path]:
  """(images, labels) IDX gzip paths of a Fashion-MNIST split; FileNotFoundError naming the fix
  when either is missing."""
  split = _check_split(split)
  data_dir = pathlib.Path(data_dir)
  prefix = "train" if split == "train" else "t10k"
  img_path = data_dir / f"{prefix}-images-idx3-ubyte.gz"
  lbl_path = data_dir / f"{prefix}-labels-idx1-ubyte.gz"
  if not (img_path.exists() and lbl_path.exists()):
    raise FileNotFoundError(
      f"Fashion-MNIST files not found: expected {img_path.name} and {lbl_path.name} in "
      f"{data_dir}. Install them with `apt-get install dataset-fashion-mnist` (31 MB, MIT; puts "
      f"them in {FASHION_MNIST_DIR}) or pass data_dir=<folder with the IDX files>."
    )
  return img_path, lbl_path


def fashion_mnist(split: str, data_dir: str | os.PathLike = FASHION_MNIST_DIR):
  """Fashion-MNIST (60,000 train / 10,000 test, 28x28 grayscale, 10 classes) from IDX gzip files.

  Args:
    split: "train" or "test".
    data_dir: folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` (the Debian
      package ``dataset-fashion-mnist`` installs them at the default path).
  Returns:
    ArraySource; class names `FASHION_MNIST_CLASSES`.
  """
  img_path, lbl_path = fashion_mnist_files(split, data_dir)
  images = _read_idx(img_path, 2051)
  labels = _read_idx(lbl_path, 2049).astype(np.int64)
  return ArraySource(images, labels, FASHION_MNIST_CLASSES, name=f"fashion_mnist:{split}")
