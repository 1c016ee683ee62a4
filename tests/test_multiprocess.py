"""Two JAX processes on localhost (CPU collectives over gloo) through the CLI's multi-process flags.

Each process has one CPU device, so the mesh spans 2 devices in 2 processes: batches are split
between the processes, prototypes and evaluation all-gather across them. The result must match the
1-process run of the same config (`tiny_configs.reference_cli_run`, 8 devices in one process),
within the tolerances of `tests/numerics.py` (2 processes and 1 are different programs). No hook
can watch a CLI child, so predictions are compared on the last checkpoints
(`numerics.final_predictions`), and the near-ties found there bound every accuracy.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from tests import numerics
from tests import tiny_configs as tc


def _two_processes(tmp_path, workdir, *flags: str) -> tuple[list[str], list[str]]:
  """Runs the CLI as 2 processes of 1 CPU device each; returns their (stdout, stderr)."""
  port = tc.free_port()
  procs, logs = [], []
  try:
    for i in range(2):
      out, err = open(tmp_path / f"out{i}", "w"), open(tmp_path / f"err{i}", "w")
      logs += [out, err]
      cmd = tc.cli_command(
        workdir,
        *flags,
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      )
      # No shared compilation cache: two writers of one entry could expose a half-written file.
      procs.append(
        subprocess.Popen(cmd, cwd=tc.REPO, env=tc.subprocess_env(1), stdout=out, stderr=err)
      )
    codes = [p.wait(timeout=900) for p in procs]
  finally:
    for p in procs:
      p.kill()
      p.wait()
    for f in logs:
      f.close()
  stderr = [(tmp_path / f"err{i}").read_text() for i in range(2)]
  stdout = [(tmp_path / f"out{i}").read_text() for i in range(2)]
  assert codes == [0, 0], "\n\n".join(s[-3000:] for s in stderr)
  return stdout, stderr


@pytest.mark.numerics
@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("seeds", ["0,1", "0,1,2"])
def test_two_processes_train_stacked_seeds(tmp_path, seeds):
  """Stacked seeds over 2 processes: "0,1" puts one seed on each process (2 x 1 mesh), "0,1,2"
  splits every seed's batch between them (1 x 2). Each seed matches its 1-process single run."""
  workdir = tmp_path / "run"
  stdout, _ = _two_processes(tmp_path, workdir, *tc.cli_flags(), f"--config.seeds={seeds}")
  assert "| ntkcl |" in stdout[0] and "| ntkcl |" not in stdout[1]
  for seed in map(int, seeds.split(",")):
    single = tmp_path / f"single_{seed}"
    r = tc.run_cli(single, *tc.cli_flags(seed=seed), num_devices=2)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((workdir / f"seed_{seed}" / "summary.json").read_text())
    want = json.loads((single / "summary.json").read_text())
    assert got["num_processes"] == 2 and got["config"] == want["config"]
    _, allowance = numerics.near_tie_allowance(
      numerics.final_predictions(tc.tiny_config(seeds=seeds), workdir, seed=seed),
      numerics.final_predictions(tc.tiny_config(seed=seed), single),
    )
    R = lambda s: np.array(s["accuracy_matrix"], dtype=np.float64)  # noqa: E731  (None -> nan)
    np.testing.assert_allclose(R(got), R(want), atol=allowance, rtol=0)
    lines_got = tc.read_jsonl(workdir / f"seed_{seed}" / "metrics.jsonl")
    lines_want = tc.read_jsonl(single / "metrics.jsonl")
    assert [x["kind"] for x in lines_got] == [x["kind"] for x in lines_want]  # no duplicates
    numerics.assert_records_close(lines_got, lines_want, allowance, path=f"seed {seed}")


@pytest.mark.numerics
@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_one_process(tmp_path, tmp_path_factory):
  reference = tc.reference_cli_run(tmp_path_factory)
  workdir = tmp_path / "run"
  stdout, _ = _two_processes(tmp_path, workdir, *tc.cli_flags())

  # Only process 0 writes and prints: one copy of every metrics line, one results table.
  assert "| metric |" in stdout[0] and "| metric |" not in stdout[1]
  got = json.loads((workdir / "summary.json").read_text())
  want = json.loads((reference / "summary.json").read_text())
  assert got["num_processes"] == 2 and got["num_devices"] == 2
  assert want["num_processes"] == 1 and want["num_devices"] == 8

  _, allowance = numerics.near_tie_allowance(
    numerics.final_predictions(tc.tiny_config(), workdir),
    numerics.final_predictions(tc.tiny_config(), reference),
  )
  for summary in (got, want):  # the fields that must differ
    for key in ("num_processes", "num_devices", "backend"):
      summary.pop(key)
  numerics.assert_records_close(got, want, allowance, path="summary")
  lines_got = tc.read_jsonl(workdir / "metrics.jsonl")
  lines_want = tc.read_jsonl(reference / "metrics.jsonl")
  assert [x["kind"] for x in lines_got] == [x["kind"] for x in lines_want]  # no duplicates
  numerics.assert_records_close(lines_got, lines_want, allowance, path="metrics.jsonl")
