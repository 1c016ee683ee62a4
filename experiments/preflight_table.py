"""Preflight of the ViT-B/16 benchmark configs for the hardware users book: JSON and one table.

Command (the README's table; hours of compiling on a small CPU host, resumable):
  python experiments/preflight_table.py group                 # which configs compile alike
  python experiments/preflight_table.py compile --targets v5litepod-8,v4-8,v5p-8
  /path/to/cuda-venv/bin/python experiments/preflight_table.py compile --targets h100x1,h100x8
  python experiments/preflight_table.py table                 # experiments/results/preflight/table.md

`group` lowers (without compiling) every config's train step, feature pass and predict step for
this machine's CPU devices and groups the configs whose StableHLO texts are identical (identical
programs for any target, since the target changes only the devices): one row per group.
`compile` runs `python -m ntkcl_jax.preflight` once per (group, target, seeds), seeds being one
seed (the plain, unstacked run) or 5 stacked (`--config.seeds=0,1,2,3,4`), writing
`<out>/<config>_<target>_<K>seeds.json`; an existing file is kept (rerun to resume). `--functions train_step` compiles only the step.
`table` renders every JSON present. All figures are deviceless compile estimates, not
measurements; images/s is a roofline upper bound.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = (
  "cifar100",
  "imagenet_r",
  "imagenet_a",
  "domainnet",
  "vtab",
  "oxford_pets",
  "eurosat",
  "plantvillage",
  "kvasir",
)
TARGETS = ("v5litepod-8", "v4-8", "v5p-8", "h100x1", "h100x8", "a100x1", "t4x1")
# 1: the plain run (no --config.seeds: the unstacked step); 5: five seeds stacked in one step
SEEDS = {1: None, 5: "0,1,2,3,4"}
OUT = ROOT / "experiments" / "results" / "preflight"
GiB = 2**30


def config_path(name: str) -> str:
  return str(ROOT / "experiments" / "configs" / f"{name}.py")


def program_signature(name: str) -> str:
  """sha256 of the StableHLO of the config's train step, feature pass and predict step (lowered
  for this machine's CPU devices, abstract inputs: nothing read, nothing compiled)."""
  import importlib

  from ntkcl_jax import preflight as pf

  config = importlib.import_module(f"experiments.configs.{name}").get_config()
  plan, method, stack, programs = pf.build(config, pf.resolve_target("cpu").devices)
  args = pf.abstract_args(plan, method, stack, programs)
  digest = hashlib.sha256()
  for fn_name, fn_args in sorted(args.items()):  # `Programs` attributes of the same names
    digest.update(getattr(programs, fn_name).lower(*fn_args).as_text().encode())
  return digest.hexdigest()


def group(out: pathlib.Path, configs: list[str]) -> dict[str, list[str]]:
  """{representative config: configs with the identical program}; writes `<out>/groups.json`."""
  by_sig: dict[str, list[str]] = {}
  for name in configs:
    t0 = time.perf_counter()
    sig = program_signature(name)
    by_sig.setdefault(sig, []).append(name)
    print(f"{name}: {sig[:12]} (lowered in {time.perf_counter() - t0:.0f} s)", flush=True)
  groups = {names[0]: names for names in by_sig.values()}
  (out / "groups.json").write_text(json.dumps(groups, indent=1) + "\n")
  return groups


def compile_cells(
  out: pathlib.Path, targets: list[str], seeds: list[int], functions: str | None, only: list[str]
) -> None:
  groups = json.loads((out / "groups.json").read_text())
  for rep in groups:
    if only and rep not in only:
      continue
    for target in targets:
      for k in seeds:
        path = out / f"{rep}_{target}_{k}seeds.json"
        if path.exists():
          continue
        cmd = [sys.executable, "-m", "ntkcl_jax.preflight", "--config", config_path(rep)]
        cmd += ["--target", target, "--json", str(path)]
        cmd += [f"--config.seeds={SEEDS[k]}"] if SEEDS[k] else []
        if functions:
          cmd.append(f"--functions={functions}")
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode
        print(f"exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)


def _row(report: dict, groups: dict[str, list[str]]) -> str:
  fns = {f["function"]: f for f in report["functions"]}
  step = fns.get("train_step", {})
  mem = step.get("memory_per_device", {})
  evals = [f for n, f in fns.items() if n != "train_step" and "memory_per_device" in f]
  eval_peak = max((f["memory_per_device"]["peak_bytes"] for f in evals), default=None)
  ar = step.get("collectives", {}).get("all-reduce", {}).get("bytes")
  other = {k: v["count"] for k, v in step.get("collectives", {}).items() if k != "all-reduce"}
  roofline = step.get("roofline_bound", {})
  bound = roofline.get("images_per_s_upper_bound")
  bound_text = (
    f"{bound:,.0f} ({'compute, matmuls only' if roofline.get('compute_only') else roofline.get('bound_by')})"
    if bound
    else "–"
  )
  fits = "yes" if report["fits"] else "**no**"
  name = report["_config"]
  configs = ", ".join(groups.get(name, [name]))
  cells = [
    configs,
    report["target"],
    f"{len(report['seeds'])}{' stacked' if report['stacked'] else ''}",
    str(report["mesh"]).replace("'", ""),
    f"{mem['peak_bytes'] / GiB:.2f}" if mem else "–",
    f"{eval_peak / GiB:.2f}" if eval_peak is not None else "–",
    fits,
    f"{step['flops_per_image'] / 1e9:.0f}" if step.get("flops_per_image") else "–",
    f"{ar / 2**20:.1f}" if ar is not None else "0",
    ", ".join(f"{v} {k}" for k, v in sorted(other.items())) or "none",
    bound_text,
    " / ".join(f"{f['compile_s']:.0f}" for f in report["functions"]),
  ]
  return "| " + " | ".join(cells) + " |"


def table(out: pathlib.Path) -> str:
  groups_file = out / "groups.json"
  groups = json.loads(groups_file.read_text()) if groups_file.exists() else {}
  reports = []
  for path in sorted(out.glob("*_*seeds.json")):
    report = json.loads(path.read_text())
    report["_config"] = path.name.split(f"_{report['target']}_")[0]  # <config>_<target>_<K>seeds
    reports.append(report)
  order = {t: i for i, t in enumerate(TARGETS)}
  reports.sort(key=lambda r: (r["_config"], order.get(r["target"], 99), len(r["seeds"])))
  envs = {(r["environment"]["jax"], r["environment"].get("libtpu")) for r in reports}
  lines = [
    "| configs | target | seeds | mesh | train step peak GiB/device | eval peak GiB/device | fits "
    "| train GFLOP/image | all-reduce MiB/step | other collectives | images/s bound | compile s "
    "(train / features / predict) |",
    "|" + "---|" * 12,
    *[_row(r, groups) for r in reports],
    "",
    "Deviceless compile estimates (XLA memory and cost analysis of the compiled program for the "
    "target), not measurements; images/s is a roofline upper bound from published chip peaks. "
    f"Versions (jax, libtpu): {sorted(envs, key=str)}; dates "
    f"{min(r['environment']['date_utc'] for r in reports)[:10]} to "
    f"{max(r['environment']['date_utc'] for r in reports)[:10]}; host CPU "
    f"{sorted({r['environment']['host_cpu'] for r in reports})}.",
  ]
  text = "\n".join(lines) + "\n"
  (out / "table.md").write_text(text)
  return text


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("stage", choices=("group", "compile", "table"))
  parser.add_argument("--out", type=pathlib.Path, default=OUT)
  parser.add_argument("--configs", default=",".join(CONFIGS))
  parser.add_argument("--targets", default=",".join(TARGETS))
  parser.add_argument("--seeds", default="1,5", help="comma list of stacked seed counts (1, 5)")
  parser.add_argument("--functions", default=None, help="e.g. train_step (default all)")
  parser.add_argument("--only", default="", help="compile only these group representatives")
  a = parser.parse_args()
  a.out.mkdir(parents=True, exist_ok=True)
  if a.stage == "group":
    print(json.dumps(group(a.out, a.configs.split(",")), indent=1))
  elif a.stage == "compile":
    seeds = [int(k) for k in a.seeds.split(",")]
    only = [x for x in a.only.split(",") if x]
    compile_cells(a.out, a.targets.split(","), seeds, a.functions, only)
  else:
    print(table(a.out))


if __name__ == "__main__":
  main()
