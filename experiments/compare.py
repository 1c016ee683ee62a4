"""Runs configs x seeds in the same harness and tabulates mean ± std (ddof 0) of Ā and A_T.

Command (the README's demo table):
  python experiments/compare.py --config experiments/configs/demo.py --seeds 0,1,2 \
    --out workdirs/compare_demo
Each variant's seeds train together as one stacked run (`--config.seeds=0,1,2`, one jitted step
vmapped over the seeds) in `<out>/<variant>`, which writes `seed_<s>/summary.json` per seed; the
closed-form ridge variants (RanPAC, `eval.head=ridge`), which do not stack, and every variant
under `--per-seed` run one `python -m ntkcl_jax.main` per seed in `<out>/<variant>/seed<k>`. A
finished run is reused, an interrupted one resumes. Then `<out>/results.md`, `<out>/results.csv`,
`<out>/per_seed.json` and `<out>/results.png`; `results.md` adds the NTK diagnostics of runs that
measured them (`--extra=--config.analysis.seeds=all` keeps the demo's diagnostics on for every
seed; `<out>/kernel_vs_accuracy.png`) and, with `--baseline V`, each variant's paired difference
to V over the same seeds (mean and 95 % t interval).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from ntkcl_jax import report

# name -> config overrides (each a `--config.key=value`); baselines and ablations are switches.
VARIANTS = {
  "ntkcl_reference": [],
  "ntkcl_corrected": ["--config.mode=corrected"],
  "simplecil": ["--config.method=simplecil"],
  "seq_finetune": ["--config.method=seq_finetune"],
  "joint": ["--config.method=joint"],
  "no_ema": ["--config.train.use_ema=False"],
  "no_orth": ["--config.loss.lambda_orth=0.0"],
  "no_mi": ["--config.loss.lambda_mi=0.0"],
  "no_reg": ["--config.loss.lambda_reg=0.0"],
  "channel_only": ["--config.model.name=channel"],
  "patch_only": ["--config.model.name=patch"],
  "bfloat16": ["--config.model.dtype=bfloat16"],  # reference mode, bf16 compute
  # -- strong frozen-backbone baselines and NTK-CL variants (ntkcl_jax/methods/analytic.py)
  "ranpac": ["--config.method=ranpac"],  # first-session adaptation (task 0), RP + ridge
  "ranpac_no_fsa": ["--config.method=ranpac", "--config.train.adapt_tasks=0"],
  "aper": ["--config.method=aper"],  # first-session adapters, [frozen; adapted] prototypes
  "ntkcl_corrected_no_dc": ["--config.mode=corrected", "--config.quirks.prototype_refresh=never"],
  "ntkcl_corrected_ridge": ["--config.mode=corrected", "--config.eval.head=ridge"],
  "ntkcl_fs_ridge": [
    "--config.mode=corrected",
    "--config.train.adapt_tasks=1",
    "--config.eval.head=ridge",
  ],
  "ntkcl_fs_ridge_ptm": [
    "--config.mode=corrected",
    "--config.train.adapt_tasks=1",
    "--config.eval.head=ridge",
    "--config.model.use_init_ptm=True",
  ],
  # NTK-guided: every update projected off old tasks' tangent features (methods/ogd.py); the EMA
  # bank stays fixed. `ntkcl_corrected_no_ema` is its projection-free twin.
  "ntkcl_ogd": [
    "--config.mode=corrected",
    "--config.method=ntkcl_ogd",
    "--config.train.use_ema=False",
  ],
  "ntkcl_corrected_no_ema": ["--config.mode=corrected", "--config.train.use_ema=False"],
  # the head of `ntkcl_best`, trained on every task: projected, and its projection-free twin
  "ntkcl_ogd_ridge": [
    "--config.mode=corrected",
    "--config.method=ntkcl_ogd",
    "--config.train.use_ema=False",
    "--config.eval.head=ridge",
    "--config.model.use_init_ptm=True",
    "--config.ridge.features=cpm",
    "--config.ridge.projection_dim=2048",
  ],
  # the same with the ridge head on m (the feature the basis protects exactly: every output of
  # 32 images per task, up to 4,096 basis columns)
  "ntkcl_ogd_ridge_m": [
    "--config.mode=corrected",
    "--config.method=ntkcl_ogd",
    "--config.train.use_ema=False",
    "--config.eval.head=ridge",
    "--config.model.use_init_ptm=True",
    "--config.ridge.features=m",
    "--config.ridge.projection_dim=2048",
    "--config.ogd.directions=0",
    "--config.ogd.samples=32",
    "--config.ogd.max_rank=4096",
  ],
  "ntkcl_full_ridge_no_ema": [
    "--config.mode=corrected",
    "--config.train.use_ema=False",
    "--config.eval.head=ridge",
    "--config.model.use_init_ptm=True",
    "--config.ridge.features=cpm",
    "--config.ridge.projection_dim=2048",
  ],
  # The recommended configuration (README "Beyond the released method"): corrected quirks, NTK-CL
  # trained on the first task only, PTM section, ridge head on the tripled features [c; p; m]
  # through a 2048-wide random ReLU projection.
  "ntkcl_best": [
    "--config.mode=corrected",
    "--config.train.adapt_tasks=1",
    "--config.eval.head=ridge",
    "--config.model.use_init_ptm=True",
    "--config.ridge.features=cpm",
    "--config.ridge.projection_dim=2048",  # M ≥ 3.5x the 576-wide input (RanPAC: 1024 = 16 x 64)
  ],
}


def stacks(variant: str) -> bool:
  """Whether a variant's seeds can train as one stacked run (`config.seeds`)."""
  return not any(
    f in VARIANTS[variant] for f in ("--config.method=ranpac", "--config.eval.head=ridge")
  )


def run_main(config: str, workdir: pathlib.Path, flags: list[str]) -> None:
  cmd = [sys.executable, "-m", "ntkcl_jax.main", f"--config={config}", f"--workdir={workdir}"]
  cmd += flags
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True)


def variant_runs(
  config: str, variant: str, seeds: list[int], out: pathlib.Path, extra: list[str], per_seed: bool
) -> list[dict]:
  """The per-seed summaries of a variant: one stacked run, or one run per seed."""
  if per_seed or not stacks(variant):
    summaries = []
    for seed in seeds:
      workdir = out / variant / f"seed{seed}"
      if not (workdir / "summary.json").exists():
        run_main(config, workdir, [f"--config.seed={seed}", *VARIANTS[variant], *extra])
      summaries.append(json.loads((workdir / "summary.json").read_text()))
    return summaries
  workdir = out / variant
  paths = [workdir / f"seed_{seed}" / "summary.json" for seed in seeds]
  if not all(p.exists() for p in paths):
    seed_list = ",".join(map(str, seeds))
    run_main(config, workdir, [f"--config.seeds={seed_list}", *VARIANTS[variant], *extra])
  return [json.loads(p.read_text()) for p in paths]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--out", required=True, type=pathlib.Path)
  parser.add_argument(
    "--extra",
    default="--config.analysis.enabled=False",
    help="extra --config.x=y flags, space separated, given as --extra=... (NTK diagnostics off by default)",
  )
  parser.add_argument(
    "--per-seed",
    action="store_true",
    help="one process per seed instead of one stacked run per variant",
  )
  parser.add_argument(
    "--baseline",
    default="",
    help="variant the others are compared with, seed by seed (mean difference, 95%% t interval)",
  )
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  variants = args.variants.split(",")
  unknown = sorted(set(variants + ([args.baseline] if args.baseline else [])) - set(VARIANTS))
  if unknown:
    parser.error(f"unknown variants {unknown}; valid: {sorted(VARIANTS)}")
  if args.baseline and args.baseline not in variants:
    variants.append(args.baseline)
  runs = {
    v: variant_runs(args.config, v, seeds, args.out, args.extra.split(), args.per_seed)
    for v in variants
  }
  rows = [report.seed_row(v, runs[v]) for v in variants]
  text = report.write_seed_results(args.out, seeds, rows)
  per_seed = {v: per_seed_values(runs[v], seeds) for v in variants}
  (args.out / "per_seed.json").write_text(json.dumps(per_seed, indent=1) + "\n")
  text += diagnostics_table(per_seed, args.baseline)
  (args.out / "results.md").write_text(text)
  print(text, end="")
  plot_accuracy(rows, args.out / "results.png")
  if any("rho_bar" in v for rec in per_seed.values() for v in rec.values()):
    plot_kernel_vs_accuracy(per_seed, args.out / "kernel_vs_accuracy.png")


METRICS = ("avg_acc", "last_acc", "forgetting")


def per_seed_values(summaries: list[dict], seeds: list[int]) -> dict[str, dict[str, float]]:
  """{seed: {Ā, A_T, forgetting, and the NTK scalars when measured (`report.ntk_scalars`)}}."""
  return {
    str(seed): {**{k: float(s[k]) for k in METRICS}, **report.ntk_scalars(s)}
    for seed, s in zip(seeds, summaries)
  }


def _mean(per_seed: dict[str, dict[str, float]], key: str) -> str:
  values = [v.get(key, np.nan) for v in per_seed.values()]
  if not np.isfinite(values).any():
    return "–"
  return f"{np.nanmean(values):.2f} ± {np.nanstd(values):.2f}"


def diagnostics_table(per_seed: dict[str, dict], baseline: str) -> str:
  """Markdown: the paired A_T (and Ā) difference to `baseline` and the NTK scalars per variant."""
  lines = []
  measured = {v: rec for v, rec in per_seed.items() if any("rho_bar" in x for x in rec.values())}
  if measured:
    head = "| variant | ρ̄ (last task) | retention of task 0 | output drift of task 0 | r(F̂, F) |"
    lines += ["", "NTK diagnostics at the last task end, mean ± std over seeds:", "", head]
    lines.append("|---|---|---|---|---|")
    for v, rec in measured.items():
      cells = [_mean(rec, k) for k in ("rho_bar", "retention_0", "drift_0", "predictor_r")]
      lines.append(f"| {v} | " + " | ".join(cells) + " |")
  if baseline:
    lines += ["", f"Paired over the same seeds, variant − {baseline} (mean, 95 % t interval):", ""]
    lines += ["| variant | ΔĀ | ΔA_T | Δforgetting |", "|---|---|---|---|"]
    base = per_seed[baseline]
    for v, rec in per_seed.items():
      if v == baseline:
        continue
      cells = []
      for k in METRICS:
        d = report.paired_difference([rec[s][k] for s in base], [base[s][k] for s in base])
        cells.append(f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]")
      lines.append(f"| {v} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot_accuracy(rows: list[tuple], path: pathlib.Path) -> None:
  plt = report.pyplot()
  fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(rows)), 3.5))
  x = np.arange(len(rows))
  ax.bar(x - 0.2, [r[1] for r in rows], 0.4, yerr=[r[2] for r in rows], label="Ā")
  ax.bar(x + 0.2, [r[3] for r in rows], 0.4, yerr=[r[4] for r in rows], label="A_T")
  ax.set_xticks(x, [r[0] for r in rows], rotation=30, ha="right", fontsize=8)
  ax.set_ylabel("accuracy (%)")
  ax.legend()
  report.save_figure(fig, path)


def plot_kernel_vs_accuracy(per_seed: dict[str, dict], path: pathlib.Path) -> None:
  """ρ̄, task-0 kernel retention and task-0 output drift at the last task end against A_T: one
  point per variant and seed."""
  plt = report.pyplot()
  keys = {
    "rho_bar": "ρ̄ over seen tasks, last task end",
    "retention_0": "retention of task 0's intra-task kernel",
    "drift_0": "output drift of task 0 since its end",
  }
  fig, axes = plt.subplots(1, len(keys), figsize=(13, 3.6), sharey=True)
  for variant, rec in per_seed.items():
    values = [v for v in rec.values() if "rho_bar" in v]
    if not values:
      continue
    acc = [v["last_acc"] for v in values]
    for ax, key in zip(axes, keys):
      ax.scatter([v[key] for v in values], acc, label=variant, s=18)
  for ax, label in zip(axes, keys.values()):
    ax.set_xlabel(label)
  axes[0].set_ylabel("A_T (%)")
  axes[-1].legend(fontsize=7)
  report.save_figure(fig, path)


if __name__ == "__main__":
  main()
