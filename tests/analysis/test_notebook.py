"""Executes experiments/notebooks/ntk_diagnostics.ipynb with nbclient (SPEC 7.8: Colab, CPU).

The fast variant shrinks the probes through the notebook's environment knobs (3 tasks, 4 train +
2 test probes per task); the slow one runs the notebook's defaults (5 tasks, 16 + 8).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "experiments" / "notebooks" / "ntk_diagnostics.ipynb"
FIGURES = {"kernel_init.png", "rho_bar.png", "gaps_sample_size.png", "gaps_lambda.png"}


def _kernel_name(tmp_path: pathlib.Path, monkeypatch) -> str:
  """`python3` if registered; otherwise this interpreter's ipykernel installed into tmp_path."""
  from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

  try:
    KernelSpecManager().get_kernel_spec("python3")
    return "python3"
  except NoSuchKernel:
    prefix = tmp_path / "kernel"
    subprocess.check_call(
      [sys.executable, "-m", "ipykernel", "install", "--prefix", str(prefix), "--name", "ntkcl"]
    )
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    return "ntkcl"


def run_notebook(tmp_path, monkeypatch, **env) -> tuple[dict, pathlib.Path]:
  out = tmp_path / "out"
  for key, value in {**env, "NTK_NB_OUT": out}.items():
    monkeypatch.setenv(key, str(value))
  monkeypatch.delenv("NTK_NB_WORKDIR", raising=False)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
    nb,
    kernel_name=_kernel_name(tmp_path, monkeypatch),
    timeout=900,
    resources={"metadata": {"path": str(NOTEBOOK.parent)}},
  )
  client.execute()  # raises CellExecutionError on any failing cell
  errors = [
    o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
  ]
  assert not errors
  last = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
  return json.loads(last.strip().splitlines()[-1]), out


def _check(result, out, tasks, per_task):
  assert result["rows"] == tasks * per_task
  assert FIGURES <= set(result["figures"])
  for name in FIGURES:
    assert (out / name).read_bytes()[:4] == b"\x89PNG"
  assert (out / "ntk_init.npz").exists()
  record = json.loads((out / "ntk.jsonl").read_text().splitlines()[0])
  assert record["point"] == "init" and len(record["rho"]) == tasks
  assert all(abs(record["rho"][i][i] - 1) < 1e-9 for i in range(tasks))


def test_notebook_runs_fast_variant(tmp_path, monkeypatch):
  result, out = run_notebook(tmp_path, monkeypatch, NTK_NB_TRAIN=4, NTK_NB_TEST=2, NTK_NB_TASKS=3)
  _check(result, out, tasks=3, per_task=6)


@pytest.mark.slow
def test_notebook_runs_defaults(tmp_path, monkeypatch):
  result, out = run_notebook(tmp_path, monkeypatch)
  _check(result, out, tasks=5, per_task=24)
