"""K seeds trained in lockstep by one jitted step over a (seed, data) mesh (building blocks).

A stacked run is K independent runs of the same config that differ only in `seed`. `layout`:
the seed list, the (seed, data) mesh (`seed_mesh`, layout rule `seed_layout`) and the shardings
and placement of stacked state and batches. `stacking`: stacked pytrees (`stack_trees`), the
vmapped step (`vmap_over_seeds`, `skip_empty_batches`, in_axes helpers) and per-seed host batches
(`zip_seed_batches`). `seed_stack.SeedStack` puts them behind one interface for the trainer.
"""

from ntkcl_jax.seeds.layout import (
  SEED_AXIS,
  local_block,
  parse_seeds,
  put_seed_batch,
  put_stacked,
  seed_batch_sharding,
  seed_layout,
  seed_mesh,
  stacked_sharding,
)
from ntkcl_jax.seeds.stacking import (
  eval_fn_in_axes,
  fold_in_each,
  index_tree,
  params_in_axes,
  root_keys,
  skip_empty_batches,
  stack_trees,
  train_step_in_axes,
  unstack_tree,
  vmap_over_seeds,
  zip_seed_batches,
)

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
