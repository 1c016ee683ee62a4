"""System tests of the first-session and closed-form-head methods in `train.run`: RanPAC, APER, NTK-CL's ridge head.

Each run is the tiny config (2 tasks x 2 classes, random width-16 backbone); the checks compare
the run's state with NumPy recomputations of the closed forms, and a resumed run with an
uninterrupted one.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from ntkcl_jax import closed_form, metrics, run_state, train
from ntkcl_jax import config as config_lib
from ntkcl_jax.models.ntkcl import init_params
from ntkcl_jax.models.vit import VisionTransformer
from ntkcl_jax.prototypes import class_means
from tests import tiny_configs as tc

M = 24  # projection width of the tiny runs


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tc.compile_cache_dir(tmp_path_factory)


def _frozen_features(config):
  """(features (n, d), labels) per task of the frozen backbone, as the run initialises it."""
  quirks = config_lib.validate(config)
  spec = config_lib.model_spec(config, quirks)
  params = init_params(spec, config_lib.init_key(config.seed), None)
  vit = VisionTransformer(spec.vit)
  stream = run_state.build_stream(config)
  out = []
  for t in range(config.train.max_tasks):
    feats, labels = [], []
    for b in stream.eval_batches(stream.train_indices(t), 16, "train"):
      f = np.asarray(vit.apply({"params": params["backbone"]}, b["image"]))
      feats.append(f[b["mask"]])
      labels.append(b["label"][b["mask"]])
    out.append((np.concatenate(feats), np.concatenate(labels)))
  return out


def _train_lines(workdir):
  return [x for x in tc.read_jsonl(workdir / "metrics.jsonl") if x["kind"] == "train"]


def test_ranpac_statistics_equal_numpy_and_resume_is_identical(cache, tmp_path):
  """Without first-session adaptation RanPAC's feature is the frozen backbone's: the
  checkpointed (G, C) equal Σ_t ReLU(F_t W_rp)ᵀ[ReLU(F_t W_rp), Y_t] computed in NumPy. Dropping
  the last checkpoint and rerunning resumes at task 1 and reproduces the run exactly."""
  config = tc.tiny_config(method="ranpac", train__adapt_tasks=0, ridge__projection_dim=M)
  with tc.compilation_cache(cache):
    summary = train.run(config, tmp_path)
  assert _train_lines(tmp_path) == []
  leaves, _ = tc.read_checkpoint(tmp_path)
  w_rp = closed_form.random_projection(config.seed + 10_002, 16, M).astype(np.float64)
  # 2 tasks run (4 classes); C has a column per class of the whole sequence (10), unseen ones 0
  G, C = np.zeros((M, M)), np.zeros((M, 10))
  for f, y in _frozen_features(config):
    h = np.maximum(f.astype(np.float64) @ w_rp, 0)
    G, C = G + h.T @ h, C + h.T @ np.eye(10)[y]
  np.testing.assert_allclose(leaves["ridge_G"], G, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(leaves["ridge_C"], C, rtol=1e-4, atol=1e-3)
  assert not leaves["ridge_C"][:, 4:].any()
  assert all(s["ridge_lambda"] in closed_form.DEFAULT_LAMBDAS for s in summary["stages"])

  # resume: remove the end-of-task-1 checkpoint, rerun the same command
  numbers = tc.checkpoint_numbers(tmp_path)
  shutil.rmtree(tmp_path / "checkpoints" / str(numbers[-1]))
  (tmp_path / "summary.json").unlink()
  with tc.compilation_cache(cache):
    resumed = train.run(config, tmp_path)
  drop = ("wall_time_s",)
  assert {k: v for k, v in metrics._plain(resumed).items() if k not in drop} == {
    k: v for k, v in metrics._plain(summary).items() if k not in drop
  }
  leaves2, _ = tc.read_checkpoint(tmp_path)
  np.testing.assert_array_equal(leaves2["ridge_G"], leaves["ridge_G"])
  np.testing.assert_array_equal(leaves2["ridge_C"], leaves["ridge_C"])


def test_aper_trains_the_first_task_only_and_prototypes_concatenate_frozen_features(
  cache, tmp_path
):
  config = tc.tiny_config(method="aper")
  with tc.compilation_cache(cache):
    summary = train.run(config, tmp_path)
  assert {x["task"] for x in _train_lines(tmp_path)} == {0}
  protos = tc.read_checkpoint(tmp_path)[0]["prototypes"]
  assert protos.shape == (10, 32)  # [frozen; adapted], d = 16; a row per class of the sequence
  assert not protos[4:].any()  # classes of tasks not run stay zero
  for t, (f, y) in enumerate(_frozen_features(config)):
    rows = range(2 * t, 2 * t + 2)
    np.testing.assert_allclose(protos[2 * t : 2 * t + 2, :16], class_means(f, y, rows), atol=1e-5)
  assert np.abs(protos[:4, 16:] - protos[:4, :16]).max() > 0  # the adapted half moved
  assert np.isfinite(summary["last_acc"])


def test_ntkcl_ridge_head_first_session(cache, tmp_path):
  """`eval.head=ridge` on [c; p; m] + `train.adapt_tasks=1`: steps in task 0 only, (G, C) in the checkpoint,
  and prototypes still formed (L_MI / L_orth read them)."""
  config = tc.tiny_config(
    eval__head="ridge", train__adapt_tasks=1, ridge__projection_dim=M, ridge__features="cpm"
  )
  with tc.compilation_cache(cache):
    summary = train.run(config, tmp_path)
  assert {x["task"] for x in _train_lines(tmp_path)} == {0}
  leaves, _ = tc.read_checkpoint(tmp_path)
  assert leaves["ridge_G"].shape == (M, M) and leaves["ridge_C"].shape == (M, 10)
  assert leaves["ridge_C"][:, :4].sum(0).min() > 0  # every seen class has statistics (h ≥ 0)
  assert not leaves["ridge_C"][:, 4:].any()
  assert np.abs(leaves["prototypes"][:4]).sum(1).min() > 0
  assert np.isfinite(summary["last_acc"]) and "ridge_lambda" in summary["stages"][1]


def test_bad_head_config_is_refused():
  with pytest.raises(ValueError, match=r"eval\.head"):
    config_lib.validate(tc.tiny_config(method="simplecil", eval__head="ridge"))
  with pytest.raises(ValueError, match=r"eval\.head"):
    config_lib.validate(tc.tiny_config(eval__head="kernel"))
