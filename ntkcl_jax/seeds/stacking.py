"""Stacked pytrees, steps and batches of K seeds: one leading seed axis, one vmapped step.

Every per-run array (trainable parameters, optimiser state, EMA bank, prototypes, reg snapshot)
gets a leading seed axis of size K (`stack_trees`), and the per-run step function, unchanged
(`train_step.make_train_step`), is `jax.vmap`-ed over that axis (`vmap_over_seeds`). Each seed
keeps its own class order (SPEC 2.7), data order, augmentation and dropout keys: K
`TaskStream`s, one per seed, whose batches `zip_seed_batches` stacks into (K, B, ...) host
batches. Parameters shared by all seeds (the pre-trained backbone, identical when it is loaded
from a checkpoint) need not be stacked: give them axis `None` in `in_axes` and they are stored
once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntkcl_jax.seeds.layout import SEED_AXIS

# ------------------------------------------------------------------------------------------------
# Keys and stacked pytrees.


def root_keys(seeds: Sequence[int]) -> jax.Array:
  """(K,) typed keys, entry i = `jax.random.key(seeds[i])` (a single run's root key)."""
  return jnp.stack([jax.random.key(int(s)) for s in seeds])


def fold_in_each(keys: jax.Array, data: int | jax.Array) -> jax.Array:
  """(K,) keys → (K,) keys, entry i = `fold_in(keys[i], data)` (`data` is shared by the seeds)."""
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, data)


def _shape(x) -> tuple[int, ...]:
  """Shape of an array, typed PRNG key array (which NumPy cannot convert) or Python scalar."""
  return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _shape_and_dtype(x) -> tuple[tuple[int, ...], Any]:
  return _shape(x), x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def stack_trees(trees: Sequence[Any]) -> Any:
  """K pytrees of the same structure, shapes and dtypes → one pytree with a leading K axis.

  Works for NumPy/JAX arrays, typed PRNG key arrays and `flax.struct` nodes (e.g. `TrainState`).
  Raises ValueError naming the first leaf that differs (structure, shape or dtype).
  """
  trees = list(trees)
  if not trees:
    raise ValueError("stack_trees needs at least one tree.")
  first, treedef = jax.tree_util.tree_flatten_with_path(trees[0])
  for i, tree in enumerate(trees[1:], start=1):
    other, other_def = jax.tree_util.tree_flatten_with_path(tree)
    if other_def != treedef:
      raise ValueError(f"tree {i} has another structure than tree 0:\n{other_def}\nvs\n{treedef}")
    for (path, a), (_, b) in zip(first, other):
      if _shape_and_dtype(a) != _shape_and_dtype(b):
        raise ValueError(
          f"leaf {jax.tree_util.keystr(path)}: tree {i} has shape/dtype {_shape_and_dtype(b)}, "
          f"tree 0 {_shape_and_dtype(a)}."
        )
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def index_tree(tree: Any, i: int) -> Any:
  """Seed i of a stacked pytree (every leaf `x[i]`)."""
  return jax.tree_util.tree_map(lambda x: x[i], tree)


def unstack_tree(tree: Any, k: int) -> list[Any]:
  """Inverse of `stack_trees`: a pytree with leading axis `k` → k pytrees.

  Raises ValueError naming a leaf whose leading axis is not k.
  """
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not _shape(x) or _shape(x)[0] != k:
      raise ValueError(
        f"leaf {jax.tree_util.keystr(path)} has shape {_shape(x)}, expected leading axis {k}."
      )
  return [index_tree(tree, i) for i in range(k)]


# ------------------------------------------------------------------------------------------------
# Stacked steps.


def vmap_over_seeds(
  fn: Callable[..., Any], in_axes: int | Sequence[Any] | None, out_axes: Any = 0
) -> Callable[..., Any]:
  """`fn` on one run → the same function on K stacked runs (`jax.vmap` over the seed axis).

  Args:
    fn: a pure per-run function, e.g. the train step `(state, frozen, aux, batch, key, lr) ->
      (state, terms)` or the eval function `(params, prototypes, num_seen, images) -> ...`.
    in_axes: per positional argument, 0 where it carries the seed axis (first), None where all
      seeds share it; a pytree prefix reaches inside an argument (`train_step_in_axes`).
    out_axes: as in `jax.vmap`; default every output stacked on axis 0.
  Returns:
    The vmapped function. `spmd_axis_name="seed"` adds the seed mesh axis to any sharding
    constraint inside `fn` (so a constraint `P("data")` on a batch becomes `P("seed", "data")`).
  """
  return jax.vmap(fn, in_axes=in_axes, out_axes=out_axes, spmd_axis_name=SEED_AXIS)


def train_step_in_axes(*, shared_backbone: bool = True, num_extra: int = 1) -> tuple[Any, ...]:
  """`in_axes` for `(state, frozen, aux, batch, key, *extra)` (`train_step.make_train_step`).

  Everything is stacked except, with `shared_backbone`, `frozen["backbone"]` (one copy for all
  seeds: the AugReg weights do not depend on the seed) and the `num_extra` trailing arguments
  (today the learning rate, equal for all seeds at the same step; 0 once lr is computed inside
  the step from `TrainState.step`).
  """
  frozen = {"backbone": None, "peft": 0} if shared_backbone else 0
  return (0, frozen, 0, 0, 0, *([None] * num_extra))


def params_in_axes(*, shared_backbone: bool = True) -> Any:
  """`in_axes` of an eval parameter tree {"backbone", "peft": {"current", "ema"}, "fusion"}."""
  return {"backbone": None, "peft": 0, "fusion": 0} if shared_backbone else 0


def eval_fn_in_axes(*, shared_backbone: bool = True) -> tuple[Any, ...]:
  """`in_axes` for `(params, prototypes, num_seen, images)` (`train_step.make_eval_fn`): num_seen
  is shared (all seeds have the same task split), images are per seed (K, b, H, W, C), since each
  seed's class order selects other test images. `(params, images)` feature functions
  (`train_step.make_feature_fn`) take `(params_in_axes(...), 0)`."""
  return (params_in_axes(shared_backbone=shared_backbone), 0, None, 0)


def skip_empty_batches(
  step_fn: Callable[..., tuple[Any, ...]], batch_argnum: int = 3, num_carried: int = 1
) -> Callable[..., tuple[Any, ...]]:
  """A step that leaves its carried state unchanged when its batch has no valid row.

  Seeds whose task has fewer steps in an epoch (class orders differ, so n_t can differ) get
  all-padding batches from `zip_seed_batches` while the others finish; without this wrapper SGD's
  momentum and weight decay would still move them.

  Args:
    step_fn: returns `(*carried, terms)`, where `carried[j]` is the new value of argument j
      (`make_train_step`: `(state, terms)`; `make_loop_step`: `(state, health, terms)`).
    batch_argnum: position of the batch (a dict with "mask").
    num_carried: how many leading arguments / outputs are carried state.
  Returns:
    The same signature; the terms gain `"active"` (bool): False on a skipped step, whose other
    terms are meaningless and must not be logged or checked.
  """

  def step(*args):
    *carried, terms = step_fn(*args)
    if len(carried) != num_carried:
      raise ValueError(f"step returned {len(carried)} carried values, expected {num_carried}.")
    active = jnp.any(args[batch_argnum]["mask"])
    kept = jax.tree_util.tree_map(
      lambda n, o: jnp.where(active, n, o), tuple(carried), tuple(args[:num_carried])
    )
    return (*kept, {**terms, "active": active})

  return step


# ------------------------------------------------------------------------------------------------
# Host batches.


def _padding_like(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """An all-padding batch (SPEC 2.5): zeros, mask False, index -1."""
  out = {k: np.zeros_like(v) for k, v in batch.items()}
  if "index" in out:
    out["index"][:] = -1
  return out


def zip_seed_batches(
  iterators: Sequence[Iterable[Mapping[str, np.ndarray]]],
  length: int | None = None,
  template: Mapping[str, np.ndarray] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """K per-seed batch iterators (e.g. each seed's `TaskStream.train_batches`) → (K, B, ...) batches.

  Entry i of every yielded array comes from `iterators[i]`. Iterators may have different lengths:
  one that has ended contributes an all-padding batch (mask False, see `skip_empty_batches`) until
  the longest ends, or until `length` batches were yielded (then every process of a multi-process
  run yields the same number, whatever its own seeds hold; `template`, a batch of the right
  layout, is needed when all of this process's iterators may be empty). Every batch must have the
  same keys, shapes and dtypes across seeds.
  """
  its = [iter(x) for x in iterators]
  done = [False] * len(its)
  count = 0
  while length is None or count < length:
    got = []
    for i, it in enumerate(its):
      b = None if done[i] else next(it, None)
      done[i] = b is None
      got.append(b)
    if all(done) and length is None:
      return
    real = [b for b in got if b is not None]
    if real:
      template = real[0]
    elif template is None:
      raise ValueError(f"zip_seed_batches: every iterator ended after {count} of {length} batches.")
    count += 1
    for i, b in enumerate(got):
      if b is not None and (
        set(b) != set(template)
        or any(_shape_and_dtype(b[k]) != _shape_and_dtype(template[k]) for k in template)
      ):
        raise ValueError(
          f"seed {i}'s batch does not match the others: "
          f"{ {k: _shape_and_dtype(v) for k, v in b.items()} } vs "
          f"{ {k: _shape_and_dtype(v) for k, v in template.items()} }."
        )
    filled = [b if b is not None else _padding_like(template) for b in got]
    yield {k: np.stack([b[k] for b in filled]) for k in template}
