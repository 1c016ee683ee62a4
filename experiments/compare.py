"""Runs configs x seeds in the same harness and tabulates mean ± std (ddof 0) of Ā and A_T.

Command (the README's demo table):
  python experiments/compare.py --config experiments/configs/demo.py --seeds 0,1,2 \
    --out workdirs/compare_demo
Each variant's seeds train together as one stacked run (`--config.seeds=0,1,2`, one jitted step
vmapped over the seeds) in `<out>/<variant>`, which writes `seed_<s>/summary.json` per seed; the
closed-form ridge variants (RanPAC, `eval.head=ridge`), which do not stack, and every variant
under `--per-seed` run one `python -m ntkcl_jax.main` per seed in `<out>/<variant>/seed<k>`. A
finished run is reused, an interrupted one resumes. Then `<out>/results.md`, `<out>/results.csv`
and `<out>/results.png`.
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
    help="extra --config.x=y flags, space separated (NTK diagnostics off by default)",
  )
  parser.add_argument(
    "--per-seed",
    action="store_true",
    help="one process per seed instead of one stacked run per variant",
  )
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  variants = args.variants.split(",")
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    parser.error(f"unknown variants {unknown}; valid: {sorted(VARIANTS)}")
  rows = []
  for variant in variants:
    runs = variant_runs(args.config, variant, seeds, args.out, args.extra.split(), args.per_seed)
    rows.append(report.seed_row(variant, runs))
  print(report.write_seed_results(args.out, seeds, rows), end="")

  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(rows)), 3.5))
  x = np.arange(len(rows))
  ax.bar(x - 0.2, [r[1] for r in rows], 0.4, yerr=[r[2] for r in rows], label="Ā")
  ax.bar(x + 0.2, [r[3] for r in rows], 0.4, yerr=[r[4] for r in rows], label="A_T")
  ax.set_xticks(x, [r[0] for r in rows], rotation=30, ha="right", fontsize=8)
  ax.set_ylabel("accuracy (%)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(args.out / "results.png", dpi=100)


if __name__ == "__main__":
  main()
