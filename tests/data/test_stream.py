"""TaskStream (SPEC 2.5 static shapes, 2.7 relabelling, 7.3 probes) and global batches."""

import numpy as np
import pytest

from ntkcl_jax.data import transforms
from ntkcl_jax.data.class_order import class_order, relabel
from ntkcl_jax.data.sources import ArraySource
from ntkcl_jax.data.stream import TaskStream

NUM_CLASSES = 6


def _source(per_class, seed, name):
  """Class c has per_class[c] random 12x10 grayscale images; original labels sorted by class."""
  labels = np.repeat(np.arange(NUM_CLASSES), per_class)
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (labels.size, 12, 10), dtype=np.uint8)
  return ArraySource(images, labels, [f"k{c}" for c in range(NUM_CLASSES)], name=name)


class CountingSource(ArraySource):
  """An ArraySource that looks file-backed (image_shape None) and counts decoded images."""

  image_shape = None

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.decoded = 0

  def image(self, i):
    self.decoded += 1
    return super().image(i)


@pytest.fixture
def stream():
  train = _source([5, 6, 7, 8, 9, 10], seed=0, name="train")  # 45 images
  test = _source([3, 3, 4, 4, 2, 2], seed=1, name="test")
  return TaskStream(
    train, test, order=class_order(1, NUM_CLASSES), init_cls=2, increment=2,
    image_size=8, resize_size=9, num_workers=2,
  )  # fmt: skip


def _epoch(stream, t, epoch, batch_size=4, **kw):
  return list(stream.train_batches(t, epoch, batch_size, seed=3, **kw))


def test_task_indices_and_relabelling(stream):
  order = class_order(1, NUM_CLASSES)
  new = relabel(stream.train.labels, order)
  assert stream.num_tasks == 3 and stream.task_range(1) == (2, 2)
  for t in range(3):
    idx = stream.train_indices(t)
    np.testing.assert_array_equal(idx, np.flatnonzero((new >= 2 * t) & (new < 2 * t + 2)))
  # task 2 holds new labels 4, 5 = original classes order[4], order[5]
  assert sorted(set(stream.train.labels[stream.train_indices(2)])) == sorted(order[4:6])
  seen = stream.test_indices(1)
  np.testing.assert_array_equal(seen, np.flatnonzero(relabel(stream.test.labels, order) < 4))
  assert stream.steps_per_epoch(0, 4) == int(np.ceil(stream.train_indices(0).size / 4))


def test_padding_mask_and_labels(stream):
  for t in range(3):
    k, s = stream.task_range(t)
    n = stream.train_indices(t).size
    batches = _epoch(stream, t, 0)
    assert len(batches) == stream.steps_per_epoch(t, 4)
    for b in batches:
      assert b["image"].shape == (4, 8, 8, 3) and b["image"].dtype == np.float32
      assert b["label"].dtype == np.int32 and b["mask"].dtype == bool
      valid = b["mask"]
      assert np.all((b["label"][valid] >= k) & (b["label"][valid] < k + s))
      np.testing.assert_array_equal(b["label"][valid], stream.labels("train")[b["index"][valid]])
      assert np.all(b["index"][~valid] == -1) and np.all(b["image"][~valid] == 0)
      assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
    last = batches[-1]
    assert last["mask"].sum() == n - 4 * (len(batches) - 1)
    if n % 4:
      assert not last["mask"].all()


def test_each_index_once_per_epoch_and_epochs_differ(stream):
  orders = []
  for epoch in range(2):
    batches = _epoch(stream, 2, epoch)
    seen = np.concatenate([b["index"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(np.sort(seen), stream.train_indices(2))
    orders.append(seen)
  assert not np.array_equal(orders[0], orders[1])


def test_determinism_and_resume(stream):
  full = _epoch(stream, 1, 4)
  again = _epoch(stream, 1, 4)
  for a, b in zip(full, again, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  resumed = _epoch(stream, 1, 4, start_step=2)
  assert len(resumed) == len(full) - 2
  for a, b in zip(full[2:], resumed, strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  other_seed = list(stream.train_batches(1, 4, 4, seed=4))
  assert not np.array_equal(other_seed[0]["image"], full[0]["image"])


def test_resume_skips_decoding():
  train = _source([5, 6, 7, 8, 9, 10], seed=0, name="train")
  counting = CountingSource(train._images, train.labels, train.class_names)
  s = TaskStream(
    counting, counting, order=np.arange(NUM_CLASSES), init_cls=2, increment=2, image_size=8,
    resize_size=9, num_workers=1,
  )  # fmt: skip
  n = s.train_indices(0).size  # 11 images: steps of 4, 4, 3
  batches = list(s.train_batches(0, 0, 4, seed=0, start_step=2))
  assert len(batches) == 1 and counting.decoded == n - 8


def test_augmentation_contract(stream):
  """Row r of step s is train_transform(image, rng=default_rng([seed, t, epoch, 2, s, r]))."""
  step, t, epoch = 1, 2, 5
  batch = _epoch(stream, t, epoch)[step]
  for r in range(4):
    rng = np.random.default_rng([3, t, epoch, 2, step, r])
    img = stream.train.image(int(batch["index"][r]))
    np.testing.assert_array_equal(batch["image"][r], transforms.train_transform(img, 8, rng))
  order = np.random.default_rng([3, t, epoch, 1]).permutation(stream.train_indices(t).size)
  np.testing.assert_array_equal(stream.epoch_order(t, epoch, 3), stream.train_indices(t)[order])


@pytest.mark.parametrize("process_count", [2, 4])
def test_multi_host_slices_concatenate_to_global_batch(stream, process_count):
  full = _epoch(stream, 0, 1, batch_size=8)
  parts = [
    _epoch(stream, 0, 1, batch_size=8, process_index=p, process_count=process_count)
    for p in range(process_count)
  ]
  for step, ref in enumerate(full):
    for key in ref:
      joined = np.concatenate([parts[p][step][key] for p in range(process_count)])
      np.testing.assert_array_equal(joined, ref[key])
  assert parts[0][0]["image"].shape[0] == 8 // process_count
  with pytest.raises(ValueError, match="divisible by process_count 3"):
    _epoch(stream, 0, 1, batch_size=8, process_index=0, process_count=3)


def test_eval_batches(stream):
  idx = stream.test_indices(2)[::-1]  # any given order is kept
  batches = list(stream.eval_batches(idx, 4, "test"))
  assert len(batches) == int(np.ceil(idx.size / 4))
  got = np.concatenate([b["index"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(got, idx)
  first = batches[0]
  for r in range(4):
    img = stream.test.image(int(idx[r]))
    np.testing.assert_array_equal(first["image"][r], transforms.test_transform(img, 8, 9))
  np.testing.assert_array_equal(first["label"], stream.labels("test")[idx[:4]])
  again = list(stream.eval_batches(idx, 4, "test"))
  np.testing.assert_array_equal(again[-1]["image"], batches[-1]["image"])
  # prototypes: training images of a task through the test transform
  proto = list(
    stream.eval_batches(stream.train_indices(0), 8, "train", process_index=1, process_count=2)
  )
  assert proto[0]["image"].shape == (4, 8, 8, 3)
  with pytest.raises(ValueError, match="out of range"):
    list(stream.eval_batches([10_000], 4, "test"))


def test_value_range_minus_one_one():
  train = _source([5] * NUM_CLASSES, seed=0, name="train")
  s = TaskStream(
    train, train, order=np.arange(NUM_CLASSES), init_cls=3, increment=3, image_size=8,
    resize_size=8, value_range="-1_1",
  )  # fmt: skip
  b = next(iter(s.eval_batches(s.train_indices(0), 4, "train")))
  img = train.image(int(b["index"][0]))
  np.testing.assert_allclose(b["image"][0], transforms.test_transform(img, 8, 8, "-1_1"), atol=1e-6)
  assert b["image"].min() < 0.0


def test_probe_indices(stream):
  probe = stream.probe_indices(1, "train", 5, analysis_seed=7)
  labels = stream.labels("train")[probe]
  assert probe.size == 5 and np.all(np.diff(labels) >= 0)
  assert sorted(np.bincount(labels - 2, minlength=2).tolist()) == [2, 3]  # balanced: 5 = 2 + 3
  np.testing.assert_array_equal(probe, stream.probe_indices(1, "train", 5, analysis_seed=7))
  draws = {tuple(stream.probe_indices(2, "train", 6, analysis_seed=a)) for a in range(6)}
  assert len(draws) > 1  # depends on the analysis seed
  assert len(set(stream.probe_indices(2, "train", 6, analysis_seed=0))) == 6  # no repeats
  # the documented recipe: rng = default_rng([analysis_seed, t]) decides the extra class first
  rng = np.random.default_rng([7, 1])
  extra = rng.permutation(2)[:1]
  assert np.bincount(labels - 2)[extra[0]] == 3
  assert tuple(class_order(1, NUM_CLASSES)[4:6]) == (3, 5)
  with pytest.raises(ValueError, match="needs 3 images of class 5"):
    # task 2 = new labels 4, 5 = original classes order[4:6] = (3, 5); class 5 has 2 test images
    stream.probe_indices(2, "test", 6, analysis_seed=0)


def test_constructor_errors():
  a = _source([3] * NUM_CLASSES, seed=0, name="a")
  b = ArraySource(a._images, a.labels, [f"other{c}" for c in range(NUM_CLASSES)])
  with pytest.raises(ValueError, match="disagree on classes"):
    TaskStream(a, b, order=np.arange(6), init_cls=2, increment=2, image_size=8, resize_size=9)
  with pytest.raises(ValueError, match="order has shape"):
    TaskStream(a, a, order=np.arange(5), init_cls=2, increment=2, image_size=8, resize_size=9)
  with pytest.raises(ValueError, match="resize_size"):
    TaskStream(a, a, order=np.arange(6), init_cls=2, increment=2, image_size=8, resize_size=7)


def test_put_batch_assembles_sharded_array(stream):
  """A stream batch → global arrays split over `data` (`sharding.put_batch`, as the trainer)."""
  jax = pytest.importorskip("jax")
  from jax.sharding import PartitionSpec as P

  from ntkcl_jax import sharding

  n_dev = jax.device_count()
  local = next(iter(stream.eval_batches(stream.test_indices(2), n_dev, "test")))
  out = sharding.put_batch(local, sharding.make_mesh())
  assert out["image"].shape == (n_dev, 8, 8, 3)
  assert out["image"].sharding.spec == P("data")
  np.testing.assert_array_equal(np.asarray(out["image"]), local["image"])
  np.testing.assert_array_equal(np.asarray(out["mask"]), local["mask"])
