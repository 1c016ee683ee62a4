"""Class order and task split (SPEC 2.7).

The reference draws the class order with NumPy's *legacy global* RNG::

  np.random.seed(seed); order = np.random.permutation(C)

and gives original class ``c`` the new label ``order.index(c)``. `class_order` reproduces that
permutation bit for bit with a private ``np.random.RandomState(seed)`` (the same Mersenne-Twister
stream as the global RNG after ``np.random.seed``), so the global NumPy state is never touched.
This module is the only place in the project that uses the legacy NumPy RNG.

Task sizes follow the reference's data manager: ``[init_cls] + [increment] * m`` plus one remainder
task when ``C - init_cls`` is not a multiple of ``increment``. Task ``t`` holds the new labels
``[k_t, k_t + s_t)``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["class_order", "label_to_task", "relabel", "task_splits"]


def class_order(seed: int, num_classes: int) -> np.ndarray:
  """The reference's class permutation for one seed (SPEC 2.7).

  Identical to ``np.random.seed(seed); np.random.permutation(num_classes)`` but drawn from a private
  ``np.random.RandomState``, so the global NumPy RNG state is unchanged.

  Args:
    seed: non-negative int, the run seed (the reference uses 0..4; ``default_rng`` would differ).
    num_classes: C >= 1.
  Returns:
    (C,) int64 permutation of ``0..C-1``; ``order[j]`` is the original class id with new label j.
  """
  if int(num_classes) < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
  if int(seed) < 0:
    raise ValueError(f"seed must be a non-negative int (legacy NumPy seeding), got {seed}.")
  return np.random.RandomState(int(seed)).permutation(int(num_classes)).astype(np.int64)


def _check_order(order: np.ndarray) -> np.ndarray:
  order = np.asarray(order)
  if order.ndim != 1 or not np.issubdtype(order.dtype, np.integer):
    raise ValueError(f"order must be a 1-D integer array, got shape {order.shape} {order.dtype}.")
  if not np.array_equal(np.sort(order), np.arange(order.size)):
    raise ValueError(
      f"order must be a permutation of 0..{order.size - 1}; got {order.tolist()[:20]}"
      f"{'...' if order.size > 20 else ''}. Build it with class_order(seed, C)."
    )
  return order


def relabel(original_labels: np.ndarray, order: np.ndarray) -> np.ndarray:
  """Map original class ids to new labels: ``new = order.index(original)`` (SPEC 2.7).

  Args:
    original_labels: (N,) int, original class ids in ``[0, C)``.
    order: (C,) permutation from `class_order`.
  Returns:
    (N,) int64 new labels in ``[0, C)``.
  """
  order = _check_order(order)
  labels = np.asarray(original_labels)
  if labels.size and (labels.min() < 0 or labels.max() >= order.size):
    raise ValueError(
      f"original labels must lie in [0, {order.size}); found range "
      f"[{labels.min()}, {labels.max()}]. Does the source have {order.size} classes?"
    )
  inverse = np.empty(order.size, dtype=np.int64)
  inverse[order] = np.arange(order.size, dtype=np.int64)
  return inverse[labels.astype(np.int64)]


def task_splits(num_classes: int, init_cls: int, increment: int) -> list[tuple[int, int]]:
  """Task ranges ``(k_t, s_t)``: task t holds new labels ``[k_t, k_t + s_t)`` (SPEC 2.7).

  Sizes are ``[init_cls] + [increment] * m`` plus a remainder task ``C - init_cls - m * increment``
  when that is positive, exactly like the reference's ``DataManager``.

  Args:
    num_classes: C >= 1.
    init_cls: size of task 0, ``1 <= init_cls <= C``.
    increment: size of the later tasks, >= 1 (may be anything when ``init_cls == C``).
  Returns:
    list of T ``(k_t, s_t)`` tuples with ``k_0 = 0``, ``k_{t+1} = k_t + s_t``, ``sum s_t = C``.
  """
  num_classes, init_cls, increment = int(num_classes), int(init_cls), int(increment)
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
  if not 1 <= init_cls <= num_classes:
    raise ValueError(
      f"init_cls must lie in [1, num_classes={num_classes}], got {init_cls}: task 0 would be "
      "empty or hold classes that do not exist."
    )
  sizes = [init_cls]
  if init_cls < num_classes:
    if increment < 1:
      raise ValueError(
        f"increment must be >= 1 when init_cls ({init_cls}) < num_classes ({num_classes}), got "
        f"{increment}: later tasks would be empty."
      )
    while sum(sizes) + increment < num_classes:
      sizes.append(increment)
    sizes.append(num_classes - sum(sizes))
  splits, start = [], 0
  for size in sizes:
    splits.append((start, size))
    start += size
  return splits


def label_to_task(splits: list[tuple[int, int]]) -> np.ndarray:
  """Task id of every new label.

  Args:
    splits: ``(k_t, s_t)`` list from `task_splits`.
  Returns:
    (C,) int64, entry j = the task t with ``k_t <= j < k_t + s_t``.
  """
  return np.concatenate([np.full(size, t, dtype=np.int64) for t, (_, size) in enumerate(splits)])
