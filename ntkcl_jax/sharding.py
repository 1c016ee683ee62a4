"""Data-parallel mesh and shardings (SPEC 8): a 1-D `data` mesh with Auto axes, replicated state."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """`devices` on one `data` axis, `AxisType.Auto` (JAX 0.10 defaults to Explicit, under which a
  plain data-parallel value_and_grad raises ShardingTypeError).

  Args:
    devices: default all devices of all processes (`jax.devices()`, what the trainer runs on);
      a compile-only tool passes a topology's device descriptions (`ntkcl_jax.preflight`).
  """
  devices = list(jax.devices() if devices is None else devices)
  return mesh_of((len(devices),), (DATA_AXIS,), devices)


def num_slices(devices: Sequence[Any]) -> int:
  """How many TPU slices `devices` span (their distinct `slice_index`; 1 on CPU / GPU)."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def mesh_of(
  shape: Sequence[int], names: Sequence[str], devices: Sequence[Any]
) -> jax.sharding.Mesh:
  """A mesh of `shape` over `devices` with `AxisType.Auto` axes, multi-slice aware.

  Within one slice this is `jax.make_mesh` (devices ordered for the slice's interconnect). When
  the devices span several slices (a multi-slice TPU job), the slices go on the outermost axis
  whose size they divide (`mesh_utils.create_hybrid_device_mesh`: that axis crosses the
  data-centre network, the others stay within a slice), so a stacked run puts its independent
  seeds on different slices (no traffic between them), and a data-parallel run splits its batch
  over slices last (XLA then reduces its gradients within each slice and across slices with
  transfers between them; `ntkcl_jax.preflight` counts those as `dcn-*`).

  Raises:
    ValueError: no axis of `shape` is divisible by the number of slices.
  """
  axis_types = (AxisType.Auto,) * len(shape)
  n = num_slices(devices)
  if n == 1:
    return jax.make_mesh(tuple(shape), tuple(names), axis_types=axis_types, devices=devices)
  axis = next((i for i, size in enumerate(shape) if size % n == 0), None)
  if axis is None:
    raise ValueError(
      f"a mesh {dict(zip(names, shape, strict=True))} cannot span the {n} slices of its devices: "
      f"no axis is a multiple of {n}; choose a seed count or train.seed_axis_size that is."
    )
  dcn = [1] * len(shape)
  dcn[axis] = n
  ici = [size // d for size, d in zip(shape, dcn, strict=True)]
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  return jax.sharding.Mesh(grid, tuple(names), axis_types=axis_types)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, what: str, num_devices: int | None = None) -> None:
  """The global batch must split evenly over the mesh's devices (and hence processes).

  `num_devices`: the mesh's device count (default `jax.device_count()`)."""
  n = jax.device_count() if num_devices is None else int(num_devices)
  if batch_size % n:
    raise ValueError(
      f"{what}={batch_size} is not divisible by the {n} devices of the mesh; choose a multiple "
      f"of {n} (e.g. {max(n, batch_size // n * n)})."
    )


def under_mesh(fn: Callable[..., Any], mesh: jax.sharding.Mesh) -> Callable[..., Any]:
  """`fn` traced with `mesh` (abstractly) in context, so that constraints inside it such as
  `gather_batch` name the mesh's axes. Wrap a function before jitting it (`steps.build_programs`);
  nothing changes outside tracing and no device is touched."""

  @functools.wraps(fn)
  def traced_under_mesh(*args: Any, **kwargs: Any) -> Any:
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return traced_under_mesh


def gather_batch(tree: Any) -> Any:
  """Batch-sharded leaves → the whole batch on every device of the mesh (`with_sharding_constraint`
  to replicated, one all-gather each), inside a function traced `under_mesh`; unchanged outside.

  For small per-example values that the rest of a step combines across the whole batch (L_MI's
  B x D features, labels and mask against the old prototypes: an (B + M)^2 similarity matrix).
  Constrained here, XLA gathers them once and computes the small remainder on every device;
  left to itself it splits the concatenation with the replicated prototype rows over `data`
  and moves the pieces with all-to-alls and collective-permutes in the forward and backward
  pass. In a function vmapped with `spmd_axis_name="seed"` the constraint keeps the seed axis
  (`P("seed")`). The gradient flowing back is sliced to each device's rows, without
  communication.
  """
  if jax.sharding.get_abstract_mesh().empty:
    return tree
  return jax.tree_util.tree_map(
    lambda x: jax.lax.with_sharding_constraint(x, PartitionSpec()), tree
  )


def put_replicated(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Host arrays → arrays replicated over the mesh (identical on every process)."""
  sharding = replicated(mesh)
  return jax.tree_util.tree_map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
  )


def put_batch(local_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """This process's rows → global batch arrays sharded over `data`."""
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in local_batch.items()
  }


def to_host(tree: Any) -> Any:
  """Global arrays → full NumPy arrays on every process (all-gather across hosts)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


PLATFORMS = ("any", "cpu", "gpu", "tpu")


def backend_info(platform: str = "any") -> dict[str, Any]:
  """What this run got: backend, device kind, device and process counts (logged, in summary.json).

  Args:
    platform: `train.platform`; "any" accepts whatever JAX initialised, "cpu" / "gpu" / "tpu"
      raise when the default backend is another one (e.g. a CUDA install that silently fell back
      to CPU).
  Raises:
    ValueError: naming the backend found, the devices, and how to install the missing one.
  """
  if platform not in PLATFORMS:
    raise ValueError(f"train.platform={platform!r}; valid: {PLATFORMS}.")
  devices = jax.devices()
  info = {
    "backend": jax.default_backend(),
    "device_kind": devices[0].device_kind,
    "device_count": jax.device_count(),
    "local_device_count": jax.local_device_count(),
    "process_count": jax.process_count(),
    "jax_version": jax.__version__,
  }
  if platform != "any" and info["backend"] != platform:
    extra = {"gpu": "cuda12", "tpu": "tpu"}.get(platform)
    install = (
      f' Install it with: pip install -e ".[{extra}]" (README "GPU / TPU").' if extra else ""
    )
    raise ValueError(
      f"train.platform={platform!r} but JAX's backend is {info['backend']!r} "
      f"({info['device_count']} x {info['device_kind']}, jax {info['jax_version']}).{install} "
      "Or pass --config.train.platform=any to run on what is there."
    )
  return info
