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

Implementations: `ArraySource` (in memory), `animal_mnist`, `fashion_mnist`, `ImageFolderSource`,
`ManifestSource`, `domainnet_yaml`, `TFDSSource`; `make_source(name, split, data_dir)` picks one per
benchmark. `manifest_hash` / `source_manifest_hash` give the split-membership hash stored in the
checkpoint metadata (SPEC 6, 8).

Expected on-disk layouts for the folder benchmarks (``imagenet_r``, ``imagenet_a``, ``domainnet``,
``oxford_pets``, ``eurosat``, ``plantvillage``, ``vtab``, ``kvasir``), checked in this order:

1. DomainNet only: ``data_dir/domainnet_{train,test}.yaml`` (keys ``data`` = image paths,
   ``targets`` = int class ids), paths rebased on ``data_dir`` (see `domainnet_yaml`).
2. Manifest: ``data_dir/classes.txt`` (one class name per line; line number = original id) and
   ``data_dir/{train,test}.csv`` (rows ``path,class_name``; paths relative to ``data_dir``).
3. Folder tree as in the reference: ``data_dir/{train,test}/<class_name>/<image>`` with ImageFolder
   semantics (original id = index in the case-sensitive ``sorted()`` list of class folders).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import importlib.util
import os
import pathlib
import pickle
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = [
  "ANIMAL_MNIST_CLASSES",
  "BENCHMARKS",
  "FASHION_MNIST_CLASSES",
  "IMG_EXTENSIONS",
  "ArraySource",
  "FileSource",
  "ImageFolderSource",
  "ManifestSource",
  "Source",
  "TFDSSource",
  "animal_mnist",
  "domainnet_yaml",
  "fashion_mnist",
  "make_source",
  "manifest_hash",
  "source_manifest_hash",
]

SPLITS = ("train", "test")
# torchvision.datasets.folder.IMG_EXTENSIONS (matched case-insensitively, as there).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Label order of the animal-mnist 0.4 arrays: the alphabetical list of its package description
# ("Bear, Bird, Cat, Cow, Dog, Elephant, Giraffe, Horse, Sheep, Zebra"), label i = i-th name.
ANIMAL_MNIST_CLASSES = [
  "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra",
]  # fmt: skip
FASHION_MNIST_CLASSES = [
  "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
ANIMAL_MNIST_SPLIT_SEED = 12345
ANIMAL_MNIST_TRAIN_PER_CLASS = 800


@runtime_checkable
class Source(Protocol):
  """One split of one dataset; see the module docstring for the contract."""

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


class ArraySource:
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
  def num_classes(self) -> int:
    return len(self.class_names)

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


# ---------------------------------------------------------------------------------------------
# Animal-MNIST (PyPI animal-mnist 0.4) and Fashion-MNIST (Debian dataset-fashion-mnist).
# ---------------------------------------------------------------------------------------------


def _animal_mnist_dir() -> pathlib.Path:
  spec = importlib.util.find_spec("animal_mnist")  # locates without importing the package
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "The animal-mnist package is not installed; `pip install animal-mnist==0.4` (2.6 MB wheel, "
      "MIT). Its arrays are read directly; its own loader (which imports TensorFlow) is not used."
    )
  return pathlib.Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"


def _load_animal_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
  folder = _animal_mnist_dir()
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


def _check_split(split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  return split


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


def fashion_mnist(split: str, data_dir: str | os.PathLike = "/usr/share/datasets/fashion-mnist"):
  """Fashion-MNIST (60,000 train / 10,000 test, 28x28 grayscale, 10 classes) from IDX gzip files.

  Args:
    split: "train" or "test".
    data_dir: folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` (the Debian
      package ``dataset-fashion-mnist`` installs them at the default path).
  Returns:
    ArraySource; class names `FASHION_MNIST_CLASSES`.
  """
  split = _check_split(split)
  data_dir = pathlib.Path(data_dir)
  prefix = "train" if split == "train" else "t10k"
  img_path = data_dir / f"{prefix}-images-idx3-ubyte.gz"
  lbl_path = data_dir / f"{prefix}-labels-idx1-ubyte.gz"
  if not (img_path.exists() and lbl_path.exists()):
    raise FileNotFoundError(
      f"Fashion-MNIST files not found: expected {img_path.name} and {lbl_path.name} in "
      f"{data_dir}. Install them with `apt-get install dataset-fashion-mnist` (31 MB, MIT; puts "
      "them in /usr/share/datasets/fashion-mnist) or pass data_dir=<folder with the IDX files>."
    )
  images = _read_idx(img_path, 2051)
  labels = _read_idx(lbl_path, 2049).astype(np.int64)
  return ArraySource(images, labels, FASHION_MNIST_CLASSES, name=f"fashion_mnist:{split}")


# ---------------------------------------------------------------------------------------------
# File-backed sources: ImageFolder trees, manifests, DomainNet yaml.
# ---------------------------------------------------------------------------------------------


def _pil_rgb(path: str) -> np.ndarray:
  from PIL import Image  # only file-backed sources need PIL

  with open(path, "rb") as f:  # torchvision.datasets.folder.pil_loader
    img = Image.open(f)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


class FileSource:
  """Images stored as files, decoded lazily with PIL and converted to RGB.

  Args:
    paths: N absolute (or cwd-relative) image paths.
    labels: (N,) int original class ids.
    class_names: C names; id = position.
    root: paths are reported relative to it in `example_keys` (so the hash ignores the mount).
    name: used in messages.
  """

  image_shape = None

  def __init__(
    self,
    paths: Sequence[str],
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    root: str | os.PathLike,
    name: str = "files",
  ):
    self.paths = [str(p) for p in paths]
    self.class_names = [str(c) for c in class_names]
    self.labels = _check_labels(np.asarray(labels, dtype=np.int64), len(self.class_names), name)
    if len(self.paths) != self.labels.shape[0]:
      raise ValueError(f"{name}: {len(self.paths)} paths but {self.labels.shape[0]} labels.")
    self.root = str(root)
    self.name = name

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self.paths)

  def image(self, i: int) -> np.ndarray:
    return _pil_rgb(self.paths[int(i)])

  def images(self, idx: Sequence[int] | np.ndarray) -> list[np.ndarray]:
    return [self.image(i) for i in np.asarray(idx, dtype=np.int64)]

  def example_keys(self) -> list[str]:
    keys = []
    for p in self.paths:
      try:
        keys.append(pathlib.Path(os.path.relpath(p, self.root)).as_posix())
      except ValueError:  # different drive (Windows)
        keys.append(pathlib.Path(p).as_posix())
    return keys


def _is_image_file(name: str) -> bool:
  return name.lower().endswith(IMG_EXTENSIONS)


def folder_classes(root: str | os.PathLike) -> list[str]:
  """Case-sensitive ``sorted()`` names of the sub-folders of ``root`` (ImageFolder class ids)."""
  return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())


class ImageFolderSource(FileSource):
  """``root/<class_name>/**/<image>`` with torchvision ImageFolder semantics.

  Class ids are positions in the case-sensitive ``sorted()`` list of class folders; files are
  collected per class in sorted ``os.walk`` order (symlinks followed) and kept when their
  extension (lower-cased) is in `IMG_EXTENSIONS`. Images are decoded lazily as RGB.

  Args:
    root: the split folder (e.g. ``data/eurosat/train``).
    class_names: optional expected class list; a different folder list raises (use the train
      split's names for the test split so ids cannot shift).
  """

  def __init__(self, root: str | os.PathLike, *, class_names: Sequence[str] | None = None):
    root = pathlib.Path(root)
    if not root.is_dir():
      raise FileNotFoundError(
        f"ImageFolder root {root} does not exist; expected {root}/<class_name>/<image files>."
      )
    found = folder_classes(root)
    if not found:
      raise FileNotFoundError(f"{root} has no class sub-folders; expected {root}/<class>/<image>.")
    if class_names is not None and list(class_names) != found:
      missing = sorted(set(class_names) - set(found))
      extra = sorted(set(found) - set(class_names))
      raise ValueError(
        f"class folders in {root} differ from the expected class list: missing {missing[:10]}, "
        f"unexpected {extra[:10]} ({len(found)} found, {len(class_names)} expected). Both splits "
        "must hold the same class folders, or ids shift (SPEC 2.7, 6)."
      )
    paths, labels, empty = [], [], []
    for class_id, cls in enumerate(found):
      n_before = len(paths)
      for dirpath, _, fnames in sorted(os.walk(root / cls, followlinks=True)):
        for fname in sorted(fnames):
          if _is_image_file(fname):
            paths.append(os.path.join(dirpath, fname))
            labels.append(class_id)
      if len(paths) == n_before:
        empty.append(cls)
    if empty:
      raise FileNotFoundError(
        f"found no image files ({', '.join(IMG_EXTENSIONS)}) for classes {empty[:10]} in {root}."
      )
    super().__init__(paths, np.asarray(labels), found, root=root, name=f"ImageFolder({root})")


def _read_class_list(class_list_file: str | os.PathLike) -> list[str]:
  with open(class_list_file, encoding="utf-8") as f:
    names = [line.rstrip("\r\n") for line in f]
  while names and not names[-1].strip():
    names.pop()
  if not names or any(not n.strip() for n in names):
    raise ValueError(f"{class_list_file}: expected one non-empty class name per line.")
  if len(set(names)) != len(names):
    dup = sorted({n for n in names if names.count(n) > 1})
    raise ValueError(f"{class_list_file}: duplicate class names {dup[:10]}.")
  return names


class ManifestSource(FileSource):
  """A file list: CSV rows ``path,class_name`` plus a class list fixing the ids.

  Args:
    manifest_csv: CSV with one ``path,class_name`` row per image (an optional first row
      ``path,class_name`` is a header). Relative paths are relative to ``root``.
    class_list_file: one class name per line; original id = line number (0-based).
    root: data root for relative paths (default: the CSV's folder).
    check_files: stat every file up front and raise listing missing ones.
  """

  def __init__(
    self,
    manifest_csv: str | os.PathLike,
    class_list_file: str | os.PathLike,
    root: str | os.PathLike | None = None,
    *,
    check_files: bool = True,
  ):
    manifest_csv = pathlib.Path(manifest_csv)
    root = pathlib.Path(root) if root is not None else manifest_csv.parent
    class_names = _read_class_list(class_list_file)
    ids = {name: i for i, name in enumerate(class_names)}
    paths, labels = [], []
    with open(manifest_csv, newline="", encoding="utf-8") as f:
      for lineno, row in enumerate(csv.reader(f), start=1):
        if not row or (len(row) == 1 and not row[0].strip()):
          continue
        if lineno == 1 and [c.strip() for c in row] == ["path", "class_name"]:
          continue
        if len(row) != 2:
          raise ValueError(f"{manifest_csv}:{lineno}: expected 'path,class_name', got {row}.")
        path, cls = row[0].strip(), row[1].strip()
        if cls not in ids:
          raise ValueError(
            f"{manifest_csv}:{lineno}: class {cls!r} is not in {class_list_file} "
            f"({len(class_names)} classes)."
          )
        paths.append(path if os.path.isabs(path) else str(root / path))
        labels.append(ids[cls])
    if not paths:
      raise ValueError(f"{manifest_csv} lists no images.")
    if check_files:
      missing = [p for p in paths if not os.path.exists(p)]
      if missing:
        raise FileNotFoundError(
          f"{len(missing)} files listed in {manifest_csv} are missing under {root}, e.g. "
          f"{missing[:3]}."
        )
    super().__init__(
      paths, np.asarray(labels), class_names, root=root, name=f"Manifest({manifest_csv})"
    )


class _YamlFormatError(ValueError):
  pass


def _parse_yaml_lists(text: str) -> dict[str, list[str]]:
  """Tiny parser for a YAML mapping of block lists of scalars (``key:`` then ``- item`` lines).

  Raises _YamlFormatError on anything else (the caller then falls back to PyYAML).
  """
  out: dict[str, list[str]] = {}
  current = None
  for lineno, raw in enumerate(text.splitlines(), start=1):
    line = raw.rstrip()
    stripped = line.lstrip()
    if not stripped or stripped.startswith("#") or stripped in ("---", "..."):
      continue
    if stripped.startswith("- ") or stripped == "-":
      if current is None:
        raise _YamlFormatError(f"line {lineno}: list item outside a key")
      value = stripped[2:].strip() if stripped != "-" else ""
      if " #" in value and not value.startswith(("'", '"')):
        value = value.split(" #", 1)[0].rstrip()
      if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        inner = value[1:-1]
        if value[0] == '"' and "\\" in inner:
          raise _YamlFormatError(f"line {lineno}: escapes in double quotes")
        value = inner.replace("''", "'") if value[0] == "'" else inner
      elif value[:1] in ("[", "{", "&", "*", "!", "|", ">", "'", '"'):
        raise _YamlFormatError(f"line {lineno}: unsupported scalar")
      out[current].append(value)
    elif line == stripped and stripped.endswith(":") and " " not in stripped[:-1]:
      current = stripped[:-1].strip("'\"")
      out[current] = []
    elif line == stripped and stripped.endswith(": []"):
      out[stripped[:-4].strip("'\"")] = []
      current = None
    else:
      raise _YamlFormatError(f"line {lineno}: unsupported construct")
  return out


def _load_yaml_lists(path: pathlib.Path) -> dict:
  text = path.read_text(encoding="utf-8")
  try:
    return _parse_yaml_lists(text)
  except _YamlFormatError:
    pass
  try:
    import yaml
  except ImportError as e:
    raise ValueError(
      f"{path} is not a plain 'data:'/'targets:' block-list YAML and PyYAML is not installed; "
      "`pip install pyyaml`."
    ) from e
  loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
  return yaml.load(text, Loader=loader)


def _rebase_domainnet_path(path: str, root: pathlib.Path) -> tuple[str, pathlib.PurePosixPath]:
  """Returns (absolute path under root, path relative to root)."""
  parts = pathlib.PurePosixPath(path.replace("\\", "/")).parts
  for k, part in enumerate(parts):
    if part in DOMAINNET_DOMAINS:
      rel = pathlib.PurePosixPath(*parts[k:])
      return str(root / rel), rel
  if pathlib.PurePosixPath(path).is_absolute():
    raise ValueError(
      f"DomainNet path {path!r} is absolute and has no domain folder ({', '.join(DOMAINNET_DOMAINS)})"
      " to rebase on the data root."
    )
  return str(root / path), pathlib.PurePosixPath(path)


def domainnet_yaml(
  yaml_path: str | os.PathLike,
  root: str | os.PathLike,
  *,
  num_classes: int = 345,
  check_files: bool = True,
) -> FileSource:
  """DomainNet from the reference's ``domainnet_{train,test}.yaml`` (SPEC 6).

  Keys ``data`` (image paths) and ``targets`` (int class ids). Paths are rebased on ``root``: the
  path from its first component naming a domain (``clipart``, ``infograph``, ``painting``,
  ``quickdraw``, ``real``, ``sketch``) onwards is joined to ``root``; a relative path without a
  domain component is joined to ``root`` as is. Class names are the folder after the domain
  (``<domain>/<class>/<file>``); every target must map to one name (else ValueError), and a class
  with no image gets the name ``"class_<id>"``.

  Args:
    yaml_path: the split file. root: the DomainNet root holding the six domain folders.
    num_classes: 345 for the benchmark; targets must lie in [0, num_classes).
    check_files: stat every file and raise listing missing ones.
  """
  yaml_path, root = pathlib.Path(yaml_path), pathlib.Path(root)
  if not yaml_path.exists():
    raise FileNotFoundError(f"DomainNet split file {yaml_path} does not exist.")
  content = _load_yaml_lists(yaml_path)
  if not isinstance(content, dict) or "data" not in content or "targets" not in content:
    raise ValueError(
      f"{yaml_path} must be a mapping with keys 'data' (paths) and 'targets' (ints)."
    )
  data, targets = list(content["data"]), [int(t) for t in content["targets"]]
  if len(data) != len(targets):
    raise ValueError(f"{yaml_path}: {len(data)} paths but {len(targets)} targets.")
  names: dict[int, str] = {}
  paths = []
  for p, t in zip(data, targets):
    full, rel = _rebase_domainnet_path(str(p), root)
    paths.append(full)
    if rel.parts and rel.parts[0] in DOMAINNET_DOMAINS and len(rel.parts) >= 3:
      cls = rel.parts[1]
      if names.setdefault(t, cls) != cls:
        raise ValueError(f"{yaml_path}: target {t} names both {names[t]!r} and {cls!r}.")
  class_names = [names.get(c, f"class_{c}") for c in range(num_classes)]
  if check_files:
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
      raise FileNotFoundError(
        f"{len(missing)} DomainNet files from {yaml_path} are missing under {root}, e.g. "
        f"{missing[:3]}. root must hold {'/'.join(DOMAINNET_DOMAINS)} folders."
      )
  return FileSource(
    paths,
    np.asarray(targets, dtype=np.int64),
    class_names,
    root=root,
    name=f"DomainNet({yaml_path})",
  )


# ---------------------------------------------------------------------------------------------
# TFDS (array_record data sources; no TensorFlow needed to read).
# ---------------------------------------------------------------------------------------------


class TFDSSource:
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
    except (NotImplementedError, FileNotFoundError, AssertionError) as e:
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

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self._ds)

  def image(self, i: int) -> np.ndarray:
    return _to_rgb(np.asarray(self._ds[int(i)][self._image_key]))

  def images(self, idx: Sequence[int] | np.ndarray) -> list[np.ndarray]:
    return [self.image(i) for i in np.asarray(idx, dtype=np.int64)]

  def example_keys(self) -> list[str]:
    return [f"{self.name}:{self.split}:{i}" for i in range(len(self))]


# ---------------------------------------------------------------------------------------------
# Registry.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """Registry entry: how a benchmark's data is read and where to get it."""

  name: str
  num_classes: int
  kind: str  # "animal_mnist" | "fashion_mnist" | "tfds" | "folder"
  how_to_get: str
  tfds_name: str | None = None


BENCHMARKS: dict[str, Benchmark] = {
  b.name: b
  for b in (
    Benchmark("animal_mnist", 10, "animal_mnist", "`pip install animal-mnist==0.4`"),
    Benchmark("fashion_mnist", 10, "fashion_mnist", "`apt-get install dataset-fashion-mnist`"),
    Benchmark(
      "cifar100", 100, "tfds",
      "`tfds build cifar100 --file_format=array_record` (needs TensorFlow + network once)",
      tfds_name="cifar100",
    ),
    Benchmark("imagenet_r", 200, "folder",
              "the reference's pre-split imagenet-r package or train/test file lists (TFDS "
              "imagenet_r is test-only; SPEC 6)"),
    Benchmark("imagenet_a", 200, "folder",
              "the reference's pre-split imagenet-a package or train/test file lists (TFDS "
              "imagenet_a is test-only; SPEC 6)"),
    Benchmark("domainnet", 345, "folder",
              "the DomainNet images (6 domain folders) plus the reference's "
              "domainnet_{train,test}.yaml"),
    Benchmark("oxford_pets", 37, "folder", "the reference's Oxford-IIIT Pet split package"),
    Benchmark("eurosat", 10, "folder", "the reference's EuroSAT (RGB) split package or lists"),
    Benchmark("plantvillage", 15, "folder", "the reference's 15-class PlantVillage package"),
    Benchmark("vtab", 50, "folder", "the reference's VTAB-CL (5 domains x 10) package"),
    Benchmark("kvasir", 8, "folder", "the reference's Kvasir split package"),
  )
}  # fmt: skip


def _layout_text(data_dir: pathlib.Path, name: str) -> str:
  lines = []
  if name == "domainnet":
    lines.append(
      f"  {data_dir}/domainnet_{{train,test}}.yaml   (keys data = paths, targets = ints; paths "
      "rebased on data_dir, which holds clipart/ infograph/ painting/ quickdraw/ real/ sketch/)\nor"
    )
  lines.append(
    f"  {data_dir}/classes.txt + {data_dir}/{{train,test}}.csv   (one class name per line; rows "
    "'path,class_name', paths relative to data_dir)\nor"
  )
  lines.append(
    f"  {data_dir}/{{train,test}}/<class_name>/<image files>   (ImageFolder: ids = sorted "
    "class folder names)"
  )
  return "\n".join(lines)


def make_source(name: str, split: str, data_dir: str | os.PathLike | None = None):
  """The source for one benchmark split (SPEC 6).

  Args:
    name: one of `BENCHMARKS` (``animal_mnist``, ``fashion_mnist``, ``cifar100``, ``imagenet_r``,
      ``imagenet_a``, ``domainnet``, ``oxford_pets``, ``eurosat``, ``plantvillage``, ``vtab``,
      ``kvasir``).
    split: "train" or "test".
    data_dir: ignored for animal_mnist; Fashion-MNIST IDX folder (default
      /usr/share/datasets/fashion-mnist); TFDS data dir for cifar100 (default TFDS's); for the
      folder benchmarks the benchmark folder, laid out as in the module docstring.
  Returns:
    A `Source` whose ``num_classes`` equals the benchmark's C (checked).
  Raises:
    ValueError: unknown name or split, or a class-count / class-name mismatch between splits.
    FileNotFoundError: data missing; the message shows the expected layout and how to get it.
  """
  if name not in BENCHMARKS:
    raise ValueError(f"unknown benchmark {name!r}; valid names: {', '.join(sorted(BENCHMARKS))}.")
  split = _check_split(split)
  bench = BENCHMARKS[name]
  if bench.kind == "animal_mnist":
    source = animal_mnist(split)
  elif bench.kind == "fashion_mnist":
    source = fashion_mnist(split) if data_dir is None else fashion_mnist(split, data_dir)
  elif bench.kind == "tfds":
    source = TFDSSource(bench.tfds_name, split, data_dir)
  else:
    source = _folder_benchmark(bench, split, data_dir)
  if source.num_classes != bench.num_classes:
    raise ValueError(
      f"{name} {split}: found {source.num_classes} classes, the benchmark has "
      f"{bench.num_classes} (SPEC 2.6). Check the data folder / class list."
    )
  return source


def _folder_benchmark(bench: Benchmark, split: str, data_dir) -> FileSource:
  if data_dir is None:
    raise ValueError(
      f"{bench.name} needs data_dir, laid out as\n{_layout_text(pathlib.Path('<data_dir>'), bench.name)}"
    )
  data_dir = pathlib.Path(data_dir)
  missing_msg = (
    f"no {bench.name} data found for split {split!r} in {data_dir}. Expected\n"
    f"{_layout_text(data_dir, bench.name)}\nGet the data: {bench.how_to_get}. Nothing is "
    "downloaded at run time."
  )
  if not data_dir.is_dir():
    raise FileNotFoundError(missing_msg)
  if bench.name == "domainnet" and (data_dir / f"domainnet_{split}.yaml").exists():
    return domainnet_yaml(data_dir / f"domainnet_{split}.yaml", data_dir)
  if (data_dir / "classes.txt").exists() and (data_dir / f"{split}.csv").exists():
    return ManifestSource(data_dir / f"{split}.csv", data_dir / "classes.txt", data_dir)
  split_dir = data_dir / split
  if not split_dir.is_dir():
    raise FileNotFoundError(missing_msg)
  expected = None
  other = data_dir / ("test" if split == "train" else "train")
  if other.is_dir():
    expected = folder_classes(other)  # both splits must agree, or ids shift
  return ImageFolderSource(split_dir, class_names=expected)


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
