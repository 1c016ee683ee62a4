"""SPEC 2.7: legacy-RNG class order, relabelling, task split."""
# ruff: noqa: NPY002  (the point of these tests is the legacy global NumPy RNG)

import numpy as np
import pytest

from ntkcl_jax.data.class_order import class_order, label_to_task, relabel, task_splits


@pytest.mark.parametrize("seed,num_classes", [(0, 10), (1, 100), (4, 345), (3, 7)])
def test_class_order_equals_legacy_global_permutation(seed, num_classes):
  saved = np.random.get_state()
  try:
    np.random.seed(seed)
    expected = np.random.permutation(num_classes)
  finally:
    np.random.set_state(saved)
  np.testing.assert_array_equal(class_order(seed, num_classes), expected)


def test_class_order_seed0_c10_known_value_and_differs_from_default_rng():
  # Printed by `np.random.seed(0); np.random.permutation(10)` (MT19937 legacy stream).
  np.testing.assert_array_equal(class_order(0, 10), [2, 8, 4, 9, 1, 6, 7, 3, 0, 5])
  assert not np.array_equal(class_order(0, 10), np.random.default_rng(0).permutation(10))


def test_class_order_leaves_global_rng_untouched():
  np.random.seed(123)
  before = np.random.get_state()
  class_order(0, 100)
  after = np.random.get_state()
  assert before[0] == after[0]
  np.testing.assert_array_equal(before[1], after[1])
  assert before[2:] == after[2:]


def test_class_order_rejects_bad_arguments():
  with pytest.raises(ValueError, match="num_classes"):
    class_order(0, 0)
  with pytest.raises(ValueError, match="non-negative"):
    class_order(-1, 10)


def test_relabel_is_position_in_order():
  order = np.array([2, 0, 3, 1])
  original = np.array([0, 1, 2, 3, 2, 2])
  # new label = order.index(c): 0 -> 1, 1 -> 3, 2 -> 0, 3 -> 2
  np.testing.assert_array_equal(relabel(original, order), [1, 3, 0, 2, 0, 0])
  order = class_order(3, 50)
  labels = np.arange(50)
  new = relabel(labels, order)
  np.testing.assert_array_equal(new, [order.tolist().index(c) for c in labels])
  np.testing.assert_array_equal(order[new], labels)  # inverse


def test_relabel_errors():
  with pytest.raises(ValueError, match="permutation"):
    relabel(np.array([0]), np.array([0, 0, 1]))
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    relabel(np.array([3]), np.array([2, 0, 1]))


@pytest.mark.parametrize(
  "num_classes,init_cls,increment,sizes",
  [
    (100, 10, 10, [10] * 10),
    (345, 23, 23, [23] * 15),
    (37, 7, 5, [7, 5, 5, 5, 5, 5, 5]),
    (10, 2, 2, [2] * 5),
    (10, 3, 3, [3, 3, 3, 1]),  # remainder task
    (11, 5, 4, [5, 4, 2]),  # remainder task
    (8, 8, 0, [8]),  # one task; increment unused
  ],
)
def test_task_splits(num_classes, init_cls, increment, sizes):
  splits = task_splits(num_classes, init_cls, increment)
  assert [s for _, s in splits] == sizes
  assert [k for k, _ in splits] == np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
  np.testing.assert_array_equal(label_to_task(splits), np.repeat(np.arange(len(sizes)), sizes))


@pytest.mark.parametrize(
  "args,match",
  [
    ((10, 0, 2), "init_cls"),
    ((10, 11, 2), "init_cls"),
    ((10, 4, 0), "increment"),
    ((0, 1, 1), "num_classes"),
  ],
)
def test_task_splits_errors(args, match):
  with pytest.raises(ValueError, match=match):
    task_splits(*args)
