"""analysis.plots: figures from ntk_<point>.npz + ntk.jsonl (+ summary.json), no model needed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from analysis import plots
from analysis.measure import point_record
from analysis.ntk_files import save_point
from analysis.probes import ProbeSet
from analysis.summary import analyze

T, N_TR, N_TE = 3, 4, 2


def _plain(obj):
  """Arrays -> lists, NaN -> None: what train.run writes to summary.json."""
  text = json.dumps(obj, default=lambda o: np.asarray(o).tolist())
  return json.loads(text, parse_constant=lambda _: None)


def synthetic_run(out_dir, with_summary=True):
  """Four Gram matrices J Jᵀ over 3 tasks' probe rows, drifting from point to point."""
  rng = np.random.default_rng(0)
  rows = T * (N_TR + N_TE)
  task = np.repeat(np.arange(T), N_TR + N_TE)
  split = np.tile(["tr"] * N_TR + ["te"] * N_TE, T)
  labels = 2 * task + np.tile([0, 1], rows // 2)
  probes = ProbeSet.from_arrays(
    np.zeros((rows, 1)), labels, task, split, [(2 * t, 2) for t in range(T)]
  )
  jac = rng.normal(size=(rows, 40))
  points, task_end, previous = {}, {}, None
  for i, name in enumerate(["init", "task_end_0", "task_end_1", "task_end_2"]):
    jac = jac + 0.3 * rng.normal(size=jac.shape)
    kernel = probes.kernel(jac @ jac.T)
    t = i - 1
    if t >= 0:
      task_end[t] = kernel
    rec = point_record(kernel, task=t, task_end_kernels=task_end, previous=previous)
    save_point(out_dir, name, kernel, task=t, record=rec)
    points[name], previous = kernel, kernel
  if with_summary:
    R = np.array([[90.0, np.nan, np.nan], [70.0, 85.0, np.nan], [50.0, 75.0, 80.0]])
    ntk = analyze(points, R)
    (out_dir.parent / "summary.json").write_text(json.dumps(_plain({"ntk": ntk})))
  return points


def test_write_all_from_a_run_directory(tmp_path):
  synthetic_run(tmp_path / "analysis")
  paths = plots.write_all(tmp_path)
  names = {p.name for p in paths}
  assert names == {
    "kernel_init.png",
    "kernel_task_end_0.png",
    "kernel_task_end_1.png",
    "kernel_task_end_2.png",
    "rho_bar.png",
    "forgetting_scatter.png",
    "gaps_sample_size.png",
    "gaps_lambda.png",
  }
  import matplotlib.image

  for p in paths:
    assert p.parent == tmp_path / "analysis"
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(p)
    assert img.ndim == 3 and img.shape[0] > 100
  # different kernels give different heatmaps
  a = matplotlib.image.imread(tmp_path / "analysis" / "kernel_init.png")
  b = matplotlib.image.imread(tmp_path / "analysis" / "kernel_task_end_2.png")
  assert not np.array_equal(a, b)


def test_without_summary_only_kernel_and_rho_plots(tmp_path):
  synthetic_run(tmp_path, with_summary=False)
  names = {p.name for p in plots.write_all(tmp_path)}
  assert "rho_bar.png" in names and "kernel_init.png" in names
  assert "forgetting_scatter.png" not in names


def test_summary_argument_and_missing_files(tmp_path):
  points = synthetic_run(tmp_path / "x", with_summary=False)
  ntk = analyze(points, None)  # no measured R: no forgetting scatter, sweeps still plotted
  names = {p.name for p in plots.write_all(tmp_path / "x", ntk_summary=ntk)}
  assert {"gaps_lambda.png", "gaps_sample_size.png"} <= names
  assert "forgetting_scatter.png" not in names
  with pytest.raises(FileNotFoundError, match=r"analysis\.enabled"):
    plots.write_all(tmp_path / "empty")


def test_titles_say_proj():
  assert "[PROJ]" in plots.PROJ and "not the paper" in plots.PROJ
