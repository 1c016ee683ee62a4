"""Where K stacked seeds live: the seed list, the (seed, data) mesh and its shardings.

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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ntkcl_jax.sharding import DATA_AXIS, mesh_of

SEED_AXIS = "seed"


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
  return mesh_of(shape, (SEED_AXIS, DATA_AXIS), devices)


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
