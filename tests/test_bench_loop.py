"""`python -m experiments.benchmarks loop` end to end on tiny sizes: its JSON has every field, values sane.

No timing thresholds here (the machine is shared); the ratios themselves are in README "GPU / TPU".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests import tiny_configs as tc

TINY = {
  **tc.tiny_overrides(),
  "train.max_tasks": 1,
  "train.batch_size": 8,
  "train.checkpoint_every_steps": 0,
}


@pytest.mark.slow
def test_bench_loop_tiny_reports_every_field(tmp_path):
  overrides = [a for k, v in TINY.items() for a in ("--override", f"{k}={v}")]
  args = ["--repeats", "1", "--pipeline-size", "32", "--pipeline-images", "16"]
  args += [
    "--pipeline-batch",
    "8",
    "--feed-batch",
    "8",
    "--feed-images",
    "48",
    "--max-threads",
    "2",
  ]
  args += ["--step-ms", "5"]
  env = {**tc.subprocess_env(1, tmp_path / "cache"), "PYTHONPATH": str(tc.REPO)}
  proc = subprocess.run(
    [sys.executable, "-m", "experiments.benchmarks", "loop", *args, *overrides, "--json"],
    capture_output=True,
    text=True,
    cwd=tc.REPO,
    env=env,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["backend"]["backend"] == "cpu" and out["cpu_count"] == os.cpu_count()
  assert sorted(out["pipeline"]) == ["32px_from_32x32", "32px_from_375x500", "demo_28px_from_28x28"]
  for r in out["pipeline"].values():
    assert r["images"] > 0 and r["img_s"] > 0 and r["img_per_cpu_s"] > 0 and r["batch_ms"] > 0
  feed = out["feed"]
  assert [m["threads"] for m in feed["measured"]] == [1, 2]
  assert all(0 < m["ratio"] <= 1.05 for m in feed["measured"])  # sleep-bound: never above ~1
  assert feed["threads_for_095"] in (None, 1, 2) and feed["threads_estimate"] >= 1
  loop = out["loop"]
  assert loop["batch_size"] == 8 and loop["timed_steps"] == 3  # 32 images / 8 - the first
  assert len(loop["step_alone_img_s"]) == 2 and len(loop["trainer_img_s"]) == 1
  assert all(x > 0 for x in loop["step_alone_img_s"] + loop["trainer_img_s"])
  assert loop["ratio_median"] > 0 and loop["step_ms"] > 0
  assert out["threads_needed"][0]["step_ms"] == 5.0
  assert all(t["cores"] >= 1 for t in out["threads_needed"])
