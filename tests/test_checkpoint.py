"""`ntkcl_jax.checkpoint.RunCheckpoints`: a checkpoint whose tree differs from the configured model
is refused with a `CheckpointShapeError` that names every differing leaf (stored vs expected
shape) and how to fix it, and the workdir is left exactly as it was."""

from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ntkcl_jax.checkpoint import CheckpointShapeError, RunCheckpoints
from tests import tiny_configs as tc

FIX = ("new --workdir", "rerun with the config")


def snapshot(workdir: pathlib.Path) -> dict[str, tuple]:
  """relative path -> (kind, sha256 or None, mtime) of everything under `workdir`."""
  digests = tc.file_digests(workdir)
  out = {}
  for p in sorted(workdir.rglob("*")):
    rel = str(p.relative_to(workdir))
    out[rel] = ("file" if p.is_file() else "dir", digests.get(rel), os.stat(p).st_mtime_ns)
  return out


def run_state(rows: int, width: int = 3, extra: bool = False) -> dict:
  """A run-state-like tree: trainables with optimiser state, a step counter, prototypes."""
  params = {"proxy_head": {"w": jnp.ones((8, width)), "sigma": jnp.ones(())}}
  state = {
    "train": {
      "params": params,
      "opt_state": optax.sgd(0.1, momentum=0.9).init(params),
      "step": jnp.int32(3),
    },
    "prototypes": jnp.arange(rows * 8, dtype=jnp.float32).reshape(rows, 8),
  }
  if extra:
    state["ridge_G"] = jnp.zeros((8, 8))
  return state


def abstract(tree):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
  )


@pytest.fixture
def workdir(tmp_path):
  """A workdir with checkpoint 1 holding 4 prototype rows, and a metrics file."""
  ckpts = RunCheckpoints(tmp_path, async_save=False)
  ckpts.save(1, run_state(rows=4), {"progress": {"task": 2}})
  ckpts.close()
  (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
  return tmp_path


def restore(workdir: pathlib.Path, tree) -> tuple:
  ckpts = RunCheckpoints(workdir, async_save=False)
  try:
    return ckpts.restore(1, abstract(tree))
  finally:
    ckpts.close()


def test_matching_tree_restores(workdir):
  state, meta = restore(workdir, run_state(rows=4))
  assert meta == {"progress": {"task": 2}}
  np.testing.assert_array_equal(state["prototypes"], run_state(rows=4)["prototypes"])
  assert int(state["train"]["step"]) == 3


def test_prototype_rows_mismatch_names_leaf_shapes_and_fix(workdir):
  # e.g. a run truncated by train.max_tasks before prototype rows came from the whole sequence
  before = snapshot(workdir)
  with pytest.raises(CheckpointShapeError) as info:
    restore(workdir, run_state(rows=10))
  e = info.value
  assert e.mismatches == (("prototypes", (4, 8), (10, 8)),)
  msg = str(e)
  assert "prototypes: stored (4, 8), expected (10, 8)" in msg
  assert str(workdir / "checkpoints" / "1") in msg
  assert all(s in msg for s in FIX), msg
  assert "Nothing in the workdir was changed" in msg
  assert snapshot(workdir) == before


def test_every_mismatch_is_listed(workdir):
  # another head width (params and the momentum trace) and another row count, all named at once
  before = snapshot(workdir)
  with pytest.raises(CheckpointShapeError) as info:
    restore(workdir, run_state(rows=6, width=5))
  assert {path for path, *_ in info.value.mismatches} == {
    "prototypes",
    "train/params/proxy_head/w",
    "train/opt_state/0/trace/proxy_head/w",
  }
  msg = str(info.value)
  assert "train/params/proxy_head/w: stored (8, 3), expected (8, 5)" in msg
  assert "prototypes: stored (4, 8), expected (6, 8)" in msg
  assert snapshot(workdir) == before


@pytest.mark.parametrize("side", ["model", "checkpoint"])
def test_structure_mismatch_is_a_shape_error(workdir, side):
  # A leaf only the model has (orbax: "no leaf") or only the checkpoint has (orbax's raw
  # "tree structures do not match" before this check existed): both name the leaf.
  before = snapshot(workdir)
  if side == "model":
    tree, want = run_state(rows=4, extra=True), ("ridge_G", None, (8, 8))
    text = "ridge_G: not in the checkpoint, expected (8, 8)"
  else:
    tree = {k: v for k, v in run_state(rows=4).items() if k != "prototypes"}
    want, text = (
      ("prototypes", (4, 8), None),
      "prototypes: stored (4, 8), not in the configured model",
    )
  with pytest.raises(CheckpointShapeError) as info:
    restore(workdir, tree)
  assert info.value.mismatches == (want,)
  assert text in str(info.value) and all(s in str(info.value) for s in FIX)
  assert snapshot(workdir) == before


def test_train_resume_refuses_old_prototype_rows(tmp_path, monkeypatch):
  """`train.run` on a workdir whose checkpoint has the prototype rows of a truncated run (4 =
  the 2 tasks it trained, not the 10 classes of the sequence) raises CheckpointShapeError before
  touching anything: config.json, metrics.jsonl and the checkpoint stay byte-identical."""
  from ntkcl_jax import train

  config = tc.tiny_config()  # 5 tasks x 2 classes, max_tasks=2
  seen = {}

  class Captured(Exception):
    pass

  def capture(self, number, abstract_state):  # the layout train.run restores into
    seen["abstract"] = abstract_state
    raise Captured

  with monkeypatch.context() as m:
    m.setattr(RunCheckpoints, "latest", lambda self: 1)
    m.setattr(RunCheckpoints, "restore", capture)
    with pytest.raises(Captured):
      train.run(config, tmp_path)
  layout = seen["abstract"]
  rows, dim = layout["prototypes"].shape
  assert rows == 10
  state = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), layout)
  state["prototypes"] = np.zeros((4, dim), np.float32)
  ckpts = RunCheckpoints(tmp_path, async_save=False)
  ckpts.save(1, state, {"progress": {"task": 2}})
  ckpts.close()
  (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
  before = snapshot(tmp_path)
  assert "config.json" in before

  with pytest.raises(CheckpointShapeError) as info:
    train.run(config, tmp_path)
  assert info.value.mismatches == (("prototypes", (4, dim), (10, dim)),)
  assert f"prototypes: stored (4, {dim}), expected (10, {dim})" in str(info.value)
  assert snapshot(tmp_path) == before
