"""File-backed sources: `FileSource`, ImageFolder trees and CSV manifests (SPEC 6)."""

from __future__ import annotations

import csv
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from ntkcl_jax.data.sources.base import SourceBase, _check_labels

# torchvision.datasets.folder.IMG_EXTENSIONS (matched case-insensitively, as there).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _pil_rgb(path: str) -> np.ndarray:
  from PIL import Image  # only file-backed sources need PIL

  with open(path, "rb") as f:  # torchvision.datasets.folder.pil_loader
    img = Image.open(f)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


class FileSource(SourceBase):
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

  def __len__(self) -> int:
    return len(self.paths)

  def image(self, i: int) -> np.ndarray:
    return _pil_rgb(self.paths[int(i)])

  def example_keys(self) -> list[str]:
    keys = []
    for p in self.paths:
      try:
        keys.append(pathlib.Path(os.path.relpath(p, self.root)).as_posix())
      except ValueError:  # different drive (Windows)
        keys.append(pathlib.Path(p).as_posix())
    return keys


def check_files_exist(paths: Sequence[str], what: str, root: os.PathLike, hint: str = "") -> None:
  """Raises FileNotFoundError counting the missing `paths` and naming the first three."""
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(
      f"{len(missing)} {what} are missing under {root}, e.g. {missing[:3]}.{hint}"
    )


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
      check_files_exist(paths, f"files listed in {manifest_csv}", root)
    super().__init__(
      paths, np.asarray(labels), class_names, root=root, name=f"Manifest({manifest_csv})"
    )
