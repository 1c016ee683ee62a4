"""Result plots and the console table of a run (reads only `summary.json`-shaped dicts)."""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np


def results_table(summary: dict[str, Any]) -> str:
  """A Markdown table of Ā, A_T, forgetting and BWT (%)."""
  rows = [
    ("Ā (avg over stages)", summary["avg_acc"]),
    ("A_T (last)", summary["last_acc"]),
    ("Forgetting", summary["forgetting"]),
    ("BWT", summary["bwt"]),
  ]
  lines = ["| metric | value (%) |", "|---|---|"]
  lines += [f"| {name} | {value:.2f} |" for name, value in rows]
  return "\n".join(lines)


def pyplot():
  """`matplotlib.pyplot` on the non-interactive Agg backend (files only, no display needed)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save_figure(fig, path: str | pathlib.Path) -> None:
  """Lays out, writes (100 dpi) and closes `fig`."""
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  pyplot().close(fig)


def write_plots(summary: dict[str, Any], out_dir: str | pathlib.Path) -> list[pathlib.Path]:
  """accuracy_matrix.png (R heatmap) and accuracy_per_task.png (A_t and each task's R[·, i])."""
  plt = pyplot()
  out_dir = pathlib.Path(out_dir)
  R = np.array([[np.nan if v is None else v for v in row] for row in summary["accuracy_matrix"]])
  T = R.shape[0]
  paths = [out_dir / "accuracy_matrix.png", out_dir / "accuracy_per_task.png"]

  fig, ax = plt.subplots(figsize=(1.2 + 0.7 * T, 1.0 + 0.6 * T))
  im = ax.imshow(R, vmin=0, vmax=100, cmap="viridis")
  for (i, j), v in np.ndenumerate(R):
    if np.isfinite(v):
      ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="w" if v < 60 else "k", fontsize=8)
  ax.set_xlabel("evaluated task i")
  ax.set_ylabel("after training task l")
  ax.set_title(f"R[l, i] (%), {summary.get('method', '')}")
  fig.colorbar(im, ax=ax)
  save_figure(fig, paths[0])

  fig, ax = plt.subplots(figsize=(5, 3.5))
  stages = np.arange(T)
  ax.plot(stages, [s["A"] for s in summary["stages"]], "k-o", lw=2, label="A_t (all seen)")
  for i in range(T):
    ax.plot(stages[i:], R[i:, i], "--", marker=".", alpha=0.7, label=f"task {i}")
  ax.set_xlabel("after training task")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.set_ylim(0, 100)
  ax.legend(fontsize=7, ncol=2)
  save_figure(fig, paths[1])
  return paths
