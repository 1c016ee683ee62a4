"""analysis.plots: figures from ntk_<point>.npz + ntk.jsonl (+ summary.json), no model needed."""

from __future__ import annotations

import json
import pathlib

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


def test_plotted_data_matches_the_files(tmp_path, monkeypatch):
  """What each figure draws, read from its artists, equals what the files hold; the PNGs have the
  figure's pixel size, are not blank, and every title says [PROJ]."""
  import matplotlib.image

  figures = {}
  real_save = plots.save_figure

  def capture(fig, path):  # the artists stay readable after the figure is closed
    figures[pathlib.Path(path).name] = fig
    real_save(fig, path)

  monkeypatch.setattr(plots, "save_figure", capture)
  out = tmp_path / "analysis"
  points = synthetic_run(out)
  paths = plots.write_all(tmp_path)
  assert sorted(figures) == sorted(p.name for p in paths)

  for p in paths:
    fig = figures[p.name]
    img = matplotlib.image.imread(p)
    width, height = (fig.get_size_inches() * 100).round().astype(int)  # save_figure: 100 dpi
    assert img.shape[:2] == (height, width), p.name
    rgb = img[..., :3].reshape(-1, 3)
    assert len(np.unique(rgb, axis=0)) > 50, f"{p.name} is (nearly) blank"
    assert plots.PROJ in fig.axes[0].get_title(), p.name

  # kernel heatmap: the cosine-normalised Θ of that point, one outlined block per task
  theta = points["task_end_1"].theta
  d = np.sqrt(np.diag(theta))
  ax = figures["kernel_task_end_1.png"].axes[0]
  np.testing.assert_allclose(ax.images[0].get_array(), theta / np.outer(d, d), rtol=1e-12)
  block = N_TR + N_TE
  assert [(r.get_xy(), r.get_width()) for r in ax.patches] == [
    ((t * block - 0.5, t * block - 0.5), block) for t in range(T)
  ]
  assert "task_end_1" in ax.get_title()

  # rho bar: one value per measurement, as in ntk.jsonl
  records = [json.loads(line) for line in (out / "ntk.jsonl").read_text().splitlines()]
  lines = figures["rho_bar.png"].axes[0].lines
  np.testing.assert_allclose(lines[0].get_xdata(), [r["task"] for r in records])
  np.testing.assert_allclose(lines[0].get_ydata(), [r["mean_inter_ratio_all"] for r in records])
  seen = [np.nan if r["mean_inter_ratio"] is None else r["mean_inter_ratio"] for r in records]
  np.testing.assert_allclose(lines[1].get_ydata(), seen)  # NaN (null) until two tasks are seen

  # forgetting scatter: (predicted, measured) per task from the summary
  forgetting = json.loads((tmp_path / "summary.json").read_text())["ntk"]["forgetting"]
  offsets = figures["forgetting_scatter.png"].axes[0].collections[0].get_offsets()
  np.testing.assert_allclose(
    offsets, np.column_stack([forgetting["predicted"], forgetting["measured"]])
  )

  # lambda sweep: one line per gap term over the swept values
  sweep = json.loads((tmp_path / "summary.json").read_text())["ntk"]["lambda_sweep"]
  sweep_lines = figures["gaps_lambda.png"].axes[0].lines
  assert len(sweep_lines) == 5
  np.testing.assert_allclose(sweep_lines[0].get_xdata(), [e["value"] for e in sweep])
