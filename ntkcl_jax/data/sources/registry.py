"""The benchmark registry and `make_source` (SPEC 6): which source reads each benchmark."""

from __future__ import annotations

import dataclasses
import os
import pathlib

from ntkcl_jax.data.sources.arrays import (
  FASHION_MNIST_DIR,
  animal_mnist,
  animal_mnist_dir,
  fashion_mnist,
  fashion_mnist_files,
)
from ntkcl_jax.data.sources.base import _check_split
from ntkcl_jax.data.sources.domainnet import domainnet_yaml
from ntkcl_jax.data.sources.files import (
  FileSource,
  ImageFolderSource,
  ManifestSource,
  folder_classes,
)
from ntkcl_jax.data.sources.tfds import TFDSSource


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


def _benchmark(name: str) -> Benchmark:
  if name not in BENCHMARKS:
    raise ValueError(f"unknown benchmark {name!r}; valid names: {', '.join(sorted(BENCHMARKS))}.")
  return BENCHMARKS[name]


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
  bench = _benchmark(name)
  split = _check_split(split)
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


def missing_data(name: str, data_dir: str | os.PathLike | None = None) -> str | None:
  """Why `make_source(name, split, data_dir)` would fail for lack of data, or None: a cheap check of
  what exists on disk (no image or label is read), so a run can stop before it writes anything.

  Covers both splits. The message says what was looked for, where, and how to get it.
  """
  try:
    bench = _benchmark(name)
    if bench.kind == "animal_mnist":
      animal_mnist_dir()
    elif bench.kind == "fashion_mnist":
      for split in ("train", "test"):
        fashion_mnist_files(split, data_dir or FASHION_MNIST_DIR)
    elif bench.kind == "tfds":
      return _missing_tfds(bench, data_dir)
    else:
      for split in ("train", "test"):
        _folder_layout(bench, split, data_dir)
  except (FileNotFoundError, ValueError) as e:
    return str(e)
  return None


def _missing_tfds(bench: Benchmark, data_dir) -> str | None:
  import tensorflow_datasets as tfds  # optional, heavy import

  builder = tfds.builder(bench.tfds_name, data_dir=None if not data_dir else str(data_dir))
  splits = set(builder.info.splits)  # empty until the dataset is prepared there
  if {"train", "test"} <= splits:
    return None
  where = data_dir or "the default TFDS data dir (~/tensorflow_datasets)"
  return (
    f"TFDS dataset {bench.tfds_name!r} is not prepared in {where} (looked in {builder.data_dir}; "
    f"splits found: {sorted(splits) or 'none'}). Get the data: {bench.how_to_get}, then copy the "
    f"folder {bench.tfds_name}/<version>/ there and pass data_dir=<that TFDS data dir>. Nothing "
    "is downloaded at run time."
  )


def _folder_benchmark(bench: Benchmark, split: str, data_dir) -> FileSource:
  layout, path = _folder_layout(bench, split, data_dir)
  data_dir = pathlib.Path(data_dir)
  if layout == "yaml":
    return domainnet_yaml(path, data_dir)
  if layout == "manifest":
    return ManifestSource(path, data_dir / "classes.txt", data_dir)
  expected = None
  other = data_dir / ("test" if split == "train" else "train")
  if other.is_dir():
    expected = folder_classes(other)  # both splits must agree, or ids shift
  return ImageFolderSource(path, class_names=expected)


def _folder_layout(bench: Benchmark, split: str, data_dir) -> tuple[str, pathlib.Path]:
  """("yaml" | "manifest" | "folder", the split's yaml / csv / folder) found in data_dir, in the
  order of the package docstring; FileNotFoundError (ValueError without data_dir) otherwise."""
  if not data_dir:
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
    return "yaml", data_dir / f"domainnet_{split}.yaml"
  if (data_dir / "classes.txt").exists() and (data_dir / f"{split}.csv").exists():
    return "manifest", data_dir / f"{split}.csv"
  if not (data_dir / split).is_dir():
    raise FileNotFoundError(missing_msg)
  return "folder", data_dir / split
