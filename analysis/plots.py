"""Figures of the NTK diagnostics, from files only (SPEC 7.8) [PROJ].

Reads `ntk_<point>.npz`, `ntk.jsonl` and (when present) the `ntk` section of `summary.json`, and
writes PNGs next to the npz files. Every figure shows this project's formulations (SPEC 7: block
ratio ρ, kernel-regime predictor, gap terms), not the paper's theorems, which are unknown ([UNK]);
the titles say "[PROJ]".

  kernel_<point>.png        cosine-normalised Θ̃ over all probe rows, task blocks outlined
  rho_bar.png               ρ̄ (mean inter/intra block ratio) at each measurement
  forgetting_scatter.png    kernel-predicted vs measured forgetting per task (needs summary)
  gaps_sample_size.png      gap terms vs train probes per task (needs summary)
  gaps_lambda.png           gap terms vs relative ridge λ_rel (needs summary)

Usage: `python -m analysis.plots WORKDIR` or `write_all(WORKDIR)`. matplotlib is imported inside
the functions (Agg backend), never at import of this module.
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from ntkcl_jax.report import pyplot, save_figure

__all__ = ["find_analysis_dir", "write_all"]

PROJ = "[PROJ] project formulation, not the paper's theorem"


def find_analysis_dir(workdir: str | pathlib.Path) -> pathlib.Path:
  """`workdir/analysis` of a training run, or `workdir` itself if it holds the ntk files."""
  workdir = pathlib.Path(workdir)
  for cand in (workdir / "analysis", workdir):
    if (cand / "ntk.jsonl").exists() or any(cand.glob("ntk_*.npz")):
      return cand
  raise FileNotFoundError(
    f"No ntk.jsonl or ntk_*.npz under {workdir} or {workdir / 'analysis'}; run with "
    "--config.analysis.enabled=True or analysis.hook.measure_checkpoint first."
  )


def _arr(x) -> np.ndarray:
  """JSON lists with null (NaN) entries -> float arrays."""
  if x is None:
    return np.array(np.nan)
  if isinstance(x, (list, tuple)):
    return np.array([_arr(v) for v in x], dtype=np.float64)
  return np.array(x, dtype=np.float64)


def _read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
  if not path.exists():
    return []
  last = {}
  for line in path.read_text().splitlines():
    if line.strip():
      rec = json.loads(line)
      last[rec["point"]] = rec
  return sorted(last.values(), key=lambda r: (r.get("task", 0), r["point"]))


def _read_summary(out_dir: pathlib.Path) -> Mapping[str, Any] | None:
  for path in (out_dir / "summary.json", out_dir.parent / "summary.json"):
    if path.exists():
      return json.loads(path.read_text()).get("ntk")
  return None


def plot_kernel(npz_path: pathlib.Path, out_path: pathlib.Path) -> pathlib.Path:
  """Θ̃(x, x') = Θ / sqrt(Θ(x, x) Θ(x', x')) with each task's block (train + test rows) outlined."""
  plt = pyplot()
  with np.load(npz_path, allow_pickle=False) as z:
    theta, tasks, point = z["theta"], z["task_of_row"], str(z["point"])
  d = np.sqrt(np.clip(np.diag(theta), 1e-300, None))
  cos = theta / d[:, None] / d[None, :]
  fig, ax = plt.subplots(figsize=(5.2, 4.6))
  im = ax.imshow(cos, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
  for t in np.unique(tasks):
    rows = np.flatnonzero(tasks == t)
    lo, size = rows[0] - 0.5, rows.size
    ax.add_patch(plt.Rectangle((lo, lo), size, size, fill=False, ec="k", lw=1.2))
  ax.set_title(f"Θ̃ at {point} (rows: task-major, train then test)\n{PROJ}", fontsize=8)
  ax.set_xlabel("probe row")
  ax.set_ylabel("probe row")
  fig.colorbar(im, ax=ax, fraction=0.046)
  save_figure(fig, out_path)
  return out_path


def plot_rho_bar(records: list[dict[str, Any]], out_path: pathlib.Path) -> pathlib.Path:
  """ρ̄ over all tasks and over the tasks seen so far, at each measurement."""
  plt = pyplot()
  x = [r.get("task", -1) for r in records]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(x, [_arr(r.get("mean_inter_ratio_all")) for r in records], "k-o", label="ρ̄, all tasks")
  ax.plot(x, [_arr(r.get("mean_inter_ratio")) for r in records], "C1--s", label="ρ̄(t), seen tasks")
  ax.set_xticks(x, ["init" if t < 0 else str(t) for t in x])
  ax.set_xlabel("measurement (after task)")
  ax.set_ylabel("mean inter/intra block ratio ρ̄")
  ax.set_ylim(0, 1.05)
  ax.set_title(f"Inter- vs intra-task kernel mass\n{PROJ}", fontsize=8)
  ax.legend(fontsize=7)
  save_figure(fig, out_path)
  return out_path


def plot_forgetting(ntk: Mapping[str, Any], out_path: pathlib.Path) -> pathlib.Path | None:
  """Predicted drift forgetting F̂ (x) vs measured accuracy drop (y), one point per task."""
  f = ntk.get("forgetting") or {}
  if "measured" not in f or not f.get("predicted"):
    return None
  plt = pyplot()
  pred, meas = _arr(f["predicted"]), _arr(f["measured"])
  fig, ax = plt.subplots(figsize=(4.6, 3.8))
  ax.scatter(pred, meas, c="C0")
  for s, (a, b) in enumerate(zip(pred, meas)):
    ax.annotate(f"task {s}", (a, b), fontsize=7, xytext=(3, 3), textcoords="offset points")
  corr = f.get("correlation_final") or {}
  ax.set_xlabel("predicted forgetting F̂ (kernel-regime drift)")
  ax.set_ylabel("measured forgetting (pp)")
  r, rho = _arr(corr.get("pearson")), _arr(corr.get("spearman"))
  ax.set_title(f"Pearson {float(r):.2f}, Spearman {float(rho):.2f}\n{PROJ}", fontsize=8)
  save_figure(fig, out_path)
  return out_path


_GAP_KEYS = (
  ("interplay_last", "I (task-interplay)"),
  ("interplay_bound_last", "Ī (bound)"),
  ("task_specific", "G (task-specific)"),
  ("fit_residual", "E (fit residual)"),
  ("empirical_gap", "e (test - train MSE)"),
)


def plot_sweep(entries, xlabel: str, out_path: pathlib.Path, *, logx: bool) -> pathlib.Path | None:
  """Task-averaged gap terms of a stored sweep vs the swept value."""
  if not entries:
    return None
  plt = pyplot()
  x = _arr([e["value"] for e in entries])
  fig, ax = plt.subplots(figsize=(5, 3.6))
  for i, (key, label) in enumerate(_GAP_KEYS):
    ys = []
    for e in entries:
      v = _arr(e.get(key, []))
      ys.append(np.nanmean(v) if v.size and np.any(np.isfinite(v)) else np.nan)
    ax.plot(x, ys, marker="os^vd"[i], label=label)
  if logx:
    ax.set_xscale("log")
  ax.set_yscale("symlog", linthresh=1e-3)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("mean over tasks")
  ax.set_title(f"Gap terms vs {xlabel}\n{PROJ}", fontsize=8)
  ax.legend(fontsize=6)
  save_figure(fig, out_path)
  return out_path


def write_all(
  workdir: str | pathlib.Path, ntk_summary: Mapping[str, Any] | None = None
) -> list[pathlib.Path]:
  """Writes every figure the files allow; returns their paths.

  Args:
    workdir: a run directory (reads `workdir/analysis`) or a directory holding the ntk files.
    ntk_summary: the `ntk` section (e.g. `analysis.summary.analyze(...)` of a standalone run);
      default: read from `summary.json` next to the files or in their parent.
  """
  out_dir = find_analysis_dir(workdir)
  paths = [
    plot_kernel(p, out_dir / f"kernel_{p.stem[len('ntk_') :]}.png")
    for p in sorted(out_dir.glob("ntk_*.npz"))
  ]
  records = _read_jsonl(out_dir / "ntk.jsonl")
  if records:
    paths.append(plot_rho_bar(records, out_dir / "rho_bar.png"))
  ntk = ntk_summary if ntk_summary is not None else _read_summary(out_dir)
  if ntk:
    ntk = json.loads(json.dumps(ntk, default=lambda o: np.asarray(o).tolist()))
    paths.append(plot_forgetting(ntk, out_dir / "forgetting_scatter.png"))
    paths.append(
      plot_sweep(
        ntk.get("sample_size_sweep"),
        "train probes per task",
        out_dir / "gaps_sample_size.png",
        logx=False,
      )
    )
    paths.append(
      plot_sweep(ntk.get("lambda_sweep"), "λ_rel", out_dir / "gaps_lambda.png", logx=True)
    )
  return [p for p in paths if p is not None]


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: python -m analysis.plots WORKDIR")
  for path in write_all(sys.argv[1]):
    print(path)
