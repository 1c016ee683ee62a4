"""System tests of `ntkcl_jax.train.run` in process: 1 vs 8 devices, the summary, the baselines.

The in-process runs use the 8 simulated CPU devices of `conftest.py`; the 1-device run is a
subprocess (a process's device count is fixed when JAX starts).
"""

from __future__ import annotations

import importlib.util
import json
import re

import jax
import numpy as np
import pytest

from ntkcl_jax import config as config_lib
from ntkcl_jax import metrics, train
from tests import numerics
from tests import tiny_configs as tc
from tests.test_metrics import tensorboard_scalars

# 1 and 8 devices are different programs (sharded batch reductions sum in another order): they
# agree within the tolerances of `tests/numerics.py` (measured there), with identical predictions
# except counted near-ties (`numerics.PredictionRecorder` in both runs).
_ONE_DEVICE_RUN = """
import sys
import jax
from ntkcl_jax import config as config_lib, train
from tests.numerics import PredictionRecorder
from tests.tiny_configs import tiny_config
assert jax.device_count() == 1, jax.devices()
recorder = PredictionRecorder(config_lib.section_weights(tiny_config()))
train.run(tiny_config(), sys.argv[1], [recorder])
recorder.save(sys.argv[2])
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tc.compile_cache_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def eight_devices(cache, tmp_path_factory):
  """(summary, workdir) of the tiny config trained in this process on 8 devices."""
  if jax.device_count() != 8:
    pytest.skip(f"needs the 8 simulated devices of conftest.py, have {jax.device_count()}")
  workdir = tmp_path_factory.mktemp("eight_devices")
  recorder = numerics.PredictionRecorder(config_lib.section_weights(tc.tiny_config()))
  with tc.compilation_cache(cache):
    summary = train.run(tc.tiny_config(), workdir, [recorder])
  return summary, workdir, recorder.stages


def _matrix(summary) -> np.ndarray:
  R = summary["accuracy_matrix"]
  return np.array([[np.nan if v is None else v for v in row] for row in R], np.float64)


def test_returned_summary_is_the_written_one(eight_devices):
  summary, workdir, _ = eight_devices
  written = json.loads((workdir / "summary.json").read_text())
  assert written == metrics._plain(summary)
  for key in ("accuracy_matrix", "avg_acc", "last_acc", "forgetting", "bwt", "config"):
    assert key in written
  assert written["wall_time_s"] > 0 and written["num_devices"] == 8
  R = _matrix(summary)
  assert R.shape == (2, 2) and np.isnan(R[0, 1]) and np.isfinite(R[np.tril_indices(2)]).all()
  records = tc.read_jsonl(workdir / "metrics.jsonl")
  assert [r["kind"] for r in records] == [
    "train",
    "train",
    "eval",
    "train",
    "train",
    "eval",
    "final",
  ]
  if importlib.util.find_spec("tensorboardX") is not None:  # the same scalars as event files
    scalars = tensorboard_scalars(workdir / "tensorboard")
    assert [v for _, v in scalars["train/total"]] == pytest.approx(
      [r["total"] for r in records if r["kind"] == "train"]
    )
    assert [s for s, _ in scalars["train/total"]] == [1, 2, 3, 4]  # global steps
    assert scalars["eval/A"] == [
      (2, pytest.approx(summary["stages"][0]["A"])),
      (4, pytest.approx(summary["stages"][1]["A"])),
    ]
    assert scalars["final/avg_acc"] == [(4, pytest.approx(summary["avg_acc"]))]


@pytest.mark.numerics
def test_one_device_matches_eight_devices(eight_devices, cache, tmp_path):
  _, workdir8, predictions8 = eight_devices
  workdir1 = tmp_path / "one_device"
  tc.run_python(
    _ONE_DEVICE_RUN, str(workdir1), str(tmp_path / "p.npz"), num_devices=1, cache_dir=cache
  )
  summary1 = json.loads((workdir1 / "summary.json").read_text())
  assert summary1["num_devices"] == 1
  # the fields that must differ
  summary1["num_devices"] = 8
  summary1["backend"].update(device_count=8, local_device_count=8)

  ties, allowance = numerics.near_tie_allowance(
    numerics.PredictionRecorder.load(tmp_path / "p.npz"), predictions8
  )
  print(f"1 vs 8 devices: {ties} near-ties, accuracy allowance {allowance}")
  written8 = json.loads((workdir8 / "summary.json").read_text())
  numerics.assert_records_close(summary1, written8, allowance, path="summary")
  lines1, lines8 = (tc.read_jsonl(w / "metrics.jsonl") for w in (workdir1, workdir8))
  assert [(x["kind"], x.get("task"), x.get("step")) for x in lines1] == [
    (x["kind"], x.get("task"), x.get("step")) for x in lines8
  ]
  numerics.assert_records_close(lines1, lines8, allowance, path="metrics.jsonl")

  protos1 = tc.read_checkpoint(workdir1)[0]["prototypes"]
  protos8 = tc.read_checkpoint(workdir8)[0]["prototypes"]
  # rows for all 10 classes of the sequence (whatever max_tasks), 4 seen; D = 2d
  assert protos1.shape == (10, 32) and np.abs(protos8[:4]).sum(1).min() > 0
  assert not protos8[4:].any()
  np.testing.assert_allclose(protos1, protos8, atol=numerics.PROTOTYPE_ATOL, rtol=0)


@pytest.mark.parametrize("method", ["simplecil", "seq_finetune", "joint"])
def test_baseline_method_runs(method, tmp_path):
  summary = train.run(tc.tiny_config(method=method), tmp_path)
  assert json.loads((tmp_path / "summary.json").read_text()) == metrics._plain(summary)
  assert summary["method"] == method
  R = _matrix(summary)
  lines = tc.read_jsonl(tmp_path / "metrics.jsonl")
  train_lines = [x for x in lines if x["kind"] == "train"]
  lower = R[np.tril_indices(R.shape[0])]
  assert np.isfinite(lower).all() and ((lower >= 0) & (lower <= 100)).all()

  if method == "joint":  # one task over all 10 classes, 10 steps of 16 of the 160 images
    assert R.shape == (1, 1)
    assert [(x["task"], x["step"]) for x in train_lines] == [(0, s) for s in range(1, 11)]
    assert all("ce_linear" in x and "mi" not in x for x in train_lines)
    assert np.isclose(R[0, 0] % (100 / 80), 0) or np.isclose(R[0, 0] % (100 / 80), 100 / 80)
    assert summary["forgetting"] == 0 and summary["avg_acc"] == summary["last_acc"]
    return

  assert R.shape == (2, 2) and np.isnan(R[0, 1])
  if method == "simplecil":  # no training: prototypes of the frozen backbone's features
    assert train_lines == [] and [x["kind"] for x in lines] == ["eval", "eval", "final"]
    # Old prototypes and features never change, so an old image right among 4 classes is right
    # among its task's 2: accuracy on task 0 cannot rise.
    assert R[1, 0] <= R[0, 0] and summary["forgetting"] >= 0
    protos = tc.read_checkpoint(tmp_path)[0]["prototypes"]
    assert protos.shape == (10, 16) and not protos[4:].any()  # D = backbone width; 4 seen
    if importlib.util.find_spec("tensorboardX") is not None:  # no steps: evals at task indices
      scalars = tensorboard_scalars(tmp_path / "tensorboard")
      assert [s for s, _ in scalars["eval/A"]] == [0, 1] and scalars["final/avg_acc"][0][0] == 1
  else:  # seq_finetune: linear head + current adapters, cross-entropy only
    assert [(x["task"], x["step"]) for x in train_lines] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert all(set(x) >= {"ce_linear", "total"} and "mi" not in x for x in train_lines)
    assert all(np.isfinite(x["total"]) for x in train_lines)


def test_workdir_check_frees_output_only_keys_and_reads_old_schemas(tmp_path):
  """A bound workdir accepts another `train.tensorboard` (output only) and a config.json written
  before `model.remat` existed when the run asks for the old behaviour ("none"); it refuses a
  result-changing difference, naming the key."""
  config = tc.tiny_config()
  config.model.remat = "none"
  train.check_workdir_config(tmp_path, config, write=True)
  (tmp_path / "checkpoints" / "7").mkdir(parents=True)  # the workdir now holds a run
  path = tmp_path / "config.json"
  old = json.loads(path.read_text())
  del old["model.remat"]  # as written by the code before the key existed
  path.write_text(json.dumps(old))
  config.train.tensorboard = not config.train.tensorboard
  train.check_workdir_config(tmp_path, config, write=True)  # accepted
  config.model.remat = "dots"
  with pytest.raises(train.WorkdirMismatchError, match=re.escape("model.remat: None -> 'dots'")):
    train.check_workdir_config(tmp_path, config, write=True)
