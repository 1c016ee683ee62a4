"""Result plots and tables of runs (reads only `summary.json`-shaped dicts)."""

from __future__ import annotations

import csv
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from ntkcl_jax.metrics import seed_mean_std


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


SEED_COLUMNS = (
  "variant",
  "avg_acc_mean",
  "avg_acc_std",
  "last_acc_mean",
  "last_acc_std",
  "forgetting_mean",
  "forgetting_std",
)


def seed_row(variant: str, summaries: Sequence[dict[str, Any]]) -> tuple:
  """(variant, Ā mean, Ā std, A_T mean, A_T std, F mean, F std) over seeds, std with ddof 0."""
  stats = [seed_mean_std([s[k] for s in summaries]) for k in ("avg_acc", "last_acc", "forgetting")]
  return (variant, *(v for mean_std in stats for v in mean_std))


def write_seed_results(
  out_dir: str | pathlib.Path, seeds: Sequence[int], rows: Sequence[tuple]
) -> str:
  """`results.csv` and `results.md` in `out_dir` from `seed_row` rows; returns the Markdown.

  The format of `experiments/compare.py` (and, later, of a stacked multi-seed run): the CSV has
  `SEED_COLUMNS` with 4 decimals, the Markdown one "mean ± std" cell per metric, 2 decimals, %.
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  with open(out_dir / "results.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(SEED_COLUMNS)
    w.writerows([(r[0], *(f"{v:.4f}" for v in r[1:])) for r in rows])
  lines = [
    f"Seeds {list(seeds)}; mean ± std (ddof 0), %.",
    "",
    "| variant | Ā | A_T | forgetting |",
    "|---|---|---|---|",
  ]
  lines += [
    f"| {r[0]} | {r[1]:.2f} ± {r[2]:.2f} | {r[3]:.2f} ± {r[4]:.2f} | {r[5]:.2f} ± {r[6]:.2f} |"
    for r in rows
  ]
  text = "\n".join(lines) + "\n"
  (out_dir / "results.md").write_text(text)
  return text


def paired_difference(
  values: Sequence[float], baseline: Sequence[float], level: float = 0.95
) -> dict[str, float]:
  """Mean of the per-seed differences `values − baseline` (same seeds, same order) and its
  two-sided Student-t interval at `level` (n − 1 degrees of freedom; NaN bounds for n < 2).

  Returns {"mean", "low", "high", "n"}; the interval excludes 0 when low > 0 or high < 0.
  """
  import scipy.stats

  d = np.asarray(values, np.float64) - np.asarray(baseline, np.float64)
  if d.ndim != 1 or d.size == 0:
    raise ValueError(f"need two equal-length, non-empty sequences; got differences {d.shape}.")
  mean, n = float(d.mean()), int(d.size)
  half = (
    float(scipy.stats.t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / np.sqrt(n))
    if n > 1
    else float("nan")
  )
  return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def ntk_scalars(summary: dict[str, Any]) -> dict[str, float]:
  """The NTK diagnostics of one run's `summary.json` (its "ntk" section) as scalars at the end:

  rho_bar: ρ̄ over the seen tasks at the last task end; retention_0: task 0's intra-task kernel
  retention at the last task end; drift_0: task 0's relative output drift since its end
  (`analysis.measure.output_drift`); predictor_r: Pearson r of the kernel-regime predictor's
  forgetting F̂ with the measured accuracy drop over all pairs t > s. NaN where not measured;
  {} without an "ntk" section.
  """
  ntk = summary.get("ntk")
  if not ntk:
    return {}

  def num(x: Any) -> float:
    return float("nan") if x is None else float(x)

  last = [n for n in ntk["points"] if n.startswith("task_end_")][-1]
  drift = ntk.get("output_drift")
  corr = ntk.get("forgetting", {}).get("correlation_pairs", {})
  return {
    "rho_bar": num(ntk["mean_inter_ratio"].get(last)),
    "retention_0": num(ntk["intra_retention"][-1][0]),
    "drift_0": num(drift[-1][0]) if drift else float("nan"),
    "predictor_r": num(corr.get("pearson")),
  }


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
