"""Stacked seeds: vmapped step = K single-seed steps, the (seed, data) mesh, helpers."""

from __future__ import annotations

import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from ntkcl_jax import losses, report, seeds
from ntkcl_jax.data import TaskStream, class_order
from ntkcl_jax.data.sources import ArraySource
from ntkcl_jax.models.heads import section_weighted_logits
from ntkcl_jax.models.ntkcl import NTKCL, init_params
from ntkcl_jax.optim import make_optimizer
from ntkcl_jax.train_step import (
  TaskInfo,
  TrainState,
  init_proxy_head,
  make_eval_fn,
  make_feature_fn,
  make_train_step,
  reg_targets,
  split_trainable,
)
from tests import numerics
from tests.fakes import tiny_spec

NUM_CLASSES, K_T, S_T = 6, 2, 2
# Differences per leaf (`numerics.max_difference`: relative to the leaf's largest magnitude).
# A vmapped step and K single steps, or a 4 x 2 mesh and one device, are different programs: they
# agree within the tolerances of `tests/numerics.py`, not bit for bit. Measured on CPU (jax 0.9.2,
# tiny_spec, 2 SGD steps, reference-mode loss): K = 3 vmapped on one device vs three single-seed
# steps: relative 0.0 on one x86-64 CPU and 3.3e-6 on another (AMD EPYC with AVX-512); K = 4 on a
# 4 x 2 mesh vs one device: relative 2.5e-6 on states, 2.2e-7 on loss terms, and L_orth (Q4, a
# signed sum that cancels to ~1e-7) 5.5e-7 absolute.
STEP_RTOL = numerics.STATE_RTOL
MESH_RTOL = numerics.STATE_RTOL
ORTH_ATOL = numerics.ORTH_ATOL


def _run(seed: int, backbone, batch_size: int, num_steps: int):
  """One seed's (state, frozen, aux, [batches], [keys]) at a mid-stream task (k_t = s_t = 2)."""
  spec = tiny_spec()
  params = init_params(spec, jax.random.key(seed), backbone)
  params["proxy_head"] = init_proxy_head(jax.random.key(100 + seed), spec.feature_dim, S_T)
  trainable, frozen = split_trainable(params)
  tx = make_optimizer(5e-4)
  state = TrainState(params=trainable, opt_state=tx.init(trainable), step=jnp.int32(0))
  rng = np.random.default_rng(seed)
  protos = np.zeros((NUM_CLASSES, spec.feature_dim), np.float32)
  protos[:K_T] = rng.normal(size=(K_T, spec.feature_dim))
  aux = {
    "task": TaskInfo.make(K_T, S_T, n_old=K_T, use_reg=True),
    "prototypes": jnp.asarray(protos),
    "orth_basis": jnp.asarray(losses.orthogonality_basis(protos[: K_T + S_T], 40), jnp.float32),
    "reg_snapshot": jax.tree_util.tree_map(lambda x: x + 0.01, reg_targets(trainable)),
  }
  size = spec.vit.image_size
  batches = [
    {
      "image": rng.uniform(size=(batch_size, size, size, 3)).astype(np.float32),
      "label": (K_T + rng.integers(0, S_T, batch_size)).astype(np.int32),
      "mask": np.arange(batch_size) < batch_size - 2,  # two padded rows
    }
    for _ in range(num_steps)
  ]
  keys = [jax.random.fold_in(jax.random.key(seed), s + 1) for s in range(num_steps)]
  return state, frozen, aux, batches, keys, tx, spec


def _worst(pairs) -> tuple[float, float]:
  pairs = list(pairs)
  return max(p[0] for p in pairs), max(p[1] for p in pairs)


def _single_seed_runs(runs, lr):
  """Each seed alone: jit(train_step) over its own batches (the trainer today)."""
  step = None
  out = []
  for state, frozen, aux, batches, keys, tx, spec in runs:
    step = step or jax.jit(
      make_train_step(NTKCL(spec), losses.LossWeights(), tx, len(batches[0]["mask"]))
    )
    terms = []
    for batch, key in zip(batches, keys):
      state, t = step(state, frozen, aux, {k: jnp.asarray(v) for k, v in batch.items()}, key, lr)
      terms.append(t)
    out.append((state, terms))
  return out


@pytest.fixture(scope="module")
def backbone():
  """One pre-trained backbone shared by every seed (as a loaded AugReg checkpoint is)."""
  return init_params(tiny_spec(), jax.random.key(42))["backbone"]


@pytest.mark.numerics
def test_vmapped_step_equals_single_seed_steps_and_skips_padding(backbone):
  """K = 3 seeds, 2 steps; seed 2 has one batch, so its second stacked batch is all padding."""
  lr, batch_size = 0.05, 8
  runs = [_run(s, backbone, batch_size, 2) for s in range(3)]
  runs[2] = (*runs[2][:3], runs[2][3][:1], runs[2][4][:1], *runs[2][5:])
  expected = _single_seed_runs(runs, lr)

  _, frozen0, _, _, _, tx, spec = runs[0]
  step = seeds.vmap_over_seeds(
    seeds.skip_empty_batches(make_train_step(NTKCL(spec), losses.LossWeights(), tx, batch_size)),
    seeds.train_step_in_axes(shared_backbone=True),
  )
  step = jax.jit(step)
  state = seeds.stack_trees([r[0] for r in runs])
  frozen = {
    "backbone": frozen0["backbone"],
    "peft": seeds.stack_trees([r[1]["peft"] for r in runs]),
  }
  aux = seeds.stack_trees([r[2] for r in runs])
  stacked_batches = list(seeds.zip_seed_batches([r[3] for r in runs]))
  assert len(stacked_batches) == 2 and not stacked_batches[1]["mask"][2].any()
  key_lists = [r[4] + r[4][-1:] * (2 - len(r[4])) for r in runs]  # any key for the padded step
  terms = []
  for i, batch in enumerate(stacked_batches):
    keys = jnp.stack([kl[i] for kl in key_lists])
    state, t = step(state, frozen, aux, batch, keys, lr)
    terms.append(t)
  assert [bool(x) for x in terms[1]["active"]] == [True, True, False]

  per_seed = seeds.unstack_tree(state, 3)
  state_diff = _worst(numerics.max_difference(per_seed[i], expected[i][0]) for i in range(3))
  pairs = [(i, s) for i in range(3) for s in range(len(expected[i][1]))]
  term_diff = _worst(
    numerics.max_difference(
      {k: v[i] for k, v in terms[s].items() if k not in ("active", "orth")},
      {k: v for k, v in expected[i][1][s].items() if k != "orth"},
    )
    for i, s in pairs
  )
  orth_diff = max(
    abs(float(terms[s]["orth"][i]) - float(expected[i][1][s]["orth"])) for i, s in pairs
  )
  print(
    f"K=3 vmapped vs single (abs, rel): state {state_diff}, terms {term_diff}, orth {orth_diff}"
  )
  assert state_diff[1] <= STEP_RTOL and term_diff[1] <= STEP_RTOL and orth_diff <= ORTH_ATOL
  assert int(per_seed[2].step) == 1 and int(per_seed[0].step) == 2  # the padded step was skipped
  assert (
    numerics.max_difference(per_seed[0].params, per_seed[1].params)[0] > 1e-3
  )  # the seeds really differ


@pytest.mark.numerics
@pytest.mark.slow
def test_seed_mesh_4x2_matches_single_device(backbone):
  """K = 4 seeds on 8 devices as 4 x 2: state P("seed"), batch P("seed", "data"), vs 1 device."""
  if jax.device_count() != 8:
    pytest.skip(f"needs the 8 simulated devices of conftest.py, have {jax.device_count()}")
  lr, batch_size = 0.05, 8
  mesh = seeds.seed_mesh(4, batch_sizes={"train.batch_size": batch_size})
  assert dict(mesh.shape) == {"seed": 4, "data": 2}
  runs = [_run(s, backbone, batch_size, 2) for s in range(4)]
  expected = _single_seed_runs(runs, lr)  # uncommitted arrays: one device

  *_, tx, spec = runs[0]
  stacked = seeds.stacked_sharding(mesh)
  step = jax.jit(
    seeds.vmap_over_seeds(
      make_train_step(NTKCL(spec), losses.LossWeights(), tx, batch_size),
      seeds.train_step_in_axes(),
    ),
    out_shardings=(stacked, stacked),
  )
  state = seeds.put_stacked(seeds.stack_trees([r[0] for r in runs]), mesh)
  frozen = {
    "backbone": jax.device_put(runs[0][1]["backbone"], NamedSharding(mesh, PartitionSpec())),
    "peft": seeds.put_stacked(seeds.stack_trees([r[1]["peft"] for r in runs]), mesh),
  }
  aux = seeds.put_stacked(seeds.stack_trees([r[2] for r in runs]), mesh)
  assert seeds.local_block(mesh, 4, batch_size) == (range(4), 0, 1)
  terms = []
  for i, host_batch in enumerate(seeds.zip_seed_batches([r[3] for r in runs])):
    batch = seeds.put_seed_batch(host_batch, mesh, 4, batch_size)
    assert batch["image"].sharding.spec == PartitionSpec("seed", "data")
    keys = jax.device_put(jnp.stack([r[4][i] for r in runs]), seeds.stacked_sharding(mesh))
    state, t = step(state, frozen, aux, batch, keys, lr)
    terms.append(t)
  leaf = state.params["fusion"]["value"]["kernel"]
  assert leaf.sharding.spec == PartitionSpec("seed") and len(leaf.sharding.device_set) == 8

  per_seed = seeds.unstack_tree(jax.device_get(state), 4)
  state_diff = _worst(numerics.max_difference(per_seed[i], expected[i][0]) for i in range(4))
  term_diff = _worst(
    numerics.max_difference(
      {k: v[i] for k, v in terms[s].items() if k != "orth"},
      {k: v for k, v in expected[i][1][s].items() if k != "orth"},
    )
    for i in range(4)
    for s in range(2)
  )
  orth_diff = max(
    abs(float(terms[s]["orth"][i]) - float(expected[i][1][s]["orth"]))
    for i in range(4)
    for s in range(2)
  )
  print(
    f"K=4 on 4x2 vs 1 device (abs, rel): state {state_diff}, terms {term_diff}, orth {orth_diff}"
  )
  assert state_diff[1] <= MESH_RTOL and term_diff[1] <= MESH_RTOL and orth_diff <= ORTH_ATOL


@pytest.mark.numerics
@pytest.mark.slow
def test_vmapped_eval_and_features_equal_single_seed(backbone):
  """The eval function (features, section-weighted prototype logits, top-1/top-5) on K = 3
  stacked seeds, each with its own images, equals each seed alone."""
  spec = tiny_spec()
  size, b = spec.vit.image_size, 8
  params, protos, images = [], [], []
  for s in range(3):
    rng = np.random.default_rng(10 + s)
    p = init_params(spec, jax.random.key(s), backbone)
    # non-trivial current bank: init leaves `up` at 0, which would make the seeds' features equal
    p["peft"] = jax.tree_util.tree_map(lambda x: x + 0.05 * rng.normal(size=x.shape), p["peft"])
    params.append(p)
    protos.append(jnp.asarray(rng.normal(size=(NUM_CLASSES, spec.feature_dim)), jnp.float32))
    images.append(jnp.asarray(rng.uniform(size=(b, size, size, 3)), jnp.float32))
  num_seen = jnp.int32(4)
  evaluate = make_eval_fn(NTKCL(spec), (0.3, 0.1))
  single = [jax.jit(evaluate)(params[s], protos[s], num_seen, images[s]) for s in range(3)]
  stacked = jax.jit(seeds.vmap_over_seeds(evaluate, seeds.eval_fn_in_axes()))(
    {**seeds.stack_trees(params), "backbone": backbone},
    jnp.stack(protos),
    num_seen,
    jnp.stack(images),
  )
  features = make_feature_fn(NTKCL(spec))
  for s in range(3):  # identical predictions except near-ties of the single run's logits
    logits = section_weighted_logits(jax.jit(features)(params[s], images[s]), protos[s], (0.3, 0.1))
    gaps = np.diff(np.sort(np.asarray(logits)[:, :4], -1), axis=-1)  # (b, 3), ascending order
    top1_tie, any_tie = gaps[:, -1] < numerics.LOGIT_ATOL, gaps.min(-1) < numerics.LOGIT_ATOL
    assert not ((np.asarray(stacked[0][s]) != np.asarray(single[s][0])) & ~top1_tie).any()
    topk_differs = (np.asarray(stacked[1][s]) != np.asarray(single[s][1])).any(-1)
    assert not (topk_differs & ~any_tie).any()
  feats = jax.jit(seeds.vmap_over_seeds(features, (seeds.params_in_axes(), 0)))(
    {**seeds.stack_trees(params), "backbone": backbone}, jnp.stack(images)
  )
  diff = _worst(
    numerics.max_difference(feats[s], jax.jit(features)(params[s], images[s])) for s in range(3)
  )
  print(f"K=3 vmapped features vs single-seed (abs, rel): {diff}")
  assert diff[1] <= STEP_RTOL
  assert len({tuple(np.asarray(x[0]).tolist()) for x in single}) > 1  # seeds predict differently


def test_seed_layout_rule_and_errors():
  assert seeds.seed_layout(4, 8, {"train.batch_size": 16}) == (4, 2)
  assert seeds.seed_layout(5, 8, {"train.batch_size": 16}) == (1, 8)
  assert seeds.seed_layout(6, 8, {"train.batch_size": 16}) == (2, 4)
  assert seeds.seed_layout(3, 1) == (1, 1)
  assert seeds.seed_layout(4, 8, {"b": 8}, seed_axis_size=2) == (2, 4)
  with pytest.raises(ValueError) as err:
    seeds.seed_layout(3, 16, {"train.batch_size": 8, "eval.batch_size": 256})
  msg = str(err.value)
  assert "16 devices, 3 seeds" in msg and "train.batch_size=8 is not a multiple of 16" in msg
  assert "2 seeds (2x8) or 4 seeds (4x4)" in msg
  assert "set train.batch_size=16" in msg and "run on 12 devices (3x4)" in msg
  with pytest.raises(ValueError, match="must divide both the device count"):
    seeds.seed_layout(4, 8, seed_axis_size=8)
  with pytest.raises(ValueError, match="not a multiple of the 4 devices"):
    seeds.seed_layout(4, 8, {"b": 6}, seed_axis_size=2)


def test_parse_seeds():
  assert seeds.parse_seeds("0,1,2,3,4") == (0, 1, 2, 3, 4)
  assert seeds.parse_seeds(" 3, 1 ") == (3, 1)
  assert seeds.parse_seeds([2, np.int64(5)]) == (2, 5)
  assert seeds.parse_seeds(7) == (7,)
  for bad, match in [
    ("", "comma-separated"),
    ("0,,1", "comma-separated"),
    ("0,a", "must be an int"),
    ("0,1,0", r"\[0\] repeated"),
    ("1,-2", "negative"),
    ([1.5], "not ints"),
    ([], "at least one"),
  ]:
    with pytest.raises(ValueError, match=match):
      seeds.parse_seeds(bad)


def test_stack_unstack_round_trip_and_errors():
  trees = [
    {
      "a": np.full((2, 3), i, np.float32),
      "key": jax.random.key(i),
      "state": TrainState(params={"w": jnp.ones(2) * i}, opt_state=(), step=jnp.int32(i)),
    }
    for i in range(3)
  ]
  stacked = seeds.stack_trees(trees)
  assert stacked["a"].shape == (3, 2, 3) and stacked["state"].step.shape == (3,)
  for i, tree in enumerate(seeds.unstack_tree(stacked, 3)):
    np.testing.assert_array_equal(tree["a"], trees[i]["a"])
    assert jnp.array_equal(jax.random.key_data(tree["key"]), jax.random.key_data(trees[i]["key"]))
    assert int(seeds.index_tree(stacked, i)["state"].step) == i
  keys = seeds.fold_in_each(seeds.root_keys([0, 5]), 3)
  for i, s in enumerate([0, 5]):
    want = jax.random.fold_in(jax.random.key(s), 3)
    assert jnp.array_equal(jax.random.key_data(keys[i]), jax.random.key_data(want))
  with pytest.raises(ValueError, match=r"leaf \['a'\]"):
    seeds.stack_trees([{"a": np.zeros(2)}, {"a": np.zeros(3)}])
  with pytest.raises(ValueError, match="another structure"):
    seeds.stack_trees([{"a": 1.0}, {"b": 1.0}])
  with pytest.raises(ValueError, match="expected leading axis 4"):
    seeds.unstack_tree(stacked, 4)


def test_zip_seed_batches_from_task_streams_keeps_each_seeds_order():
  """Three TaskStreams with their own class orders (SPEC 2.7): slice i of every stacked batch is
  seed i's own batch, and a seed whose task is shorter gets all-padding batches."""
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(4), [1, 2, 4, 8])  # task 0 size depends on which classes it gets
  source = ArraySource(
    rng.integers(0, 255, (labels.size, 12, 12, 3), np.uint8), labels, list("abcd"), name="toy"
  )
  run_seeds = (0, 3, 1)  # task 0 = original classes {2, 3}, {3, 1}, {3, 2}: 12, 10, 12 images
  streams = [
    TaskStream(
      source,
      source,
      order=class_order(s, 4),
      init_cls=2,
      increment=2,
      image_size=8,
      resize_size=10,
      num_workers=0,
    )
    for s in run_seeds
  ]
  per_seed = [list(st.train_batches(0, 0, 2, seed=s)) for s, st in zip(run_seeds, streams)]
  assert [len(b) for b in per_seed] == [6, 5, 6]
  zipped = list(
    seeds.zip_seed_batches(st.train_batches(0, 0, 2, seed=s) for s, st in zip(run_seeds, streams))
  )
  assert len(zipped) == 6
  for step, batch in enumerate(zipped):
    assert batch["image"].shape == (3, 2, 8, 8, 3) and batch["mask"].shape == (3, 2)
    for i in range(3):
      if step < len(per_seed[i]):
        for k, v in per_seed[i][step].items():
          np.testing.assert_array_equal(batch[k][i], v)
      else:
        assert not batch["mask"][i].any() and (batch["index"][i] == -1).all()
        assert not batch["image"][i].any()
  assert not np.array_equal(zipped[0]["label"][0], zipped[0]["label"][2])  # own class orders
  with pytest.raises(ValueError, match="does not match the others"):
    list(seeds.zip_seed_batches([[{"x": np.zeros(2)}], [{"x": np.zeros(3)}]]))


def test_seed_results_tables_mean_and_population_std(tmp_path):
  """The top-level tables of a stacked run: compare.py's format, std with ddof 0."""
  summaries = [
    {"avg_acc": a, "last_acc": b, "forgetting": f}
    for a, b, f in [(80.0, 70.0, 5.0), (82.0, 71.0, 7.0), (84.0, 75.0, 6.0)]
  ]
  text = report.write_seed_results(tmp_path, [0, 1, 2], [report.seed_row("ntkcl", summaries)])
  assert (tmp_path / "results.md").read_text() == text
  assert text.splitlines() == [
    "Seeds [0, 1, 2]; mean ± std (ddof 0), %.",
    "",
    "| variant | Ā | A_T | forgetting |",
    "|---|---|---|---|",
    "| ntkcl | 82.00 ± 1.63 | 72.00 ± 2.16 | 6.00 ± 0.82 |",
  ]
  rows = list(csv.reader((tmp_path / "results.csv").open()))
  assert rows[0] == list(report.SEED_COLUMNS)
  assert rows[1] == ["ntkcl", "82.0000", "1.6330", "72.0000", "2.1602", "6.0000", "0.8165"]
