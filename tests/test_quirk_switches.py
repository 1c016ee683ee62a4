"""Quirk switches at both values, through the trainer where they act (SPEC 4), and the defects they once had.

Two full runs of a 2-task sequence (5 + 5 classes of the tiny demo config), one per mode, expose
what each switch changes: Q5 `ema_after_last_task` (the EMA bank after the last task), Q6
`prototype_refresh` (the old prototype rows after task 1), Q10 `reg_at_task0` (the L_reg term of
task 0). The corrected run is the suite's end-to-end `mode=corrected` run. A third run, truncated
to the first task by `train.max_tasks`, must equal the full run up to that task. Q9
`ema_branch_dropout` acts in the model's training forward and is tested there.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ntkcl_jax import config as config_lib
from ntkcl_jax import evaluate, prototypes, sharding, train
from ntkcl_jax.models.ntkcl import NTKCL, init_params
from tests import fakes
from tests import tiny_configs as tc

# The whole sequence is 2 tasks, so task 1 is the sequence's last (Q5).
TWO_TASKS = dict(
  data__init_cls=5,
  data__increment=5,
  data__max_train_per_class=8,  # 40 images, 3 steps per task
  data__max_test_per_class=4,
  train__max_tasks=-1,
)


def _host(tree):
  return jax.tree_util.tree_map(lambda x: np.array(sharding.to_host(x)), tree)


class Recorder:
  """A TaskHook keeping host copies of what each task end shows (`TaskView`)."""

  def __init__(self):
    self.ends = {}
    self.features = self.stream = None

  def on_init(self, view):
    pass

  def on_task_end(self, view):
    self.ends[view.task] = {"params": _host(view.params), "prototypes": view.prototypes.copy()}
    self.features, self.stream = view.features, view.stream

  def summary(self):
    return {}


def _run(tmp_path_factory, name, **overrides):
  workdir = tmp_path_factory.mktemp(name)
  recorder = Recorder()
  config = tc.tiny_config(**{**TWO_TASKS, **overrides})
  with tc.compilation_cache(tc.compile_cache_dir(tmp_path_factory)):
    summary = train.run(config, workdir, hooks=[recorder])
  return recorder, summary, tc.read_jsonl(workdir / "metrics.jsonl")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  return _run(tmp_path_factory, "reference", mode="reference")


@pytest.fixture(scope="module")
def corrected(tmp_path_factory):
  return _run(tmp_path_factory, "corrected", mode="corrected")


def _leaves(tree):
  return jax.tree_util.tree_leaves(tree)


def _equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b), strict=True))


def test_quirks_resolve_as_the_tests_assume(reference, corrected):
  ref, cor = reference[1]["quirks"], corrected[1]["quirks"]
  assert (ref["ema_after_last_task"], cor["ema_after_last_task"]) == (False, True)
  assert (ref["prototype_refresh"], cor["prototype_refresh"]) == ("never", "drift_compensation")
  assert (ref["reg_at_task0"], cor["reg_at_task0"]) == (True, False)


def test_q5_ema_after_last_task(reference, corrected):
  for recorder, updated in ((reference[0], False), (corrected[0], True)):
    e0, e1 = (recorder.ends[t]["params"]["peft"] for t in (0, 1))
    assert _equal(e0["ema"], e0["current"])  # after task 0: r0 = 0, r1 = 1
    if updated:  # the running mean of both end-of-task snapshots
      assert not _equal(e1["ema"], e0["ema"])
      mean = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, e0["current"], e1["current"])
      for got, want in zip(_leaves(e1["ema"]), _leaves(mean), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    else:  # the reference skips the update after the sequence's last task
      assert _equal(e1["ema"], e0["ema"])


def test_q6_prototype_refresh(reference, corrected):
  old_rows = slice(0, 5)
  ref = reference[0]
  np.testing.assert_array_equal(
    ref.ends[1]["prototypes"][old_rows], ref.ends[0]["prototypes"][old_rows]
  )
  # drift compensation, recomputed here: old-model (end of task 0) and new-model features of
  # task 1's training images, then the NumPy shift of `prototypes.drift_compensation`
  cor = corrected[0]
  mesh = sharding.make_mesh()

  def feats(params):
    fn = lambda x: cor.features(params, x)  # noqa: E731
    return evaluate.batched_apply(fn, cor.stream, cor.stream.train_indices(1), "train", 16, mesh)

  (old, _), (new, _) = feats(cor.ends[0]["params"]), feats(cor.ends[1]["params"])
  before = cor.ends[0]["prototypes"][old_rows]
  after = cor.ends[1]["prototypes"][old_rows]
  assert not np.allclose(after, before)
  np.testing.assert_allclose(
    after, prototypes.drift_compensation(before, old, new), rtol=1e-4, atol=1e-5
  )


def test_q10_reg_at_task0(reference, corrected):
  def reg(records, task):
    return [r["reg"] for r in records if r["kind"] == "train" and r["task"] == task]

  ref, cor = reference[2], corrected[2]
  assert reg(ref, 0)[0] == 0.0  # step 1: the parameters still equal the snapshot
  assert max(reg(ref, 0)[1:]) > 0  # the reference applies L_reg at task 0
  assert reg(cor, 0) == [0.0] * len(reg(cor, 0))  # reg_at_task0=False: no L_reg at task 0
  assert max(reg(cor, 1)) > 0  # ... and L_reg from task 1 on


def test_corrected_run_end_to_end(corrected):
  _, summary, records = corrected
  R = np.array([[np.nan if v is None else v for v in row] for row in summary["accuracy_matrix"]])
  assert R.shape == (2, 2) and np.isfinite(R[np.tril_indices(2)]).all()
  assert summary["config"]["mode"] == "corrected"
  assert [r["kind"] for r in records if r["kind"] != "train"] == ["eval", "eval", "final"]
  assert all("top5" in r for r in records if r["kind"] == "eval")  # 5 and 10 classes seen


def test_truncated_run_equals_the_full_run_up_to_its_last_task(tmp_path_factory, reference):
  """`train.max_tasks` must not make task 0 the "last task" of Q5."""
  truncated, summary, _ = _run(tmp_path_factory, "truncated", mode="reference", train__max_tasks=1)
  full = reference[0].ends[0]
  assert _equal(truncated.ends[0]["params"], full["params"])
  np.testing.assert_array_equal(truncated.ends[0]["prototypes"], full["prototypes"])
  assert summary["accuracy_matrix"][0][0] == reference[1]["accuracy_matrix"][0][0]


def test_ablations_train_the_branch_ce_alone():
  """Channel / patch ablations use no L_MI, L_orth or L_reg (SPEC 2.1)."""
  for name, ce in (("channel", ("c",)), ("patch", ("p",))):
    config = tc.tiny_config(model__name=name)
    w = config_lib.loss_weights(config, config_lib.validate(config))
    assert (w.use_ce, w.mi, w.orth, w.reg) == (ce, 0.0, 0.0, 0.0)
  config = tc.tiny_config()
  w = config_lib.loss_weights(config, config_lib.validate(config))
  assert w.use_ce == ("c", "p", "m") and w.mi > 0 and w.orth > 0 and w.reg > 0


@pytest.mark.parametrize("ema_dropout", [True, False])
def test_q9_ema_branch_dropout(ema_dropout):
  """The EMA channel pass (first d columns of c) is stochastic in training iff Q9 is on."""
  spec = fakes.tiny_spec(adapter_dropout=0.5, ema_branch_dropout=ema_dropout)
  params = init_params(spec, jax.random.key(0))
  noise = jax.random.key(1)
  params = jax.tree_util.tree_map(
    lambda x: x + 0.1 * jax.random.normal(noise, x.shape, x.dtype), params
  )
  images = jax.random.uniform(jax.random.key(2), (2, spec.vit.image_size, spec.vit.image_size, 3))
  model, d = NTKCL(spec), spec.vit.width

  def c(key):
    return np.asarray(
      model.apply({"params": params}, images, train=True, rngs={"dropout": key})["c"]
    )

  a, b = c(jax.random.key(3)), c(jax.random.key(4))
  assert not np.allclose(a[:, d:], b[:, d:])  # the current pass always drops out in training
  assert np.allclose(a[:, :d], b[:, :d]) != ema_dropout
