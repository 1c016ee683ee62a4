"""Background batch building: the host prepares (and places) batches while the device computes.

`prefetch(batches, put, size)` runs the host iterator `batches` and `put` (e.g. `sharding.put_batch`,
which starts the host-to-device copy) in one daemon thread and keeps up to `size` finished
results in a bounded queue. The consumer gets the results in the iterator's order, so the data
order (a pure function of seed, task, epoch and step, `data.stream`) and a resumed run's
`start_step` are exactly those of the iterator. Decoding and augmentation inside one batch use the
stream's own worker threads (`TaskStream.num_workers`); PIL and NumPy release the GIL there.

An exception in the thread is re-raised in the consumer at the batch where it happened. Closing
the returned iterator (or leaving a `with contextlib.closing(...)` block, as the trainer does when
a step fails) stops the thread within one batch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["prefetch"]

T = TypeVar("T")
_DONE = object()
_POLL_S = 0.1


class _Failure:
  def __init__(self, error: BaseException):
    self.error = error


def prefetch(
  batches: Iterable[Any], put: Callable[[Any], T] | None = None, size: int = 2
) -> Iterator[T]:
  """`put(b)` for each b of `batches`, computed up to `size` batches ahead in a background thread.

  Args:
    batches: host batches (any iterable; consumed only by the background thread).
    put: applied to each batch in the thread (identity when None).
    size: how many finished batches may wait (>= 1); with the one the consumer holds and the one
      being built, the host runs up to size + 1 batches ahead of the device.
  Returns:
    a generator over the results, in order.
  """
  if size < 1:
    raise ValueError(f"prefetch size must be >= 1, got {size}.")
  out: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def offer(item) -> bool:
    while not stop.is_set():
      try:
        out.put(item, timeout=_POLL_S)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for batch in batches:
        if not offer(batch if put is None else put(batch)):
          return
      offer(_DONE)
    except BaseException as e:  # handed to the consumer
      offer(_Failure(e))
    finally:
      close = getattr(batches, "close", None)
      if close is not None:  # a generator's own finally (e.g. its thread pool) runs here
        close()

  thread = threading.Thread(target=produce, name="ntkcl-prefetch", daemon=True)
  thread.start()

  def consume():
    try:
      while True:
        item = out.get()
        if item is _DONE:
          return
        if isinstance(item, _Failure):
          raise item.error
        yield item
    finally:
      stop.set()
      thread.join(timeout=10)

  return consume()
