"""`method=ntkcl_ogd` (`ntkcl_jax/methods/ogd.py`): the PEFT update projected off old tasks'
tangent features.

The projection's pure pieces on a model linear in its parameters (old-task outputs unchanged to
float rounding), the basis (orthonormal, the energy rule, its capacity), and the trainer: a tiny
run's first-order change of task 0's outputs, stacked seeds against single runs (the tolerances of
`tests/numerics.py`), and a SIGKILL resume after task 0's basis was stored (exact: the same
program rerun).
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkcl_jax import plan as plan_lib
from ntkcl_jax.methods.ogd import extend_basis, project_off, tangent_features
from ntkcl_jax.optim import make_optimizer
from tests import numerics
from tests import tiny_configs as tc

# Every tangent feature of 4 sampled images enters the basis (4 x D rows, far fewer than P, so
# the basis holds them all and its rank does not hang on rounding).
OGD = dict(
  method="ntkcl_ogd",
  mode="corrected",
  train__use_ema=False,
  ogd__samples=4,
  ogd__directions=0,
  ogd__energy=1.0,
)


# ------------------------------------------------------------------------------------------------
# Pure functions.


def _linear_params(w: jax.Array, b: jax.Array) -> dict:
  return {"peft": {"current": {"w": w}}, "fusion": {"b": b}}


def _linear_features(params: dict, images: jax.Array) -> jax.Array:
  """f(θ, x) = x W + b: linear in θ = (W, b); (b, H, W, C) images flattened."""
  x = images.reshape(images.shape[0], -1)
  return x @ params["peft"]["current"]["w"] + params["fusion"]["b"]


def _train_linear(params, images, targets, basis, steps=60, lr=0.05):
  """SGD with momentum and weight decay (the trainer's `optim.make_optimizer`), constrained."""
  tx = make_optimizer(5e-3, 0.9)
  opt_state = tx.init(params)

  def loss(p):
    return jnp.mean((_linear_features(p, images) - targets) ** 2)

  for _ in range(steps):
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    if basis is not None:
      updates = project_off(updates, basis)
    params = jax.tree_util.tree_map(lambda p, u: p - lr * u, params, updates)
  return params, float(loss(params))


def test_projected_training_leaves_a_linear_models_old_outputs_unchanged():
  """Full-rank basis of task A's tangent features; training task B moves no output of task A
  (beyond float32 rounding), while it does move them without the projection."""
  keys = jax.random.split(jax.random.key(0), 5)
  x_a = jax.random.normal(keys[0], (5, 2, 2, 3))
  x_b = jax.random.normal(keys[1], (8, 2, 2, 3))
  y_b = jax.random.normal(keys[2], (8, 3))
  params = _linear_params(jax.random.normal(keys[3], (12, 3)) * 0.1, jnp.zeros(3))
  eye = jnp.broadcast_to(jnp.eye(3), (5, 3, 3))
  rows = tangent_features(_linear_features, params, eye, x_a).reshape(15, -1)
  assert rows.shape == (15, 12 * 3 + 3)
  basis, rank, stats = extend_basis(jnp.zeros((39, 20)), jnp.int32(0), rows, 1.0)
  assert int(rank) == 15 and float(stats["energy_after"]) == pytest.approx(1.0, abs=1e-5)

  before_a = _linear_features(params, x_a)
  loss_0 = float(jnp.mean((_linear_features(params, x_b) - y_b) ** 2))
  trained, loss_1 = _train_linear(params, x_b, y_b, basis)
  free, _ = _train_linear(params, x_b, y_b, None)
  assert loss_1 < 0.5 * loss_0
  scale = float(jnp.max(jnp.abs(before_a)))
  moved = float(jnp.max(jnp.abs(_linear_features(trained, x_a) - before_a)))
  moved_free = float(jnp.max(jnp.abs(_linear_features(free, x_a) - before_a)))
  assert moved <= 1e-5 * max(scale, 1.0), (moved, scale)
  assert moved_free > 0.1 * scale


def _spectrum_rows(key, m: int, p: int, decay: float) -> jax.Array:
  u = jnp.linalg.qr(jax.random.normal(key, (p, m)))[0]
  return (u * decay ** jnp.arange(m)).T @ jnp.linalg.qr(jax.random.normal(key, (p, p)))[0]


def _assert_orthonormal(basis: jax.Array, rank: int) -> None:
  b = np.asarray(basis)
  np.testing.assert_allclose(b[:, :rank].T @ b[:, :rank], np.eye(rank), atol=1e-5)
  assert not b[:, rank:].any()


def test_extended_basis_is_orthonormal_and_keeps_the_energy_share():
  k1, k2 = jax.random.split(jax.random.key(1))
  rows1 = _spectrum_rows(k1, 30, 200, 0.8)
  basis, rank, s1 = extend_basis(jnp.zeros((200, 64)), jnp.int32(0), rows1, 0.9)
  r1 = int(rank)
  assert 1 <= r1 < 30 and float(s1["energy_before"]) == 0.0
  assert 0.9 <= float(s1["energy_after"]) <= 1.0 and int(s1["added"]) == r1
  _assert_orthonormal(basis, r1)

  rows2 = jnp.concatenate([rows1[:10], _spectrum_rows(k2, 20, 200, 0.9)])
  basis2, rank2, s2 = extend_basis(basis, rank, rows2, 0.95)
  assert float(s2["energy_before"]) > 0.0 and float(s2["energy_after"]) >= 0.95
  np.testing.assert_array_equal(basis2[:, :r1], basis[:, :r1])  # old columns kept as they were
  _assert_orthonormal(basis2, int(rank2))

  again = extend_basis(basis2, rank2, rows1, 0.9)
  assert int(again[2]["added"]) == 0 and float(again[2]["energy_before"]) >= 0.9

  small, rank_small, s_small = extend_basis(jnp.zeros((200, 8)), jnp.int32(0), rows1, 1.0)
  assert int(rank_small) == 8 and float(s_small["energy_after"]) < 1.0  # capacity reached
  _assert_orthonormal(small, 8)


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(method="ntkcl_ogd"), "use_ema=False"),
    ({**OGD, "ogd__energy": 1.5}, "ogd.energy=1.5"),
    ({**OGD, "ogd__samples": 0}, "ogd.samples=0"),
  ],
)
def test_plan_rejects_what_the_method_cannot_run(overrides, message):
  with pytest.raises(ValueError, match=message.replace(".", r"\.")):
    plan_lib.resolve(tc.tiny_config(**overrides))


# ------------------------------------------------------------------------------------------------
# Through the trainer.

RUNS = """
import json, pathlib, sys
import jax, numpy as np
from jax.flatten_util import ravel_pytree
from ntkcl_jax import config as config_lib, plan as plan_lib, train
from ntkcl_jax.methods.ogd import NTKCLOGD, sample_indices, tangent_features
from ntkcl_jax.models.ntkcl import NTKCL
from ntkcl_jax.train_step import reg_targets
from tests import tiny_configs as tc
from tests.numerics import PredictionRecorder

out = pathlib.Path(sys.argv[1])
ogd = json.loads(sys.argv[2])

class Thetas:
  '''Keeps θ = {peft/current, fusion} (flat) and the eval tree at every task end.'''
  def __init__(self):
    self.flat, self.params, self.view = [], [], None
  def on_init(self, view):
    pass
  def on_task_end(self, view):
    self.flat.append(np.asarray(ravel_pytree(reg_targets(view.params))[0]))
    self.params.append(view.params)
    self.view = view
  def summary(self):
    return {}

# A plain NTK-CL run and the projected one, same config otherwise: task 0's first-order change.
changes = {}
for name, overrides in (("plain", {**ogd, "method": "ntkcl"}), ("ogd", ogd)):
  config = tc.tiny_config(**overrides)
  thetas = Thetas()
  train.run(config, out / name, [thetas])
  view = thetas.view
  plan = plan_lib.resolve(tc.tiny_config(**ogd))
  output = NTKCLOGD(plan).output_fn(NTKCL(view.spec))
  idx = sample_indices(view.stream.train_indices(0), 0, 0, plan.ogd.samples)
  images = next(view.stream.eval_batches(idx, len(idx), "train"))["image"]
  dim = output(thetas.params[0], images[:1]).shape[-1]
  eye = np.broadcast_to(np.eye(dim, dtype=np.float32), (len(images), dim, dim))
  jac = np.asarray(tangent_features(output, thetas.params[0], eye, images))
  jac = jac.reshape(-1, jac.shape[-1])
  delta = thetas.flat[1] - thetas.flat[0]
  changes[name] = {
    "first_order": float(np.linalg.norm(jac @ delta)),
    "step": float(np.linalg.norm(delta)),
  }
(out / "changes.json").write_text(json.dumps(changes))

weights = config_lib.section_weights(tc.tiny_config(**ogd))
for seed in (0, 1):
  recorder = PredictionRecorder(weights)
  train.run(tc.tiny_config(**ogd, seed=seed), out / f"single_{seed}", [recorder])
  recorder.save(out / f"predictions_single_{seed}.npz")
recorders = {seed: [PredictionRecorder(weights)] for seed in (0, 1)}
train.run(tc.tiny_config(**ogd, seeds="0,1"), out / "stacked", recorders)
for seed, (recorder,) in recorders.items():
  recorder.save(out / f"predictions_stacked_{seed}.npz")
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> pathlib.Path:
  return tc.compile_cache_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache) -> pathlib.Path:
  """One CPU device: plain NTK-CL and NTK-CL-OGD (seed 0), OGD single seeds 0, 1 and stacked."""
  out = tmp_path_factory.mktemp("ogd")
  tc.run_python(RUNS, str(out), json.dumps(OGD), num_devices=1, cache_dir=cache, timeout=1200)
  return out


def test_training_task_1_leaves_task_0s_outputs_unchanged_to_first_order(runs):
  """J_0 (θ_1 − θ_0) on task 0's sampled images, J_0 at the end of task 0: the projection removes
  it (to float32 rounding of the basis) while the update itself stays of the plain run's size."""
  changes = json.loads((runs / "changes.json").read_text())
  plain, ogd = changes["plain"], changes["ogd"]
  assert plain["first_order"] > 0.0 and ogd["step"] > 0.1 * plain["step"]
  assert ogd["first_order"] <= 1e-3 * plain["first_order"], changes


@pytest.mark.numerics
def test_stacked_seeds_equal_their_single_runs(runs):
  for seed in (0, 1):
    got_p = numerics.PredictionRecorder.load(runs / f"predictions_stacked_{seed}.npz")
    want_p = numerics.PredictionRecorder.load(runs / f"predictions_single_{seed}.npz")
    allowance = numerics.near_tie_allowance(got_p, want_p)[1]
    want = json.loads((runs / f"single_{seed}" / "summary.json").read_text())
    got = json.loads((runs / "stacked" / f"seed_{seed}" / "summary.json").read_text())
    assert got.pop("stacked_seeds") == [0, 1]
    assert got["stages"][0]["ogd_rank"] == got["stages"][0]["ogd_added"] > 0
    numerics.assert_records_close(got, want, allowance, path=f"seed {seed} summary")
    numerics.assert_records_close(
      tc.read_jsonl(runs / "stacked" / f"seed_{seed}" / "metrics.jsonl"),
      tc.read_jsonl(runs / f"single_{seed}" / "metrics.jsonl"),
      allowance,
      path=f"seed {seed} lines",
    )


def test_resume_after_sigkill_with_a_stored_basis_equals_the_uninterrupted_run(cache, tmp_path):
  """Two stacked seeds on a 2 x 4 mesh, killed once task 0's end (its basis) is checkpointed."""
  flags = tc.cli_flags(**OGD, seeds="0,1")
  whole = tmp_path / "whole"
  r = tc.run_cli(whole, *flags, cache_dir=cache)
  assert r.returncode == 0, r.stderr[-4000:]
  killed = tmp_path / "killed"
  tc.kill_at_first_checkpoint(killed, flags, cache, tmp_path / "killed.err", number=2)
  r = tc.run_cli(killed, *flags, cache_dir=cache)
  assert r.returncode == 0, r.stderr[-4000:]
  assert "Resuming from checkpoint" in r.stderr
  for seed in (0, 1):
    want, got = (
      json.loads((d / f"seed_{seed}" / "summary.json").read_text()) for d in (whole, killed)
    )
    assert tc.without_timing(got) == tc.without_timing(want)
    want_lines, got_lines = (
      [tc.without_timing(x) for x in tc.read_jsonl(d / f"seed_{seed}" / "metrics.jsonl")]
      for d in (whole, killed)
    )
    assert got_lines == want_lines
  state, _ = tc.read_checkpoint(killed)
  want_state, _ = tc.read_checkpoint(whole)
  np.testing.assert_array_equal(state["ogd_basis"], want_state["ogd_basis"])
