"""SPEC 6 sources: ImageFolder trees, manifests, DomainNet yaml, Animal-/Fashion-MNIST, TFDS."""

import os
import pathlib
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from ntkcl_jax.data.sources import (
  ArraySource,
  ImageFolderSource,
  ManifestSource,
  Source,
  TFDSSource,
  animal_mnist,
  domainnet_yaml,
  fashion_mnist,
  make_source,
  manifest_hash,
  source_manifest_hash,
)
from ntkcl_jax.data.sources import arrays as arrays_module
from ntkcl_jax.data.sources import domainnet as domainnet_yaml_module

FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")


def _png(path: pathlib.Path, value: int, size=(5, 4), mode="RGB"):
  path.parent.mkdir(parents=True, exist_ok=True)
  shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
  Image.fromarray(np.full(shape, value, dtype=np.uint8), mode=mode).save(path)


@pytest.fixture
def folder_tree(tmp_path):
  """train/ and test/ trees; class folders 'a', 'B', 'C' (sorted: B, C, a)."""
  root = tmp_path / "bench"
  for split, n in (("train", 2), ("test", 1)):
    for c, cls in enumerate(["a", "B", "C"]):
      for k in range(n):
        _png(root / split / cls / f"img{k}.png", value=10 * c + k)
    (root / split / "a" / "notes.txt").write_text("not an image")
  _png(root / "train" / "B" / "nested" / "deep.PNG", value=99, mode="L")  # grayscale, upper ext
  return root


def test_image_folder_semantics(folder_tree):
  src = ImageFolderSource(folder_tree / "train")
  assert isinstance(src, Source)
  assert src.class_names == ["B", "C", "a"]  # case-sensitive sorted(): uppercase first
  assert len(src) == 7 and src.num_classes == 3 and src.image_shape is None
  np.testing.assert_array_equal(src.labels, [0, 0, 0, 1, 1, 2, 2])
  keys = src.example_keys()
  assert keys[:3] == ["B/img0.png", "B/img1.png", "B/nested/deep.PNG"]  # sorted walk order
  deep = src.image(2)
  assert deep.shape == (4, 5, 3) and deep.dtype == np.uint8 and np.all(deep == 99)  # L -> RGB
  assert np.all(src.image(5) == 0)  # class 'a', img0: value 10*0 + 0
  batch = src.images([6, 3])
  # 'a'/img1 = 10*0 + 1; 'C'/img0 = 10*2 + 0 (values set from the unsorted list a, B, C)
  assert isinstance(batch, list) and np.all(batch[0] == 1) and np.all(batch[1] == 20)


def test_image_folder_class_list_mismatch_and_empty_class(folder_tree):
  with pytest.raises(ValueError, match=r"missing \['D'\]"):
    ImageFolderSource(folder_tree / "train", class_names=["B", "C", "D", "a"])
  (folder_tree / "test" / "E").mkdir()
  with pytest.raises(FileNotFoundError, match="no image files"):
    ImageFolderSource(folder_tree / "test")


def test_manifest_hash_is_order_invariant_and_root_independent(folder_tree, tmp_path):
  h = manifest_hash([("x.png", 1), ("y.png", 0)])
  assert h == manifest_hash([("y.png", 0), ("x.png", 1)])
  assert h != manifest_hash([("x.png", 0), ("y.png", 1)])
  assert h != manifest_hash([("x.png", 1)])
  moved = tmp_path / "elsewhere"
  shutil.copytree(folder_tree, moved)
  a = source_manifest_hash(ImageFolderSource(folder_tree / "train"))
  assert a == source_manifest_hash(ImageFolderSource(moved / "train"))
  os.remove(moved / "train" / "C" / "img1.png")
  assert a != source_manifest_hash(ImageFolderSource(moved / "train"))


def test_manifest_source(tmp_path):
  for k, v in enumerate([5, 6, 7]):
    _png(tmp_path / "imgs" / f"{k}.png", value=v)
  (tmp_path / "classes.txt").write_text("zebra\nant\ncat\n")
  (tmp_path / "train.csv").write_text(
    "path,class_name\nimgs/0.png,cat\nimgs/1.png,zebra\nimgs/2.png,ant\n"
  )
  src = ManifestSource(tmp_path / "train.csv", tmp_path / "classes.txt", tmp_path)
  assert src.class_names == ["zebra", "ant", "cat"]  # the list fixes ids, not sorting
  np.testing.assert_array_equal(src.labels, [2, 0, 1])
  assert src.example_keys() == ["imgs/0.png", "imgs/1.png", "imgs/2.png"]
  assert np.all(src.image(1) == 6)
  (tmp_path / "bad.csv").write_text("imgs/0.png,dog\n")
  with pytest.raises(ValueError, match=r"class 'dog' is not in"):
    ManifestSource(tmp_path / "bad.csv", tmp_path / "classes.txt", tmp_path)
  (tmp_path / "missing.csv").write_text("imgs/9.png,cat\n")
  with pytest.raises(FileNotFoundError, match="1 files listed"):
    ManifestSource(tmp_path / "missing.csv", tmp_path / "classes.txt", tmp_path)


DOMAINNET_YAML = """data:
- /old/mount/domainnet/clipart/zebra/clipart_1.png
- /old/mount/domainnet/real/apple/real_1.png
- 'sketch/zebra/sketch_1.png'
targets:
- 1
- 0
- 1
"""


def _domainnet_tree(root: pathlib.Path):
  _png(root / "clipart" / "zebra" / "clipart_1.png", 1)
  _png(root / "real" / "apple" / "real_1.png", 2)
  _png(root / "sketch" / "zebra" / "sketch_1.png", 3)


def test_domainnet_yaml_rebases_paths(tmp_path):
  _domainnet_tree(tmp_path / "dn")
  (tmp_path / "domainnet_train.yaml").write_text(DOMAINNET_YAML)
  src = domainnet_yaml(tmp_path / "domainnet_train.yaml", tmp_path / "dn", num_classes=3)
  np.testing.assert_array_equal(src.labels, [1, 0, 1])
  assert src.class_names == ["apple", "zebra", "class_2"]
  assert src.example_keys() == [
    "clipart/zebra/clipart_1.png",
    "real/apple/real_1.png",
    "sketch/zebra/sketch_1.png",
  ]
  assert np.all(src.image(2) == 3)
  with pytest.raises(FileNotFoundError, match="missing under"):
    domainnet_yaml(tmp_path / "domainnet_train.yaml", tmp_path / "wrong_root", num_classes=3)


def test_domainnet_yaml_round_trips_block_and_flow_styles(tmp_path):
  """A split file written by PyYAML (block or flow lists, as the reference's files may be) reads back
  to the same paths and targets."""
  _domainnet_tree(tmp_path)
  data = ["/old/clipart/zebra/clipart_1.png", "real/apple/real_1.png", "sketch/zebra/sketch_1.png"]
  targets = [0, 1, 0]
  for flow in (False, True):
    path = tmp_path / f"split_{flow}.yaml"
    path.write_text(yaml.safe_dump({"data": data, "targets": targets}, default_flow_style=flow))
    assert domainnet_yaml_module.load_split_yaml(path) == (data, targets)
    src = domainnet_yaml(path, tmp_path, num_classes=2)
    assert src.example_keys() == [
      "clipart/zebra/clipart_1.png",
      "real/apple/real_1.png",
      "sketch/zebra/sketch_1.png",
    ]
    np.testing.assert_array_equal(src.labels, targets)
    assert src.class_names == ["zebra", "apple"]


@pytest.mark.parametrize(
  ("text", "match"),
  [
    ("data: [a.png, b.png\ntargets: [0, 1]\n", r"(?s)is not valid YAML.*line 2, column 8"),
    ("data:\n- a.png\n", r"keys 'data' .* and 'targets'.*found \['data'\]"),
    ("- a.png\n- b.png\n", r"must be a mapping .*found list"),
    ("data: a.png\ntargets: 0\n", "is not a list"),
    ("data: [a.png]\ntargets: [zebra]\n", r"'targets' must be ints; found \['zebra'\]"),
    ("data: [a.png, b.png]\ntargets: [0]\n", "2 paths but 1 targets"),
  ],
)
def test_domainnet_yaml_malformed_files_name_the_problem(tmp_path, text, match):
  path = tmp_path / "domainnet_train.yaml"
  path.write_text(text)
  with pytest.raises(ValueError, match=match) as info:
    domainnet_yaml(path, tmp_path, num_classes=2, check_files=False)
  assert str(path) in str(info.value)


def test_array_source_grayscale_and_batches():
  imgs = np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2)
  src = ArraySource(imgs, np.array([1, 0, 1]), ["x", "y"], name="toy")
  assert src.image_shape == (2, 2, 3)
  np.testing.assert_array_equal(src.image(1), np.repeat(imgs[1][..., None], 3, -1))
  np.testing.assert_array_equal(src.images([2, 0]), np.stack([src.image(2), src.image(0)]))
  assert src.example_keys() == ["toy:0", "toy:1", "toy:2"]
  with pytest.raises(ValueError, match=r"\[0, 2\)"):
    ArraySource(imgs, np.array([0, 1, 2]), ["x", "y"])


def test_animal_mnist_split():
  train, test = animal_mnist("train"), animal_mnist("test")
  assert len(train) == 8000 and len(test) == 2000
  assert train.class_names[0] == "bear" and train.num_classes == 10
  np.testing.assert_array_equal(np.bincount(train.labels), [800] * 10)
  np.testing.assert_array_equal(np.bincount(test.labels), [200] * 10)
  train_pos = {int(k.split(":")[1]) for k in train.example_keys()}
  test_pos = {int(k.split(":")[1]) for k in test.example_keys()}
  assert not train_pos & test_pos and len(train_pos | test_pos) == 10000  # disjoint, exhaustive
  again = animal_mnist("train")
  assert train.example_keys() == again.example_keys()  # deterministic
  np.testing.assert_array_equal(train.images([0, 5000]), again.images([0, 5000]))
  img = train.image(3)
  assert img.shape == (28, 28, 3) and img.dtype == np.uint8
  assert np.array_equal(img[..., 0], img[..., 2])
  # the documented recipe, recomputed here from the raw arrays
  _, raw_labels = arrays_module._load_animal_mnist_arrays()
  rng = np.random.RandomState(12345)
  expected_test = []
  for c in range(10):
    members = np.flatnonzero(raw_labels == c)
    expected_test.extend(members[rng.permutation(1000)[800:]].tolist())
  assert sorted(test_pos) == sorted(expected_test)
  assert source_manifest_hash(train) != source_manifest_hash(test)


@pytest.mark.skipif(
  not FASHION_DIR.exists(), reason="needs `apt-get install dataset-fashion-mnist` (absent here)"
)
def test_fashion_mnist():
  train, test = fashion_mnist("train"), fashion_mnist("test")
  assert len(train) == 60000 and len(test) == 10000
  assert train.image_shape == (28, 28, 3) and train.image(0).shape == (28, 28, 3)
  np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
  assert train.class_names[9] == "Ankle boot"


def test_missing_data_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    fashion_mnist("train", data_dir=tmp_path)
  with pytest.raises(FileNotFoundError, match=r"(?s)no eurosat data.*train,test\}/<class_name>"):
    make_source("eurosat", "train", tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match=r"(?s)domainnet_\{train,test\}\.yaml.*classes\.txt"):
    make_source("domainnet", "test", tmp_path)
  with pytest.raises(ValueError, match=r"unknown benchmark 'cifar10'.*animal_mnist.*kvasir"):
    make_source("cifar10", "train", tmp_path)
  with pytest.raises(ValueError, match="split must be one of"):
    make_source("animal_mnist", "val")


def test_make_source_folder_and_manifest_layouts(tmp_path):
  root = tmp_path / "kvasir"
  classes = [f"c{k}" for k in range(8)]
  for split in ("train", "test"):
    for c, cls in enumerate(classes):
      _png(root / split / cls / "0.png", value=c)
  src = make_source("kvasir", "test", root)
  assert src.class_names == classes and np.all(src.image(7) == 7)
  # wrong class count for the benchmark
  with pytest.raises(ValueError, match="found 8 classes, the benchmark has 10"):
    make_source("eurosat", "train", root)
  # class folders differ between the splits -> error (ids would shift)
  shutil.rmtree(root / "test" / "c3")
  _png(root / "test" / "c9" / "0.png", value=1)
  with pytest.raises(ValueError, match=r"missing \['c3'\]"):
    make_source("kvasir", "test", root)
  # a manifest takes precedence over the folder tree
  (root / "classes.txt").write_text("\n".join(reversed(classes)) + "\n")
  (root / "train.csv").write_text("train/c0/0.png,c0\ntrain/c7/0.png,c7\n")
  man = make_source("kvasir", "train", root)
  np.testing.assert_array_equal(man.labels, [7, 0])


def test_tfds_source_with_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    src = make_source("cifar100", "train")
    assert isinstance(src, TFDSSource) and len(src) == 6 and src.num_classes == 100
    img = src.image(0)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert src.labels.shape == (6,) and src.labels.max() < 100
    assert src.example_keys()[1] == "cifar100:train:1"
  import sys

  assert "tensorflow" not in sys.modules  # reading never imports TensorFlow


def test_tfds_source_missing_dataset_error(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(FileNotFoundError, match=r"tfds build cifar100 --file_format=array_record"):
    TFDSSource("cifar100", "train", data_dir=tmp_path)
