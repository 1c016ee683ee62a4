"""Features over index sets, the one prediction rule (SPEC 1.6) and per-stage evaluation (SPEC 3)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntkcl_jax import metrics, sharding
from ntkcl_jax.data import TaskStream
from ntkcl_jax.models.heads import section_weighted_logits
from ntkcl_jax.seed_stack import SeedStack


def batched_apply_seeds(
  fn: Callable[..., Any],
  streams: Sequence[TaskStream],
  indices: Sequence[np.ndarray],
  split: str,
  batch_size: int,
  stack: SeedStack,
) -> list[tuple[Any, np.ndarray]]:
  """Runs `fn(images)` over each seed's `indices` (test transform), sharded over the mesh.

  Args:
    fn: images → outputs; in a stacked run images are (K, b, H, W, C) and every output has the
      leading seed axis (a function vmapped with `stack.vmap`).
    streams, indices: per seed, its stream and the indices into `split` to run.
  Returns:
    Per seed: (outputs concatenated over its valid rows as NumPy, the matching new labels (n,)).
  """
  length = max(math.ceil(len(ix) / batch_size) for ix in indices)

  def make(i, process_index, process_count):
    return streams[i].eval_batches(
      indices[i], batch_size, split, process_index=process_index, process_count=process_count
    )

  outs, labels = [[] for _ in streams], [[] for _ in streams]
  for batch in stack.batches(make, batch_size, length):
    arrays = stack.put_batch({k: batch[k] for k in ("image", "mask", "label")}, batch_size)
    got = sharding.to_host((fn(arrays["image"]), arrays["mask"], arrays["label"]))
    for i, (out, mask, label) in enumerate(stack.split(got)):
      outs[i].append(jax.tree_util.tree_map(lambda x, m=mask: np.asarray(x)[m], out))
      labels[i].append(np.asarray(label)[mask])
  return [
    (jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *o), np.concatenate(lab))
    for o, lab in zip(outs, labels)
  ]


def batched_apply(
  fn: Callable[..., Any],
  stream: TaskStream,
  indices: np.ndarray,
  split: str,
  batch_size: int,
  mesh: jax.sharding.Mesh,
) -> tuple[Any, np.ndarray]:
  """`batched_apply_seeds` of one run on the 1-D data mesh: (outputs over valid rows, labels)."""
  return batched_apply_seeds(fn, [stream], [indices], split, batch_size, SeedStack.single(mesh))[0]


def predictions(
  logits: jax.Array, num_seen: jax.Array | int, top_k: int = 5
) -> tuple[jax.Array, jax.Array]:
  """Task-agnostic prediction over the classes seen so far (SPEC 1.6): the one masking rule.

  Args:
    logits: (b, C) over all class rows. num_seen: C_seen; rows ≥ C_seen get −inf.
  Returns:
    (top-1 (b,), top-k (b, min(top_k, C))) class indices. With C_seen < top_k the last columns
    of top-k are −inf rows (meaningless); `evaluate_stage` reports top-5 only when C_seen ≥ 5.
  """
  logits = jnp.where(jnp.arange(logits.shape[1]) < num_seen, logits, -jnp.inf)
  return jnp.argmax(logits, -1), jax.lax.top_k(logits, min(top_k, logits.shape[1]))[1]


def make_predict_fn(
  features: Callable[[Any, jax.Array], jax.Array],
  section_weights: tuple[float, ...],
  top_k: int = 5,
) -> Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
  """The prototype classifier the trainer evaluates (and `python -m experiments.benchmarks step` times).

  Args:
    features: (params, images (b, H, W, 3)) → (b, D) eval-mode features.
    section_weights: ω of the test logits (`config.section_weights`; (1.0,) for one section).
  Returns:
    (params, prototypes (C, D), num_seen, images) → `predictions(...)` of the section-weighted
    cosine logits. Pure; jit it.
  """

  def predict(params, prototypes, num_seen, images):
    logits = section_weighted_logits(features(params, images), prototypes, section_weights)
    return predictions(logits, num_seen, top_k)

  return predict


# SPEC 3: the reference logs no top-5 on these benchmarks.
NO_TOP5_DATASETS = ("eurosat", "plantvillage", "kvasir")


def evaluate_stages(
  predict: Callable[[Any], Any],
  streams: Sequence[TaskStream],
  t: int,
  batch_size: int,
  stack: SeedStack,
  top5: bool = True,
) -> list[dict[str, Any]]:
  """Per seed: row t of R, A_t, top-5, old/new and task-id accuracy on the test sets of tasks 0..t.

  Top-5 is reported once at least 5 classes have been seen (C_seen ≥ 5, whatever the dataset's
  class count); before that fewer than 5 logits are finite and a "top-5" would count −inf rows as
  hits (100 %), so the stage has no `top5` key. `top5=False` never reports it (the datasets of
  `NO_TOP5_DATASETS`, SPEC 3).

  Args:
    predict: images → (top-1 (b,), top-k (b, k)) predicted new labels (`predictions`), with the
      leading seed axis in a stacked run.
  """
  results = batched_apply_seeds(
    predict, streams, [s.test_indices(t) for s in streams], "test", batch_size, stack
  )
  stages = []
  for stream, ((pred, topk), labels) in zip(streams, results):
    k_t, s_t = stream.task_range(t)
    use_top5 = top5 and k_t + s_t >= 5 and topk.shape[1] >= 5
    stages.append(
      metrics.stage_metrics(pred, labels, stream.task_of_label, t, k_t, topk if use_top5 else None)
    )
  return stages


def evaluate_stage(
  predict: Callable[[Any], Any],
  stream: TaskStream,
  t: int,
  batch_size: int,
  mesh: jax.sharding.Mesh,
) -> dict[str, Any]:
  """`evaluate_stages` of one run on the 1-D data mesh."""
  return evaluate_stages(predict, [stream], t, batch_size, SeedStack.single(mesh))[0]
