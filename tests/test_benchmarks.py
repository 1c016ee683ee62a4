"""The benchmark commands run and report consistent quantities (no timing is asserted here).

Speed targets live in the commands' own output (README "Performance"); these tests only check that
each command (`python -m experiments.benchmarks <command>`) runs end to end on the tiny geometry and that what it reports is self-consistent:
the analytic FLOP count against XLA's, equal steps per task, one sweep point per probe size with a
finite PSD kernel of the right shape, fitted exponents present (their values are not bounded).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run_json(command: str, *args: str, timeout: float = 900) -> dict:
  proc = subprocess.run(
    [sys.executable, "-m", "experiments.benchmarks", command, *args, "--json"],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=timeout,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_bench_step_tiny_reports_matching_flop_counts():
  out = _run_json(
    "step",
    *("--size", "tiny", "--ptm", "off", "--repeats", "1", "--no-subprocess"),
    *("--dot-size", "256", "--dot-repeats", "1"),
  )
  assert out["dot_flop_s"]["float32"] > 0
  by_phase = {r["phase"]: r for r in out["results"]}
  assert sorted(by_phase) == ["eval", "train"]
  for phase, r in by_phase.items():
    assert "error" not in r, r
    assert r["img_s"] > 0 and r["compile_s"] > 0 and r["peak_rss_bytes"] > 0
    # XLA counts every matmul the analytic formula counts, plus elementwise ops (one FLOP each):
    # measured 1.11 (train) and 1.13 (eval) on the tiny geometry, 1.01-1.02 at ViT-B/16.
    ratio = r["xla_flops_per_img"] / r["analytic_flops_per_img"]
    assert 1.0 <= ratio <= 1.25, (phase, ratio)
  assert by_phase["train"]["loss_finite"] is True
  assert (
    by_phase["train"]["analytic_flops_per_img"] > 1.4 * by_phase["eval"]["analytic_flops_per_img"]
  )


@pytest.mark.slow
def test_bench_growth_equal_steps_per_task():
  out = _run_json(
    "growth",
    *("--tasks", "3", "--train-per-class", "32", "--test-per-class", "8", "--epochs", "1"),
  )
  tasks = out["tasks"]
  assert [t["task"] for t in tasks] == [0, 1, 2]
  assert len({t["steps"] for t in tasks}) == 1  # one class per task, same cap
  assert all(t["seconds"] > 0 and t["rss_bytes"] > 0 for t in tasks)
  for key in ("time_slope_per_task", "rss_slope_per_task"):  # trend fits of tasks 1..2
    assert math.isfinite(out[key]), key


@pytest.mark.slow
def test_bench_ntk_sweep_reports_each_probe_size():
  ns = [4, 8]
  out = _run_json("ntk", "--sweep-n", ",".join(map(str, ns)), "--repeats", "1")
  assert out["impl"] == "native:1"
  points = out["points"]
  assert [p["n"] for p in points] == ns  # one point per probe size asked for, in order
  for p in points:
    assert "error" not in p, p
    assert (p["model"], p["backend"], p["implementation"]) == ("tiny", "native", 1)
    assert p["params"] > 0 and p["outputs"] > 0
    # Θ is the (N, N) Gram matrix of the traced Jacobians: finite, symmetric, PSD
    assert p["theta_shape"] == [p["n"], p["n"]] and p["theta_finite"] is True
    assert p["theta_asymmetry"] < 1e-5 and p["theta_min_eig_rel"] > -1e-5, p
    assert p["max_rel_diff_vs_first"] == 0.0  # the only implementation is its own reference
    # memory fields: the RSS baseline is taken before the kernel, the added peak after it
    assert p["rss_before_bytes"] > 0 and p["added_peak_bytes"] >= 0
    assert math.isfinite(p["median_s"]) and math.isfinite(p["first_s"])
  # the fitted exponents are reported (their values are timings: README "Performance")
  for key in ("time_exponent", "memory_exponent"):
    assert math.isfinite(out[key]), key


@pytest.mark.slow
@pytest.mark.skipif(
  importlib.util.find_spec("torch") is None
  or not (pathlib.Path(os.environ.get("NTKCL_OFFICIAL_DIR", "/nonexistent")) / "main.py").exists(),
  reason="needs torch and NTKCL_OFFICIAL_DIR=<extracted NTK-CL checkout>",
)
def test_bench_step_vs_official_runs_the_official_step():
  out = _run_json(
    "step",
    *(
      "--size",
      "tiny",
      "--ptm",
      "off",
      "--repeats",
      "1",
      "--dot-size",
      "256",
      "--dot-repeats",
      "1",
    ),
    *("--vs-official", os.environ["NTKCL_OFFICIAL_DIR"]),
  )
  rows = {r["phase"]: r for r in out["official_results"]}
  assert sorted(rows) == ["eval", "train"]
  for r in rows.values():
    assert "error" not in r, r
    assert r["framework"] == "official" and r["img_s"] > 0 and r["batch"] == 32
  assert sorted(x["phase"] for x in out["vs_official"]) == ["eval", "train"]
