"""`experiments/launch_tpu_pod.sh` against a fake `gcloud` on PATH that records its arguments."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "launch_tpu_pod.sh"
CONFIG = "experiments/configs/cifar100.py:backbone=in21k"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

_FAKE_GCLOUD = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


@pytest.fixture
def fake_gcloud(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(_FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  log = tmp_path / "gcloud.jsonl"
  env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
  env["FAKE_GCLOUD_LOG"] = str(log)
  return env, log


def _launch(env, *args):
  return subprocess.run(
    ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
  )


def _calls(log: pathlib.Path) -> list[list[str]]:
  return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def test_launch_clones_commit_installs_tpu_extra_and_starts_nohup_per_worker(fake_gcloud):
  env, log = fake_gcloud
  args = ("--repo", "https://example.com/ntkcl-jax.git", "--project", "proj")
  r = _launch(env, *args, "pod-v4-32", "us-central2-b", COMMIT, CONFIG, "/mnt/runs/c0")
  assert r.returncode == 0, r.stderr
  calls = _calls(log)
  assert len(calls) == 2, calls
  for call in calls:
    assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pod-v4-32"]
    assert "--worker=all" in call
    assert call[call.index("--zone") + 1] == "us-central2-b"
    assert call[call.index("--project") + 1] == "proj"
  install = calls[0][calls[0].index("--command") + 1]
  assert "git clone https://example.com/ntkcl-jax.git" in install
  assert f"git checkout --quiet --detach {COMMIT}" in install
  assert "pip install --quiet -r requirements.txt -e '.[tpu]'" in install
  start = calls[1][calls[1].index("--command") + 1]
  assert "nohup python -m ntkcl_jax.main" in start and "--multihost" in start
  assert f"--config {shlex.quote(CONFIG)}" in start and "--workdir /mnt/runs/c0" in start
  assert "--config.train.platform=tpu" in start
  assert "> logs/worker-$W.log 2>&1 < /dev/null &" in start  # one log per worker, detached


def test_dry_run_prints_every_gcloud_command_and_runs_none(fake_gcloud):
  env, log = fake_gcloud
  r = _launch(
    env, "--dry-run", "--repo", "local", "pod", "europe-west4-a", COMMIT[:7], CONFIG, "/w"
  )
  assert r.returncode == 0, r.stderr
  assert not log.exists()  # nothing ran
  lines = r.stdout.strip().splitlines()
  gcloud = [shlex.split(x) for x in lines if x.startswith("gcloud ")]
  assert [c[4] for c in gcloud] == ["scp", "ssh", "ssh"]  # copy, install, start
  assert gcloud[0][5].endswith(f"ntkcl-jax-{COMMIT[:7]}.tar.gz") and gcloud[0][6] == "pod:/tmp/"
  assert all("--worker=all" in c for c in gcloud)
  assert lines[0].startswith("git -C ") and "archive --format=tar.gz" in lines[0]
  assert "nohup" in gcloud[2][gcloud[2].index("--command") + 1]


def test_bad_commit_and_missing_arguments_fail_clearly(fake_gcloud):
  env, log = fake_gcloud
  r = _launch(env, "--repo", "local", "pod", "zone", "main", CONFIG, "/w")
  assert r.returncode == 2 and "must be a commit hash" in r.stderr
  r = _launch(env, "pod", "zone")
  assert r.returncode == 2 and "usage:" in r.stderr
  assert not log.exists()


def test_config_overrides_reach_every_worker_and_other_arguments_fail(fake_gcloud):
  env, log = fake_gcloud
  r = _launch(
    env,
    "--repo",
    "https://example.com/r.git",
    "pod",
    "zone",
    COMMIT,
    CONFIG,
    "/w",
    "--config.seeds=0,1,2,3,4",
  )
  assert r.returncode == 0, r.stderr
  start = _calls(log)[-1]
  words = shlex.split(start[start.index("--command") + 1])  # as the worker's shell reads it
  main = words[words.index("nohup") + 1 : words.index(">")]
  assert main[-2:] == ["--config.train.platform=tpu", "--config.seeds=0,1,2,3,4"]
  r = _launch(env, "--repo", "local", "pod", "zone", COMMIT, CONFIG, "/w", "--seeds=0,1")
  assert r.returncode == 2 and "must be config overrides" in r.stderr


def test_preflight_of_an_unknown_slice_stops_before_any_gcloud_call(fake_gcloud):
  env, log = fake_gcloud
  env = {**env, "PYTHON": sys.executable}
  args = ("--preflight", "v9-8", "--repo", "https://example.com/x.git")
  r = _launch(env, *args, "pod", "zone", COMMIT, CONFIG, "/mnt/runs/c0")
  assert r.returncode == 2, r.stderr[-2000:]
  assert "unknown --target 'v9-8'" in r.stderr and "v5litepod-8" in r.stderr
  assert "nothing was started on pod" in r.stderr
  assert _calls(log) == []


def test_preflight_that_fits_prints_the_report_then_launches(fake_gcloud):
  """`--preflight cpu` (this machine's devices) compiles the tiny demo run, then the launch goes on."""
  from tests import tiny_configs as tc

  env, _ = fake_gcloud
  env = {**env, **tc.subprocess_env(1), "PYTHON": sys.executable}
  args = ("--dry-run", "--preflight", "cpu", "--repo", "https://example.com/x.git")
  flags = [f for f in tc.cli_flags() if not f.startswith("--config.data.max_")]
  r = _launch(env, *args, "pod", "zone", COMMIT, "experiments/configs/demo.py", "/w", *flags)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "train_step" in r.stdout and "predict" in r.stdout  # the preflight report
  assert r.stdout.count("compute tpus tpu-vm ssh pod") == 2  # then the (dry-run) launch
