"""A method outside the package (`experiments/custom_methods/ncm.py`), named by import path on the
command line: two stacked seeds on a 2 (seed) x 4 (data) mesh, the NTK hook, and a SIGKILL resume
whose outputs equal the uninterrupted run's (README "Adding a method")."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from tests import tiny_configs as tc

NCM = "experiments.custom_methods.ncm:NearestClassMean"
FLAGS = tc.cli_flags(
  method=NCM,
  seeds="0,1",
  analysis__enabled=True,
  analysis__n_train=8,
  analysis__n_test=4,
  analysis__projection_dim=4,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> pathlib.Path:
  return tc.compile_cache_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache) -> pathlib.Path:
  workdir = tmp_path_factory.mktemp("ncm") / "run"
  r = tc.run_cli(workdir, *FLAGS, cache_dir=cache)
  assert r.returncode == 0, r.stderr[-4000:]
  return workdir


def test_custom_method_runs_stacked_with_the_ntk_hook(uninterrupted):
  for seed in (0, 1):
    summary = json.loads((uninterrupted / f"seed_{seed}" / "summary.json").read_text())
    assert summary["method"] == NCM and summary["config"]["method"] == NCM
    assert len(summary["stages"]) == 2 and all(s["A"] >= 0 for s in summary["stages"])
    assert all(
      line["kind"] != "train"
      for line in tc.read_jsonl(uninterrupted / f"seed_{seed}" / "metrics.jsonl")
    )  # no gradient steps
  ntk = json.loads((uninterrupted / "seed_0" / "summary.json").read_text())["ntk"]
  assert ntk["points"] == ["init", "task_end_0", "task_end_1"]  # analysis.seeds="first"
  assert "ntk" not in json.loads((uninterrupted / "seed_1" / "summary.json").read_text())


def test_custom_method_resumes_after_sigkill(uninterrupted, cache, tmp_path):
  """Killed after its first checkpoint (task 0's end: the method takes no steps), the rerun finds
  the method again from the config and writes what the uninterrupted run wrote.

  The NTK point of task 0 may be missing: the kill can land between task 0's checkpoint and its
  hook call, and a resumed run does not measure finished tasks again. The points both runs
  measured are equal.
  """
  workdir = tmp_path / "run"
  tc.kill_at_first_checkpoint(workdir, FLAGS, cache, tmp_path / "killed.err")
  assert json.loads((workdir / "config.json").read_text())["method"] == NCM
  r = tc.run_cli(workdir, *FLAGS, cache_dir=cache)
  assert r.returncode == 0, r.stderr[-4000:]
  assert "Resuming from checkpoint" in r.stderr
  runs = (uninterrupted, workdir)
  for seed in (0, 1):
    want, got = (json.loads((d / f"seed_{seed}" / "summary.json").read_text()) for d in runs)
    want_ntk, got_ntk = want.pop("ntk", None), got.pop("ntk", None)
    assert tc.without_timing(got) == tc.without_timing(want)
    want_lines, got_lines = (
      [tc.without_timing(x) for x in tc.read_jsonl(d / f"seed_{seed}" / "metrics.jsonl")]
      for d in runs
    )
    assert got_lines == want_lines
    assert (got_ntk is None) == (want_ntk is None) == (seed != 0)
  points = json.loads((workdir / "seed_0" / "summary.json").read_text())["ntk"]["points"]
  assert {"init", "task_end_1"} <= set(points) <= {"init", "task_end_0", "task_end_1"}
  for point in points:
    want_theta, got_theta = (
      np.load(d / "seed_0" / "analysis" / f"ntk_{point}.npz")["theta"] for d in runs
    )
    np.testing.assert_array_equal(got_theta, want_theta)
