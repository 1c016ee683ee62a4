"""System tests of the command line (`python -m ntkcl_jax.main`): outputs, kill/resume, bad input.

Every run is a subprocess on 8 simulated CPU devices with the tiny config of `tiny_configs`
(two tasks of two steps, a checkpoint after every step). The runs share a persistent compilation
cache, so only the first one compiles.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from ntkcl_jax import config as config_lib
from tests import tiny_configs as tc
from tests.test_metrics import tensorboard_scalars


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> pathlib.Path:
  return tc.compile_cache_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pathlib.Path:
  """Workdir of the uninterrupted CLI run of the tiny config."""
  return tc.reference_cli_run(tmp_path_factory)


def _error_line(stderr: str) -> str:
  """The CLI's error message: from its `error: ` line to the end of stderr."""
  match = re.search(r"^error: ", stderr, re.MULTILINE)
  assert match, f"no 'error: ...' line on stderr:\n{stderr[-3000:]}"
  return stderr[match.start() :]


# ------------------------------------------------------------------------------------------------
# Outputs of a finished run.


def test_summary_metrics_and_plots(reference):
  summary = json.loads((reference / "summary.json").read_text())
  for key in ("accuracy_matrix", "avg_acc", "last_acc", "forgetting", "bwt", "config"):
    assert key in summary
  assert summary["wall_time_s"] > 0
  assert summary["num_devices"] == 8 and summary["num_processes"] == 1
  assert summary["config"] == config_lib.flat_config(tc.tiny_config())

  R = np.array([[np.nan if v is None else v for v in row] for row in summary["accuracy_matrix"]])
  assert R.shape == (2, 2)
  assert np.isnan(R[0, 1]) and np.isfinite(R[np.tril_indices(2)]).all()
  assert ((R[np.tril_indices(2)] >= 0) & (R[np.tril_indices(2)] <= 100)).all()
  # 8 test images per class: every entry is a multiple of 100 / 16 (task 0 has 2 classes).
  assert np.allclose(np.mod(R[np.tril_indices(2)], 100 / 16), 0)
  A = [s["A"] for s in summary["stages"]]
  assert summary["avg_acc"] == pytest.approx(np.mean(A))
  assert summary["last_acc"] == pytest.approx(A[-1])
  assert summary["bwt"] == pytest.approx(R[1, 0] - R[0, 0])
  assert summary["forgetting"] == pytest.approx(R[0, 0] - R[1, 0])
  assert A[1] == pytest.approx(np.mean(R[1]))  # equal test-set sizes per task

  lines = tc.read_jsonl(reference / "metrics.jsonl")
  kinds = [r["kind"] for r in lines]
  assert kinds == ["train", "train", "eval", "train", "train", "eval", "final"]
  train = [r for r in lines if r["kind"] == "train"]
  assert [(r["task"], r["step"]) for r in train] == [(0, 1), (0, 2), (1, 1), (1, 2)]
  for r in train:
    for term in ("total", "ce_c", "ce_p", "ce_m", "mi", "orth", "reg", "lr"):
      assert np.isfinite(r[term]), (term, r)
  evals = [r for r in lines if r["kind"] == "eval"]
  assert [e["R_row"] for e in evals] == [summary["accuracy_matrix"][t][: t + 1] for t in range(2)]
  assert lines[-1]["R"] == summary["accuracy_matrix"]
  assert lines[-1]["avg_acc"] == summary["avg_acc"]

  for name in ("accuracy_matrix.png", "accuracy_per_task.png"):
    path = reference / name
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
      im.verify()
    with Image.open(path) as im:
      assert im.format == "PNG" and min(im.size) >= 100
      assert np.asarray(im.convert("L")).std() > 1  # not a blank image


# ------------------------------------------------------------------------------------------------
# Kill and resume.


def test_sigkill_mid_task_then_resume_is_bit_identical(reference, cache, tmp_path):
  workdir = tmp_path / "run"
  tc.kill_at_first_checkpoint(workdir, list(tc.cli_flags()), cache, tmp_path / "killed.err")
  assert not (workdir / "summary.json").exists()
  number = max(tc.checkpoint_numbers(workdir))
  _, meta = tc.read_checkpoint(workdir, number)
  progress = meta["progress"]
  assert progress["in_task"] and progress["step_in_epoch"] > 0, f"killed too late: {progress}"
  # A line cut short by the kill, after the checkpoint: the resumed run must drop it.
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"kind": "train", "task": 0, "ep')
  assert (workdir / "metrics.jsonl").stat().st_size > progress["metrics_offset"]

  r = tc.run_cli(workdir, *tc.cli_flags(), cache_dir=cache)
  assert r.returncode == 0, r.stderr[-4000:]
  assert (
    f"Resuming from checkpoint {number}: task {progress['task']} epoch {progress['epoch']} "
    f"step {progress['step_in_epoch']}"
  ) in r.stderr

  want = json.loads((reference / "summary.json").read_text())
  got = json.loads((workdir / "summary.json").read_text())
  assert tc.without_timing(got) == tc.without_timing(want)
  want_lines = [tc.without_timing(x) for x in tc.read_jsonl(reference / "metrics.jsonl")]
  got_lines = [tc.without_timing(x) for x in tc.read_jsonl(workdir / "metrics.jsonl")]
  assert got_lines == want_lines  # train losses bit-identical; lines after the checkpoint dropped
  if importlib.util.find_spec("tensorboardX") is not None:
    # TensorBoard shows the same scalars: the killed run's events past the checkpoint are purged.
    got_tb = tensorboard_scalars(workdir / "tensorboard")
    assert got_tb == tensorboard_scalars(reference / "tensorboard")
    assert len(got_tb["train/total"]) == len([x for x in want_lines if x["kind"] == "train"])

  # The final states (params, optimiser, EMA bank, prototypes) are bit-identical too.
  want_state, _ = tc.read_checkpoint(reference)
  got_state, got_meta = tc.read_checkpoint(workdir)
  assert got_meta["progress"]["task"] == 2
  assert sorted(got_state) == sorted(want_state)
  for key, value in want_state.items():
    np.testing.assert_array_equal(got_state[key], value, err_msg=key)


# ------------------------------------------------------------------------------------------------
# Bad input: one clear `error: ...` line, exit status 2, no traceback.

BAD_INPUTS = {
  "unknown_benchmark": (
    tc.cli_flags(data__name="nope"),
    ["unknown benchmark 'nope'", "animal_mnist", "kvasir"],
  ),
  "unknown_config_key": (
    [*tc.cli_flags(), "--config.train.nope=1"],
    ["unknown config key 'train.nope'", "train.lr", "train.batch_size"],
  ),
  "missing_data_dir": (
    tc.cli_flags(data__name="kvasir", data__data_dir="/nonexistent", data__num_classes=8),
    ["no kvasir data found", "/nonexistent", "classes.txt", "Nothing is downloaded"],
  ),
  "empty_class_set": (
    tc.cli_flags(data__max_train_per_class=0),
    ["task 0", "has no training images"],
  ),
  "init_cls_above_num_classes": (
    tc.cli_flags(data__init_cls=12),
    ["data.init_cls=12", "data.num_classes=10", "at least one class"],
  ),
  "unknown_remat_policy": (
    tc.cli_flags(model__remat="some"),
    ["model.remat='some'", "'none', 'dots', 'full'"],
  ),
  "image_size_not_divisible": (
    tc.cli_flags(backbone__image_size=27),
    ["backbone.image_size=27", "backbone.patch_size=7", "not divisible"],
  ),
  "platform_absent": (
    tc.cli_flags(train__platform="tpu"),
    ["train.platform='tpu' but JAX's backend is 'cpu'", '".[tpu]"', "train.platform=any"],
  ),
  "gcs_workdir": (
    [*tc.cli_flags(), "--workdir=gs://bucket/run"],
    ["--workdir=gs://bucket/run", "gcsfuse"],
  ),
  "repeated_seeds": (
    [*tc.cli_flags(), "--config.seeds=0,1,1"],
    ["--config.seeds='0,1,1'", "[1] repeated"],
  ),
  "stacked_ridge_head": (
    [*tc.cli_flags(), "--config.seeds=0,1", "--config.eval.head=ridge"],
    ["closed-form ridge head runs one seed per process", "--config.seed=0"],
  ),
  "stacked_layout": (  # 3 seeds on 8 devices: 1 x 8, and a batch of 12 does not split over 8
    [*tc.cli_flags(train__batch_size=12), "--config.seeds=0,1,2"],
    ["8 devices, 3 seeds", "train.batch_size=12 is not a multiple of 8", "Valid layouts"],
  ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_with_one_clear_message(case, tmp_path):
  flags, phrases = BAD_INPUTS[case]
  r = tc.run_cli(tmp_path / "run", *flags)
  assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  message = _error_line(r.stderr)
  for phrase in phrases:
    assert phrase in message, (phrase, message)
  assert not (tmp_path / "run" / "summary.json").exists()


def test_failed_start_does_not_bind_the_workdir(tmp_path):
  """A run that fails before its first checkpoint leaves a workdir the corrected command can use:
  the second failure reports its own problem, not 'a different config'."""
  workdir = tmp_path / "run"
  r = tc.run_cli(workdir, *tc.cli_flags(data__name="nope"))
  assert r.returncode == 2 and "unknown benchmark" in _error_line(r.stderr)
  r = tc.run_cli(workdir, *tc.cli_flags(data__max_train_per_class=0))
  assert r.returncode == 2
  message = _error_line(r.stderr)
  assert "has no training images" in message and "different config" not in message


def test_resume_with_a_different_model_size_is_refused(reference, cache, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  before = tc.file_digests(workdir / "checkpoints")
  assert tc.checkpoint_numbers(workdir)

  r = tc.run_cli(workdir, *tc.cli_flags(backbone__width=32), cache_dir=cache)
  assert r.returncode == 2, r.stderr[-3000:]
  message = _error_line(r.stderr)
  assert "different config" in message and "backbone.width: 16 -> 32" in message, message

  # Without config.json the checkpoint itself is checked: the message names a leaf and both shapes.
  (workdir / "config.json").unlink()
  r = tc.run_cli(workdir, *tc.cli_flags(backbone__width=32), cache_dir=cache)
  assert r.returncode == 2, r.stderr[-3000:]
  message = _error_line(r.stderr)
  match = re.search(r"^  (\S+): stored \(([\d, ]+)\), expected \(([\d, ]+)\)$", message, re.M)
  assert match and "does not match the configured model" in message, message
  assert "new --workdir" in message and "Nothing in the workdir was changed" in message
  assert "16" in match.group(2) and "32" in match.group(3), message
  assert tc.file_digests(workdir / "checkpoints") == before  # nothing deleted or rewritten


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(cache, tmp_path):
  workdir = tmp_path / "run"
  r = tc.run_cli(workdir, *tc.cli_flags(train__lr=1e30), cache_dir=cache)
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr
  message = _error_line(r.stderr)
  # Step 0 is finite (the loss is computed before the update); the update blows up step 1.
  assert re.search(
    r"Non-finite loss term\(s\) \[.*'total'.*\] at task 0, epoch 0, step 1\.", message
  )
  assert "last good checkpoint" in message
  assert not (workdir / "summary.json").exists()
  # The checkpoint written after step 0 was finished before the process exited, and restores.
  assert tc.checkpoint_numbers(workdir) == [1]
  state, meta = tc.read_checkpoint(workdir)
  assert meta["progress"]["task"] == 0 and meta["progress"]["step_in_epoch"] == 1
  assert meta["progress"]["total_steps"] == 1
  assert state and all(np.isfinite(v).all() for v in state.values())
  assert [x["kind"] for x in tc.read_jsonl(workdir / "metrics.jsonl")] == ["train"]
