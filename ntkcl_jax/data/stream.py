"""Class-incremental task stream: indices, padded batches, probes (SPEC 2.5, 2.7, 7.3).

`TaskStream` joins a train and a test `Source` with a class order and a task split. Labels in
every batch are the *new* global labels (``relabel(original, order)``); task t holds
``[k_t, k_t + s_t)``.

Randomness is a pure function of its inputs, never of what was consumed before:

* shuffle of task t's training indices in ``epoch``: ``np.random.default_rng([seed, t, epoch, 1])
  .permutation(n_t)`` applied to the ascending index list;
* augmentation of global batch row r at step s: ``np.random.default_rng([seed, t, epoch, 2, s, r])``
  (RandomResizedCrop draws, then one uniform for the flip);
* probes: ``np.random.default_rng([analysis_seed, t])`` (SPEC 7.3).

So a run resumed at ``start_step`` replays the same batches without decoding the skipped ones, and
any split of the global batch over processes gives the same rows.

Static shapes (SPEC 2.5): every batch has the configured global size B; the last one is padded
with zero images, label 0, index -1 and ``mask = False``. With ``process_count = P`` each process
gets the contiguous rows ``[p·B/P, (p+1)·B/P)`` of the global batch (B must be divisible by P).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ntkcl_jax.data import transforms
from ntkcl_jax.data.class_order import label_to_task, relabel, task_splits
from ntkcl_jax.data.sources import Source

__all__ = ["TaskStream"]

_SHUFFLE_TAG = 1
_AUGMENT_TAG = 2


def _check_nonneg(name: str, value: int) -> int:
  if int(value) < 0:
    raise ValueError(f"{name} must be a non-negative int, got {value}.")
  return int(value)


class TaskStream:
  """Train/test sources + class order + task split -> per-task index sets and batches.

  Args:
    train, test: `Source`s of the same dataset (same class names, original ids).
    order: (C,) class permutation from `class_order` (new label j = original class order[j]).
    init_cls, increment: task sizes (SPEC 2.7, `task_splits`).
    image_size: output side (224 for ViT-B/16).
    resize_size: short side before the centre crop in the test transform (256 at 224).
    crop_scale, crop_ratio: RandomResizedCrop ranges (SPEC 2.5).
    value_range: "0_1" (÷255, the reference) or "-1_1".
    num_workers: threads used to decode and transform one batch (default ``min(8, cpu count)``;
      0 or 1 = in the calling thread). Results do not depend on it.
  """

  def __init__(
    self,
    train: Source,
    test: Source,
    *,
    order: np.ndarray,
    init_cls: int,
    increment: int,
    image_size: int,
    resize_size: int,
    crop_scale: tuple[float, float] = (0.05, 1.0),
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    value_range: str = "0_1",
    num_workers: int | None = None,
  ):
    order = np.asarray(order)
    if train.num_classes != test.num_classes or list(train.class_names) != list(test.class_names):
      raise ValueError(
        f"train and test sources disagree on classes ({train.num_classes} vs {test.num_classes} "
        "classes, or different names/order): original ids would not match (SPEC 2.7, 6)."
      )
    if order.shape != (train.num_classes,):
      raise ValueError(
        f"order has shape {order.shape}, the sources have {train.num_classes} classes; build it "
        "with class_order(seed, num_classes)."
      )
    if value_range not in transforms.VALUE_RANGES:
      raise ValueError(
        f"value_range must be one of {transforms.VALUE_RANGES}, got {value_range!r}."
      )
    if resize_size < image_size:
      raise ValueError(f"resize_size ({resize_size}) must be >= image_size ({image_size}).")
    self.train, self.test = train, test
    self.order = order
    self.num_classes = int(train.num_classes)
    self.splits = task_splits(self.num_classes, init_cls, increment)
    self.task_of_label = label_to_task(self.splits)
    self.image_size, self.resize_size = int(image_size), int(resize_size)
    self.crop_scale = tuple(float(x) for x in crop_scale)
    self.crop_ratio = tuple(float(x) for x in crop_ratio)
    self.value_range = value_range
    self.num_workers = min(8, os.cpu_count() or 1) if num_workers is None else int(num_workers)
    self._labels = {"train": relabel(train.labels, order), "test": relabel(test.labels, order)}
    self._sources = {"train": train, "test": test}
    self._train_idx = [self._task_members("train", t) for t in range(self.num_tasks)]
    for t, idx in enumerate(self._train_idx):
      if idx.size == 0:
        raise ValueError(f"task {t} {self.task_range(t)} has no training images.")

  # -- indices ------------------------------------------------------------------------------

  @property
  def num_tasks(self) -> int:
    """T."""
    return len(self.splits)

  def task_range(self, t: int) -> tuple[int, int]:
    """(k_t, s_t): task t holds new labels [k_t, k_t + s_t)."""
    if not 0 <= t < self.num_tasks:
      raise ValueError(f"task {t} out of range [0, {self.num_tasks}).")
    return self.splits[t]

  def labels(self, split: str) -> np.ndarray:
    """(N,) int64 new labels of every example of ``split`` ("train" or "test")."""
    return self._labels[self._check_split(split)]

  def _check_split(self, split: str) -> str:
    if split not in self._sources:
      raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    return split

  def _task_members(self, split: str, t: int) -> np.ndarray:
    k, s = self.task_range(t)
    lab = self._labels[split]
    return np.flatnonzero((lab >= k) & (lab < k + s))

  def train_indices(self, t: int) -> np.ndarray:
    """(n_t,) int64 ascending indices into ``train`` of task t's images."""
    return self._train_idx[t].copy()

  def test_indices(self, upto_t: int) -> np.ndarray:
    """(n,) int64 ascending test indices of all classes seen after task ``upto_t`` (new label <
    k_t + s_t)."""
    k, s = self.task_range(upto_t)
    return np.flatnonzero(self._labels["test"] < k + s)

  def steps_per_epoch(self, t: int, batch_size: int) -> int:
    """S = ceil(n_t / B) (SPEC 2.5)."""
    return math.ceil(self._train_idx[t].size / int(batch_size))

  def epoch_order(self, t: int, epoch: int, seed: int) -> np.ndarray:
    """(n_t,) task t's training indices in the order of ``epoch`` (pure function of its inputs)."""
    rng = np.random.default_rng(
      [
        _check_nonneg("seed", seed),
        _check_nonneg("t", t),
        _check_nonneg("epoch", epoch),
        _SHUFFLE_TAG,
      ]
    )
    return self._train_idx[t][rng.permutation(self._train_idx[t].size)]

  def probe_indices(self, t: int, split: str, n: int, analysis_seed: int) -> np.ndarray:
    """Class-balanced probe set of task t (SPEC 7.3), reproducible.

    With ``rng = np.random.default_rng([analysis_seed, t])``: each of the s_t classes gets
    ``n // s_t`` images, and the ``n % s_t`` classes at ``rng.permutation(s_t)[:n % s_t]`` one
    more; then, class by class in new-label order, ``rng.choice(members, count, replace=False)``.

    Returns:
      (n,) int64 indices into ``split``, grouped by new label (ascending), ascending within a class.
    """
    split = self._check_split(split)
    k, s = self.task_range(t)
    n = int(n)
    if n < 1:
      raise ValueError(f"probe size n must be >= 1, got {n}.")
    rng = np.random.default_rng([_check_nonneg("analysis_seed", analysis_seed), t])
    counts = np.full(s, n // s, dtype=np.int64)
    counts[rng.permutation(s)[: n % s]] += 1
    lab = self._labels[split]
    out = []
    for j in range(s):
      members = np.flatnonzero(lab == k + j)
      if members.size < counts[j]:
        raise ValueError(
          f"probe of task {t} ({split}) needs {counts[j]} images of class {k + j}, it has "
          f"{members.size}; use a smaller n."
        )
      out.append(np.sort(rng.choice(members, size=int(counts[j]), replace=False)))
    return np.concatenate(out).astype(np.int64)

  # -- batches ------------------------------------------------------------------------------

  @staticmethod
  def _local_rows(batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
    batch_size, process_count = int(batch_size), int(process_count)
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, process_count={process_count}).")
    if batch_size % process_count:
      raise ValueError(
        f"the global batch size {batch_size} must be divisible by process_count {process_count}; "
        f"use a multiple of {process_count}."
      )
    per = batch_size // process_count
    return process_index * per, (process_index + 1) * per

  def _executor(self) -> ThreadPoolExecutor | None:
    return ThreadPoolExecutor(max_workers=self.num_workers) if self.num_workers > 1 else None

  def _run(self, pool: ThreadPoolExecutor | None, fn, n_rows: int) -> None:
    """Calls fn(rows) over contiguous chunks of range(n_rows), in ``pool`` when given."""
    workers = 1 if pool is None else min(self.num_workers, n_rows)
    if workers <= 1:
      fn(range(n_rows))
      return
    bounds = np.linspace(0, n_rows, workers + 1).astype(int)
    futures = [pool.submit(fn, range(bounds[w], bounds[w + 1])) for w in range(workers)]
    for fut in futures:
      fut.result()

  def _make_batch(
    self,
    pool: ThreadPoolExecutor | None,
    split: str,
    indices: np.ndarray,
    row_start: int,
    row_stop: int,
    augment_seed: list[int] | None,
  ) -> dict[str, np.ndarray]:
    """Rows [row_start, row_stop) of the padded global batch over ``indices`` (<= B of them)."""
    source = self._sources[split]
    n_local = row_stop - row_start
    valid_rows = np.arange(row_start, min(row_stop, indices.size))
    idx = indices[valid_rows] if valid_rows.size else np.zeros(0, dtype=np.int64)
    size = self.image_size
    image = np.zeros((n_local, size, size, 3), dtype=np.float32)
    fetched = source.images(idx) if source.image_shape is not None and idx.size else None
    zero_one = self.value_range == "0_1"

    def work(rows):
      for k in rows:
        img = fetched[k] if fetched is not None else source.image(int(idx[k]))
        if augment_seed is None:
          out = transforms.test_transform_uint8(img, size, self.resize_size)
        else:
          rng = np.random.default_rng([*augment_seed, int(valid_rows[k])])
          out = transforms.train_transform_uint8(img, size, rng, self.crop_scale, self.crop_ratio)
        if zero_one:  # = to_float(out, "0_1") exactly, without temporaries
          np.divide(out, np.float32(255.0), out=image[k], dtype=np.float32)
        else:
          image[k] = transforms.to_float(out, self.value_range)

    self._run(pool, work, idx.size)
    labels = np.zeros(n_local, dtype=np.int32)
    labels[: idx.size] = self._labels[split][idx]
    index = np.full(n_local, -1, dtype=np.int32)
    index[: idx.size] = idx
    mask = np.zeros(n_local, dtype=bool)
    mask[: idx.size] = True
    return {"image": image, "label": labels, "mask": mask, "index": index}

  def train_batches(
    self,
    t: int,
    epoch: int,
    batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
  ) -> Iterator[dict[str, np.ndarray]]:
    """Augmented training batches of task t for one epoch (SPEC 2.5).

    Each yielded dict holds this process's rows (B_local = B / process_count) of the padded global
    batch: ``image`` float32 (B_local, H, H, 3) (train transform), ``label`` int32 (B_local,) new
    global labels in [k_t, k_t + s_t) (0 on padding), ``mask`` bool (B_local,) validity, ``index``
    int32 (B_local,) index into the train source (-1 on padding). Steps ``start_step .. S-1`` are
    produced, identical to those of a run started at 0.
    """
    lo, hi = self._local_rows(batch_size, process_index, process_count)
    order = self.epoch_order(t, epoch, seed)
    steps = self.steps_per_epoch(t, batch_size)
    if not 0 <= int(start_step) <= steps:
      raise ValueError(f"start_step {start_step} not in [0, {steps}] for task {t}.")

    def gen():
      pool = self._executor()
      try:
        for step in range(int(start_step), steps):
          chunk = order[step * batch_size : (step + 1) * batch_size]
          aug_seed = [int(seed), int(t), int(epoch), _AUGMENT_TAG, step]
          yield self._make_batch(pool, "train", chunk, lo, hi, aug_seed)
      finally:
        if pool is not None:
          pool.shutdown()

    return gen()

  def eval_batches(
    self,
    indices: Sequence[int] | np.ndarray,
    batch_size: int,
    split: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
  ) -> Iterator[dict[str, np.ndarray]]:
    """Test-transform batches over ``indices`` of ``split``, in the given order, padded + masked.

    Used for test sets (``test_indices``) and for prototypes (``train_indices(t)`` with
    ``split="train"``). Dict layout as in `train_batches`; ceil(len(indices) / B) batches.
    """
    split = self._check_split(split)
    lo, hi = self._local_rows(batch_size, process_index, process_count)
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= len(self._sources[split])):
      raise ValueError(
        f"indices out of range for the {split} source ({len(self._sources[split])})."
      )

    def gen():
      pool = self._executor()
      try:
        for step in range(math.ceil(indices.size / batch_size)):
          chunk = indices[step * batch_size : (step + 1) * batch_size]
          yield self._make_batch(pool, split, chunk, lo, hi, None)
      finally:
        if pool is not None:
          pool.shutdown()

    return gen()
