"""The runs one process trains, behind one interface: one plain run, or K seeds stacked.

`train.run` is written once against `SeedStack`. A plain run (`config.seeds` empty) has K = 1,
unstacked trees on the 1-D `data` mesh (`sharding`), and every method is the identity or the
single-run placement, so its compiled step is exactly the single-run step. A stacked run
(`config.seeds="0,1,2"`) has K seeds stacked on a leading axis, the (seed, data) mesh of
`seeds.seed_mesh`, and functions `jax.vmap`-ed over the seed axis (`seeds.vmap_over_seeds`).

Host-side results are always lists with one entry per seed (`host`, `split`), so the per-seed
bookkeeping (prototype means, metrics, files) is one loop over seeds in both cases.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from ntkcl_jax import seeds as seeds_lib
from ntkcl_jax import sharding

__all__ = ["SeedStack"]

BatchMaker = Callable[[int, int, int], Iterator[dict[str, np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class SeedStack:
  """The seeds of a run and where their state lives.

  Attributes:
    seeds: the K seeds, in order (entry i of every stacked array belongs to `seeds[i]`).
    stacked: whether trees carry a leading seed axis (False: one plain run, K = 1).
    mesh: the 1-D ("data",) mesh of a plain run, or the ("seed", "data") mesh of a stacked one.
  """

  seeds: tuple[int, ...]
  stacked: bool
  mesh: jax.sharding.Mesh

  @classmethod
  def make(
    cls,
    seeds: Sequence[int],
    stacked: bool,
    batch_sizes: Mapping[str, int],
    seed_axis_size: int = 0,
    devices: Sequence[jax.Device] | None = None,
  ) -> SeedStack:
    """Builds the mesh; raises ValueError for a batch size the layout cannot split evenly.

    Args:
      seeds: the seeds (one when not `stacked`).
      batch_sizes: {"train.batch_size": B, "eval.batch_size": b} (named in errors).
      seed_axis_size: devices on the seed axis of a stacked run; 0 = `seeds.seed_layout`'s rule.
      devices: the mesh's devices; default `jax.devices()` (the trainer). `ntkcl_jax.preflight`
        passes a TPU topology's device descriptions: the same mesh for hardware it does not have.
    """
    seeds = tuple(int(s) for s in seeds)
    devices = list(jax.devices() if devices is None else devices)
    if not stacked:
      if len(seeds) != 1:
        raise ValueError(f"an unstacked run has one seed, got {seeds}.")
      for name, b in batch_sizes.items():
        sharding.check_batch_size(b, name, len(devices))
      return cls(seeds, False, sharding.make_mesh(devices))
    mesh = seeds_lib.seed_mesh(
      len(seeds), devices, batch_sizes=batch_sizes, seed_axis_size=seed_axis_size or None
    )
    return cls(seeds, True, mesh)

  @classmethod
  def single(cls, mesh: jax.sharding.Mesh) -> SeedStack:
    """The plain run on an existing 1-D data mesh (tools that evaluate one model)."""
    return cls((0,), False, mesh)

  @property
  def size(self) -> int:
    return len(self.seeds)

  # -- trees ---------------------------------------------------------------------------------------

  def stack(self, trees: Sequence[Any]) -> Any:
    """K per-seed trees → the run's tree (stacked on a leading axis, or the one tree)."""
    if len(trees) != self.size:
      raise ValueError(f"{len(trees)} trees for {self.size} seeds.")
    return seeds_lib.stack_trees(trees) if self.stacked else trees[0]

  @property
  def sharding(self) -> jax.sharding.NamedSharding:
    """Where run state lives: split over "seed" (stacked) or replicated (plain)."""
    if self.stacked:
      return seeds_lib.stacked_sharding(self.mesh)
    return sharding.replicated(self.mesh)

  @property
  def batch_sharding(self) -> jax.sharding.NamedSharding:
    """Where batches live (`put_batch`): rows over "data" (and seeds over "seed" when stacked)."""
    if self.stacked:
      return seeds_lib.seed_batch_sharding(self.mesh)
    return sharding.batch_sharding(self.mesh)

  def backbone_sharding(self, shared: bool) -> jax.sharding.NamedSharding:
    """Where the frozen backbone lives (`place_backbone`): replicated when the seeds share one
    (and in a plain run), else stacked like the run state."""
    return self.sharding if self.stacked and not shared else sharding.replicated(self.mesh)

  def backbone_tree(self, backbones: Sequence[Any], shared: bool) -> Any:
    """The backbone as the compiled functions take it, not yet placed: the one shared tree (or
    the plain run's), else the seeds' own stacked.

    Args:
      backbones: the shared backbone (one tree), or per seed its own (`shared` False).
    """
    return backbones[0] if shared or not self.stacked else self.stack(list(backbones))

  def place_backbone(self, backbones: Sequence[Any], shared: bool) -> Any:
    """`backbone_tree` placed with `backbone_sharding(shared)`."""
    tree = self.backbone_tree(backbones, shared)
    return self.replicate(tree) if shared or not self.stacked else self.put(tree)

  def put(self, tree: Any) -> Any:
    """Host (or device) run state, identical on every process → placed with `self.sharding`."""
    if self.stacked:
      return seeds_lib.put_stacked(tree, self.mesh)
    return sharding.put_replicated(tree, self.mesh)

  def replicate(self, tree: Any) -> Any:
    """A tree every seed shares (e.g. the pre-trained backbone) → replicated on the mesh."""
    return sharding.put_replicated(tree, self.mesh)

  def fetch(self, tree: Any) -> Any:
    """Device tree → host NumPy, whole (also the parts other processes hold)."""
    return sharding.to_host(tree) if self.stacked else jax.device_get(tree)

  def split(self, host_tree: Any) -> list[Any]:
    """A host tree of the run → one tree per seed."""
    if not self.stacked:
      return [host_tree]
    return [seeds_lib.index_tree(host_tree, i) for i in range(self.size)]

  def host(self, tree: Any) -> list[Any]:
    """Device tree of the run → K host trees (`fetch`, then `split`)."""
    return self.split(self.fetch(tree))

  def vmap(self, fn: Callable[..., Any], in_axes: Any) -> Callable[..., Any]:
    """A per-run function → the run's function (vmapped over seeds when stacked, else `fn`)."""
    return seeds_lib.vmap_over_seeds(fn, in_axes) if self.stacked else fn

  # -- batches -------------------------------------------------------------------------------------

  def batches(
    self, make: BatchMaker, batch_size: int, length: int | None = None
  ) -> Iterator[dict[str, np.ndarray]]:
    """This process's host batches of the run.

    Args:
      make: `(i, process_index, process_count) → iterator` of seed i's batches for that part of
        the rows (`TaskStream.train_batches` / `eval_batches` with those arguments).
      batch_size: B of one seed's global batch.
      length: stacked runs: the number of batches every process yields (the longest seed's, over
        all seeds, so all processes step together); seeds that end earlier get padding.
    Yields:
      plain run: seed 0's batches for this process; stacked: (K_local, B_local, ...) batches of
      the process's block (`seeds.local_block`).
    """
    if not self.stacked:
      yield from make(0, jax.process_index(), jax.process_count())
      return
    local, part, parts = seeds_lib.local_block(self.mesh, self.size, batch_size)
    yield from seeds_lib.zip_seed_batches([make(i, part, parts) for i in local], length=length)

  def put_batch(self, batch: Mapping[str, np.ndarray], batch_size: int) -> dict[str, jax.Array]:
    """A host batch from `batches` → global arrays sharded over the data (and seed) axes."""
    if self.stacked:
      return seeds_lib.put_seed_batch(batch, self.mesh, self.size, batch_size)
    return sharding.put_batch(dict(batch), self.mesh)
