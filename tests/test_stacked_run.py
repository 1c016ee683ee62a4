"""Stacked seeds through the trainer (`--config.seeds`): equal to the single runs, outputs, resume.

The single runs and the stacked run are the tiny config of `tiny_configs` (two tasks of two steps,
a checkpoint after every step) in one subprocess on one CPU device. A stacked seed is a different
compiled program from its single run (the step is vmapped over seeds), so the two agree within
the tolerances of `tests/numerics.py`, with identical predictions except counted near-ties
(`numerics.PredictionRecorder` records every seen test image's top-1 and top-2 margin after each
task). The hook test runs in this process and the resume test runs the CLI, both on 8 simulated
devices: two seeds as a 2 (seed) x 4 (data) mesh; the resumed run is the same program as the
uninterrupted one, so that comparison is exact.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from ntkcl_jax import config as config_lib
from ntkcl_jax import report, run_state, train
from tests import numerics
from tests import tiny_configs as tc

SEEDS = (0, 1)


class RecordingHook:
  """Keeps what the trainer shows a hook (prototypes, params, workdir) per call."""

  def __init__(self):
    self.views = []

  def on_init(self, view):
    self.views.append(view)

  def on_task_end(self, view):
    self.views.append(view)

  def summary(self):
    return {"recorded": len(self.views)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> pathlib.Path:
  return tc.compile_cache_dir(tmp_path_factory)


ONE_DEVICE_RUNS = """
import pathlib, sys
from ntkcl_jax import config as config_lib, train
from tests import tiny_configs as tc
from tests.numerics import PredictionRecorder
out = pathlib.Path(sys.argv[1])
weights = config_lib.section_weights(tc.tiny_config())
for seed in (0, 1):
  recorder = PredictionRecorder(weights)
  train.run(tc.tiny_config(seed=seed), out / f"single_{seed}", [recorder])
  recorder.save(out / f"predictions_single_{seed}.npz")
recorders = {seed: [PredictionRecorder(weights)] for seed in (0, 1)}
train.run(tc.tiny_config(seeds="0,1"), out / "stacked", recorders)
for seed, (recorder,) in recorders.items():
  recorder.save(out / f"predictions_stacked_{seed}.npz")
"""


@pytest.fixture(scope="module")
def one_device(tmp_path_factory, cache) -> pathlib.Path:
  """Workdirs `single_0`, `single_1` and `stacked` (seeds 0,1), all on one CPU device."""
  out = tmp_path_factory.mktemp("one_device")
  tc.run_python(ONE_DEVICE_RUNS, str(out), num_devices=1, cache_dir=cache, timeout=1200)
  return out


@pytest.fixture(scope="module")
def single_runs(one_device) -> dict[int, pathlib.Path]:
  return {seed: one_device / f"single_{seed}" for seed in SEEDS}


@pytest.fixture(scope="module")
def stacked_run(one_device) -> pathlib.Path:
  return one_device / "stacked"


def _allowance(one_device: pathlib.Path, seed: int) -> float:
  """Accuracy allowance (%) of stacked seed `seed` vs its single run: 0.0 without near-ties."""
  got = numerics.PredictionRecorder.load(one_device / f"predictions_stacked_{seed}.npz")
  want = numerics.PredictionRecorder.load(one_device / f"predictions_single_{seed}.npz")
  assert len(want) == 2 and all(len(stage["top1"]) for stage in want)
  return numerics.near_tie_allowance(got, want)[1]


@pytest.mark.numerics
def test_stacked_seeds_equal_their_single_runs(one_device, single_runs, stacked_run):
  """Per seed: the same summary and metrics lines (keys, kinds, tasks, steps, counts), losses
  within LOSS_RTOL, predictions identical but for near-ties, accuracies moved by no more."""
  workdir = stacked_run
  for seed in SEEDS:
    allowance = _allowance(one_device, seed)
    want = json.loads((single_runs[seed] / "summary.json").read_text())
    got = json.loads((workdir / f"seed_{seed}" / "summary.json").read_text())
    assert got.pop("stacked_seeds") == list(SEEDS)
    assert got["config"] == config_lib.flat_config(tc.tiny_config(seed=seed))
    numerics.assert_records_close(got, want, allowance, path=f"seed {seed} summary")
    want_lines = tc.read_jsonl(single_runs[seed] / "metrics.jsonl")
    got_lines = tc.read_jsonl(workdir / f"seed_{seed}" / "metrics.jsonl")
    assert [x["kind"] for x in got_lines] == ["train"] * 2 + ["eval"] + ["train"] * 2 + [
      "eval",
      "final",
    ]
    numerics.assert_records_close(got_lines, want_lines, allowance, path=f"seed {seed} lines")


def test_stacked_run_writes_seed_tables_and_per_seed_checkpoint_meta(stacked_run):
  workdir = stacked_run
  summaries = [json.loads((workdir / f"seed_{s}" / "summary.json").read_text()) for s in SEEDS]
  row = report.seed_row("ntkcl", summaries)
  csv_lines = (workdir / "results.csv").read_text().splitlines()
  assert csv_lines[0].split(",") == list(report.SEED_COLUMNS)
  assert csv_lines[1].split(",") == [row[0], *(f"{v:.4f}" for v in row[1:])]
  md = (workdir / "results.md").read_text()
  assert md.startswith("Seeds [0, 1]; mean ± std (ddof 0)")
  assert f"| ntkcl | {row[1]:.2f} ± {row[2]:.2f} |" in md
  top = json.loads((workdir / "summary.json").read_text())
  assert top["seeds"] == list(SEEDS) and top["mesh"] == {"seed": 1, "data": 1}
  assert top["per_seed"]["1"]["avg_acc"] == summaries[1]["avg_acc"]
  assert top["results"]["last_acc_std"] == pytest.approx(np.std([s["last_acc"] for s in summaries]))

  state, meta = tc.read_checkpoint(workdir)
  assert [e["seed"] for e in meta["progress"]["seeds"]] == list(SEEDS)
  rows = [[st["R_row"] for st in e["stages"]] for e in meta["progress"]["seeds"]]
  assert rows == [[st["R_row"] for st in s["stages"]] for s in summaries]
  assert meta["class_orders"]["1"] != meta["class_orders"]["0"]
  assert state["prototypes"].shape[0] == len(SEEDS)  # every per-run array has the seed axis


@pytest.mark.numerics
def test_load_run_picks_a_seed_of_a_stacked_run(one_device, single_runs, stacked_run):
  single = run_state.load_run(tc.tiny_config(seed=1), single_runs[1])
  stacked = run_state.load_run(tc.tiny_config(seeds="0,1"), stacked_run, seed=1)
  assert stacked.config.seed == 1 and not stacked.config.seeds
  assert stacked.prototypes.shape == single.prototypes.shape
  np.testing.assert_allclose(
    stacked.prototypes, single.prototypes, rtol=0, atol=numerics.PROTOTYPE_ATOL
  )
  np.testing.assert_allclose(
    stacked.accuracy_matrix, single.accuracy_matrix, rtol=0, atol=_allowance(one_device, 1)
  )
  numerics.assert_trees_close(stacked.params, single.params, numerics.STATE_RTOL, "params")
  with pytest.raises(ValueError, match="seed=5 is not one of this stacked run's seeds"):
    run_state.load_run(tc.tiny_config(seeds="0,1"), stacked_run, seed=5)


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory, cache) -> tuple[pathlib.Path, dict, RecordingHook]:
  """Seeds 0,1 in this process on 8 devices (2 x 4 mesh), a recording hook on seed 1."""
  workdir = tmp_path_factory.mktemp("eight_devices")
  hook = RecordingHook()
  with tc.compilation_cache(cache):
    result = train.run(tc.tiny_config(seeds="0,1"), workdir, {1: [hook]})
  return workdir, result, hook


def test_hooks_watch_the_seeds_they_are_given(eight_devices, tmp_path):
  """A hook of seed 1 sees seed 1's model, stream and directory; seed 0 has none."""
  workdir, result, hook = eight_devices
  config = tc.tiny_config(seeds="0,1")
  assert result["mesh"] == {"seed": 2, "data": 4}
  assert [v.task for v in hook.views] == [-1, 0, 1]
  assert {v.workdir for v in hook.views} == {workdir / "seed_1"}
  want_order = run_state.build_stream(tc.tiny_config(seed=1)).order.tolist()
  assert hook.views[-1].stream.order.tolist() == want_order
  final = run_state.load_run(config, workdir, seed=1)
  np.testing.assert_array_equal(hook.views[-1].prototypes, final.prototypes)
  assert json.loads((workdir / "seed_1" / "summary.json").read_text())["recorded"] == 3
  assert "recorded" not in json.loads((workdir / "seed_0" / "summary.json").read_text())
  with pytest.raises(ValueError, match=r"hooks for seeds \[7\]"):
    train.run(config, tmp_path / "other", {7: [RecordingHook()]})


def test_stacked_run_resumes_after_sigkill_on_a_seed_by_data_mesh(eight_devices, cache, tmp_path):
  """The CLI, 2 seeds on 8 devices (2 x 4), killed mid-task 0 and rerun: every seed's outputs
  equal those of the uninterrupted run (`eight_devices`)."""
  reference = eight_devices[0]
  flags = [*tc.cli_flags(), "--config.seeds=0,1"]
  workdir = tmp_path / "run"
  tc.kill_at_first_checkpoint(workdir, flags, cache, tmp_path / "killed.err")
  _, meta = tc.read_checkpoint(workdir, max(tc.checkpoint_numbers(workdir)))
  assert meta["progress"]["in_task"], f"killed too late: {meta['progress']}"

  r = tc.run_cli(workdir, *flags, cache_dir=cache)
  assert r.returncode == 0, r.stderr[-4000:]
  assert "Resuming from checkpoint" in r.stderr
  assert "2 seeds [0, 1] stacked on a {'seed': 2, 'data': 4} mesh" in r.stderr
  assert "| ntkcl |" in r.stdout  # results.md
  for seed in SEEDS:
    for name in ("summary.json", "metrics.jsonl"):
      assert (workdir / f"seed_{seed}" / name).is_file()
    want = json.loads((reference / f"seed_{seed}" / "summary.json").read_text())
    want.pop("recorded", None)  # the reference run's recording hook
    got = json.loads((workdir / f"seed_{seed}" / "summary.json").read_text())
    assert tc.without_timing(got) == tc.without_timing(want)
    want_lines = [
      tc.without_timing(x) for x in tc.read_jsonl(reference / f"seed_{seed}" / "metrics.jsonl")
    ]
    got_lines = [
      tc.without_timing(x) for x in tc.read_jsonl(workdir / f"seed_{seed}" / "metrics.jsonl")
    ]
    assert got_lines == want_lines
    for png in ("accuracy_matrix.png", "accuracy_per_task.png"):
      assert (workdir / f"seed_{seed}" / png).is_file()
  assert (workdir / "results.md").read_text() == (reference / "results.md").read_text()


@pytest.mark.numerics
def test_ntk_of_a_stacked_seed_equals_its_single_run(single_runs, stacked_run, tmp_path):
  """`measure_checkpoint(..., seed=1)` on the stacked workdir measures the same model as on the
  single run of seed 1: kernels at init identical (the same program on the same initial
  parameters), after the last task equal within KERNEL_RTOL of max |Θ| (the parameters came from
  different programs)."""
  from analysis.hook import measure_checkpoint

  measure_checkpoint(tc.tiny_config(seeds="0,1"), stacked_run, seed=1, out_dir=tmp_path / "a")
  measure_checkpoint(tc.tiny_config(seed=1), single_runs[1], out_dir=tmp_path / "b")
  names = sorted(p.name for p in (tmp_path / "b").glob("ntk_*.npz"))
  assert names == ["ntk_init.npz", "ntk_task_end_1.npz"]
  for name in names:
    with np.load(tmp_path / "a" / name) as a, np.load(tmp_path / "b" / name) as b:
      assert a["theta"].shape == b["theta"].shape and np.abs(b["theta"]).max() > 0, name
      if name == "ntk_init.npz":
        np.testing.assert_array_equal(a["theta"], b["theta"], err_msg=name)
      scale = np.abs(b["theta"]).max()
      np.testing.assert_allclose(
        a["theta"], b["theta"], rtol=0, atol=numerics.KERNEL_RTOL * scale, err_msg=name
      )
