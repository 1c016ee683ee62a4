"""K seeds trained in lockstep by one jitted step over a (seed, data) mesh (building blocks).

One module past ~400 lines on purpose: layout rule, shardings, stacking, vmap wrappers and the
per-seed batch zip share one convention (seed axis first, "seed" mesh axis) and are used together.

A stacked run is K independent runs of the same config that differ only in `seed`. Every per-run
array (trainable parameters, optimiser state, EMA bank, prototypes, reg snapshot) gets a leading
seed axis of size K, and the per-run step function, unchanged (`train_step.make_train_step`), is
`jax.vmap`-ed over that axis (`vmap_over_seeds`). Each seed keeps its own class order (SPEC 2.7),
data order, augmentation and dropout keys: K `TaskStream`s, one per seed, whose batches
`zip_seed_batches` stacks into (K, B, ...) host batches.

Mesh (`seed_mesh`): n devices as an (n_seed, n_data) grid with axes ("seed", "data"), both
`AxisType.Auto` (as `sharding.make_mesh`). Stacked state is sharded `P("seed")` on its leading
axis (replicated over "data"), batches `P("seed", "data")`: seed group g holds seeds
[g·K/n_seed, (g+1)·K/n_seed) and splits each of their batches of B rows over its n_data devices.
Inside a group the step is the ordinary data-parallel step (gradients summed over "data"); groups
never communicate. `jax.make_mesh` puts "data" on the minor (fastest) device axis.

Layout rule (`seed_layout`): n_seed = gcd(n, K), the largest divisor of the device count that also
divides K. That makes n_data = n / n_seed as small as it can be (the fewest devices per seed, so
the least all-reduce traffic and the most rows per device); every batch size must then be a
multiple of n_data, else the error names layouts that work. `seed_axis_size=` overrides the rule.

Parameters shared by all seeds (the pre-trained backbone, identical when it is loaded from a
checkpoint) need not be stacked: give them axis `None` in `in_axes` and they are stored once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from ntkcl_jax.sharding import DATA_AXIS

SEED_AXIS = "seed"

__all__ = [
  "SEED_AXIS",
  "eval_fn_in_axes",
  "fold_in_each",
  "index_tree",
  "local_block",
  "params_in_axes",
  "parse_seeds",
  "put_seed_batch",
  "put_stacked",
  "root_keys",
  "seed_batch_sharding",
  "seed_layout",
  "seed_mesh",
  "skip_empty_batches",
  "stack_trees",
  "stacked_sharding",
  "train_step_in_axes",
  "unstack_tree",
  "vmap_over_seeds",
  "zip_seed_batches",
]


# ------------------------------------------------------------------------------------------------
# Seed lists.


def parse_seeds(value: str | int | Iterable[int]) -> tuple[int, ...]:
  """`"0,1,2,3,4"` (or a sequence of ints, or one int) → (0, 1, 2, 3, 4), in the given order.

  Seeds must be distinct non-negative ints (SPEC 2.7 seeds the legacy NumPy RNG with them).
  Raises ValueError naming the offending entry.
  """
  if isinstance(value, str):
    parts = [p.strip() for p in value.split(",")]
    if not value.strip() or any(not p for p in parts):
      raise ValueError(f"seeds {value!r}: expected comma-separated ints such as '0,1,2,3,4'.")
    try:
      seeds = [int(p) for p in parts]
    except ValueError:
      raise ValueError(f"seeds {value!r}: every entry must be an int (e.g. '0,1,2,3,4').") from None
  elif isinstance(value, (int, np.integer)):
    seeds = [int(value)]
  else:
    seeds = list(value)
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, (int, np.integer))]
    if bad:
      raise ValueError(f"seeds {seeds!r}: entries {bad!r} are not ints.")
    seeds = [int(s) for s in seeds]
  if not seeds:
    raise ValueError("seeds: at least one seed is needed.")
  negative = [s for s in seeds if s < 0]
  if negative:
    raise ValueError(f"seeds {seeds}: {negative} negative (class_order needs seeds >= 0).")
  repeated = sorted({s for s in seeds if seeds.count(s) > 1})
  if repeated:
    raise ValueError(f"seeds {seeds}: {repeated} repeated; the K runs would be identical.")
  return tuple(seeds)


def root_keys(seeds: Sequence[int]) -> jax.Array:
  """(K,) typed keys, entry i = `jax.random.key(seeds[i])` (a single run's root key)."""
  return jnp.stack([jax.random.key(int(s)) for s in seeds])


def fold_in_each(keys: jax.Array, data: int | jax.Array) -> jax.Array:
  """(K,) keys → (K,) keys, entry i = `fold_in(keys[i], data)` (`data` is shared by the seeds)."""
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, data)


# ------------------------------------------------------------------------------------------------
# Mesh and shardings.


def _layout_error(
  num_seeds: int, num_devices: int, batch_sizes: Mapping[str, int], bad: str, n_data: int
) -> ValueError:
  """The ValueError for an impossible layout, naming layouts that work."""

  def fits(k: int, n: int) -> tuple[int, int] | None:
    s = math.gcd(n, k)
    return (s, n // s) if all(b % (n // s) == 0 for b in batch_sizes.values()) else None

  candidates = [k for k in range(1, 2 * max(num_seeds, num_devices) + 1) if fits(k, num_devices)]
  near = sorted(candidates, key=lambda k: (abs(k - num_seeds), k))[:3]
  options = [
    f"{k} seed{'s' * (k > 1)} ({'x'.join(map(str, fits(k, num_devices)))})" for k in sorted(near)
  ]
  fixes = []
  if options:
    fixes.append("use --config.seeds with " + " or ".join(options))
  b = batch_sizes[bad]
  fixes.append(f"set {bad}={n_data * math.ceil(b / n_data)}")
  fewer = next((n for n in range(num_devices - 1, 0, -1) if fits(num_seeds, n)), None)
  if fewer is not None:
    s, d = fits(num_seeds, fewer)
    fixes.append(f"run on {fewer} device{'s' * (fewer > 1)} ({s}x{d})")
  sizes = ", ".join(f"{k}={v}" for k, v in batch_sizes.items())
  return ValueError(
    f"{num_devices} devices, {num_seeds} seeds, {sizes}: the seed axis can be at most "
    f"gcd({num_devices}, {num_seeds}) = {num_devices // n_data} devices wide, so each seed's "
    f"batch is split over {n_data} devices and {bad}={b} is not a multiple of {n_data}. "
    f"Valid layouts (seed x data): {'; or '.join(fixes)}."
  )


def seed_layout(
  num_seeds: int,
  num_devices: int,
  batch_sizes: Mapping[str, int] | None = None,
  *,
  seed_axis_size: int | None = None,
) -> tuple[int, int]:
  """(n_seed, n_data) for K = `num_seeds` seeds on `num_devices` devices (module docstring).

  Args:
    num_seeds: K >= 1.
    num_devices: n >= 1.
    batch_sizes: e.g. {"train.batch_size": 16, "eval.batch_size": 256}; each must be a multiple
      of n_data (the rows of one seed's batch are split over the data axis).
    seed_axis_size: n_seed chosen by hand; must divide both n and K. Default gcd(n, K).
  Returns:
    (n_seed, n_data) with n_seed · n_data = n, n_seed | K.
  Raises:
    ValueError: naming the problem and layouts that work (other K, batch size or device count).
  """
  num_seeds, num_devices = int(num_seeds), int(num_devices)
  if num_seeds < 1 or num_devices < 1:
    raise ValueError(f"need num_seeds >= 1 and num_devices >= 1, got {num_seeds}, {num_devices}.")
  batch_sizes = dict(batch_sizes or {})
  if seed_axis_size is None:
    n_seed = math.gcd(num_devices, num_seeds)
  else:
    n_seed = int(seed_axis_size)
    if n_seed < 1 or num_devices % n_seed or num_seeds % n_seed:
      raise ValueError(
        f"seed_axis_size={n_seed} must divide both the device count ({num_devices}) and the "
        f"number of seeds ({num_seeds}); gcd = {math.gcd(num_devices, num_seeds)} works."
      )
  n_data = num_devices // n_seed
  for name, b in batch_sizes.items():
    if int(b) % n_data:
      if seed_axis_size is not None:
        raise ValueError(
          f"{name}={b} is not a multiple of the {n_data} devices of the data axis "
          f"({n_seed}x{n_data}); use a multiple of {n_data} or a wider seed axis."
        )
      raise _layout_error(num_seeds, num_devices, batch_sizes, name, n_data)
  return n_seed, n_data


def seed_mesh(
  num_seeds: int,
  devices: Sequence[jax.Device] | None = None,
  *,
  batch_sizes: Mapping[str, int] | None = None,
  seed_axis_size: int | None = None,
) -> jax.sharding.Mesh:
  """A 2-D ("seed", "data") mesh, both axes `AxisType.Auto`, laid out by `seed_layout`.

  Args:
    num_seeds: K, the number of stacked runs.
    devices: default all devices of all processes (`jax.devices()`).
    batch_sizes, seed_axis_size: as in `seed_layout`.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = seed_layout(
    num_seeds, len(devices), batch_sizes=batch_sizes, seed_axis_size=seed_axis_size
  )
  return jax.make_mesh(
    shape, (SEED_AXIS, DATA_AXIS), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices
  )


def stacked_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (seed) axis split over "seed", the rest replicated over "data"."""
  return NamedSharding(mesh, PartitionSpec(SEED_AXIS))


def seed_batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """(K, B, ...) batches: seeds over "seed", each seed's rows over "data"."""
  return NamedSharding(mesh, PartitionSpec(SEED_AXIS, DATA_AXIS))


def put_stacked(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Stacked arrays (leading axis K) → sharded `P("seed")`.

  Host arrays (and fully addressable device arrays) must hold the whole stack on every process;
  a global array that spans other processes' devices (run state already placed) is copied on the
  devices. Always fresh buffers: two leaves that were the same array (e.g. the reg snapshot and
  the parameters it copies) must not share a buffer, or donating one to the step would
  invalidate the other.
  """
  sharding = stacked_sharding(mesh)
  copy = jax.jit(jnp.copy, out_shardings=sharding)

  def put(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return copy(x)
    x = np.asarray(x)
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree_util.tree_map(put, tree)


def local_block(mesh: jax.sharding.Mesh, num_seeds: int, batch_size: int) -> tuple[range, int, int]:
  """Which part of the (K, B) global batch this process feeds.

  Returns:
    (seeds, row_part, row_parts): this process supplies seeds `seeds` (positions in the seed
    list) and, of each, rows [row_part·B/row_parts, (row_part+1)·B/row_parts), i.e. exactly what
    `TaskStream.train_batches(..., process_index=row_part, process_count=row_parts)` yields.
    Single process: (range(K), 0, 1).
  """
  index_map = seed_batch_sharding(mesh).addressable_devices_indices_map((num_seeds, batch_size))
  seeds = sorted({i for s, _ in index_map.values() for i in range(*s.indices(num_seeds))})
  rows = sorted({i for _, r in index_map.values() for i in range(*r.indices(batch_size))})
  per = len(rows)
  if (
    seeds != list(range(seeds[0], seeds[-1] + 1))
    or rows != list(range(rows[0], rows[0] + per))
    or batch_size % per
    or rows[0] % per
  ):
    raise ValueError(
      f"process {jax.process_index()} holds seeds {seeds} and rows {rows[0]}..{rows[-1]} of the "
      f"({num_seeds}, {batch_size}) batch: not one contiguous block; build the mesh with "
      "seed_mesh() so each process's devices are one block of the (seed, data) grid."
    )
  return range(seeds[0], seeds[-1] + 1), rows[0] // per, batch_size // per


def put_seed_batch(
  local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh, num_seeds: int, batch_size: int
) -> dict[str, jax.Array]:
  """This process's block of the (K, B, ...) batch (`local_block`) → global arrays `P("seed",
  "data")`. Single process: the whole (K, B, ...) batch."""
  sharding = seed_batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(
      sharding, np.asarray(v), (num_seeds, batch_size, *np.shape(v)[2:])
    )
    for k, v in local_batch.items()
  }


# ------------------------------------------------------------------------------------------------
# Stacked pytrees.


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
