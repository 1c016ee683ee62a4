"""Stacked seeds end to end: wall time of K seeds in one run vs K runs, and their equality.

Commands (from the repository root)::

  # K seeds stacked (`--config.seeds`) vs the same K seeds one run after another, demo config
  python -m experiments.benchmarks stacked-run speed --seeds 0,1,2,3,4 --rounds 2 \\
    --extra "--config.analysis.enabled=False --config.train.epochs=1" --out /tmp/bench_stacked
  # 4 seeds on 8 simulated CPU devices (4 x 2 mesh) vs on 1 device
  python -m experiments.benchmarks stacked-run mesh --seeds 0,1,2,3 --out /tmp/bench_mesh

`speed`: each round runs the K single runs (`python -m ntkcl_jax.main --config.seed=s`, one
process each, as `experiments/compare.py --per-seed` does) and the stacked run
(`--config.seeds=...`, one process) in fresh workdirs, alternating which goes first; wall time is
the subprocess's, start-up and compilation included (what a user waits for). It then compares
each seed's accuracy matrix and metrics.jsonl lines of the two (identical when the vmapped step
computes exactly the single step). `mesh`: the stacked run on 1 device and on 8 simulated CPU
devices, then, per seed, the test logits of the final model of each (restored with
`run_state.load_run(..., seed=s)`), reported as the number of differing predictions and the
largest logit difference. `predictions --out <round dir>`: the same per-seed comparison between
a `speed` round's single runs and its stacked run. The CPU model and load average are printed; `--json` prints one JSON
object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from typing import Any

from experiments.benchmarks import harness

REPO = pathlib.Path(__file__).resolve().parents[2]

DEMO = REPO / "experiments" / "configs" / "demo.py"


def run_main(workdir: pathlib.Path, flags: list[str], config: str, devices: int = 1) -> float:
  """Runs the CLI in a fresh `workdir`; returns its wall time in seconds."""
  shutil.rmtree(workdir, ignore_errors=True)
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
  cmd = [sys.executable, "-m", "ntkcl_jax.main", f"--config={config}", f"--workdir={workdir}"]
  t0 = time.perf_counter()
  r = subprocess.run([*cmd, *flags], cwd=REPO, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if r.returncode:
    raise SystemExit(f"{' '.join(cmd + flags)} failed:\n{r.stderr[-3000:]}")
  return wall


def _lines(path: pathlib.Path) -> list[dict[str, Any]]:
  records = [json.loads(x) for x in path.read_text().splitlines()]
  return [{k: v for k, v in r.items() if "time" not in k} for r in records]


def compare_outputs(single: dict[int, pathlib.Path], stacked: pathlib.Path) -> dict[str, Any]:
  """Per seed: identical accuracy matrix? identical metrics lines (losses included)?"""
  out = {}
  for seed, workdir in single.items():
    a = json.loads((workdir / "summary.json").read_text())
    b = json.loads((stacked / f"seed_{seed}" / "summary.json").read_text())
    la, lb = _lines(workdir / "metrics.jsonl"), _lines(stacked / f"seed_{seed}" / "metrics.jsonl")
    out[str(seed)] = {
      "accuracy_matrix_identical": a["accuracy_matrix"] == b["accuracy_matrix"],
      "metrics_lines_identical": la == lb,
      "last_acc": [a["last_acc"], b["last_acc"]],
    }
  return out


def speed(args: argparse.Namespace) -> dict[str, Any]:
  seeds = [int(s) for s in args.seeds.split(",")]
  extra = args.extra.split()
  rounds = []
  for r in range(args.rounds):
    base = args.out / f"round{r}"
    order = ["sequential", "stacked"] if r % 2 == 0 else ["stacked", "sequential"]
    walls: dict[str, float] = {}
    for kind in order:
      if kind == "sequential":
        walls[kind] = sum(
          run_main(base / f"seed{s}", [f"--config.seed={s}", *extra], args.config) for s in seeds
        )
      else:
        walls[kind] = run_main(
          base / "stacked", [f"--config.seeds={args.seeds}", *extra], args.config
        )
      print(f"round {r}: {kind} {walls[kind]:.1f} s", flush=True)
    equal = compare_outputs({s: base / f"seed{s}" for s in seeds}, base / "stacked")
    rounds.append(
      {"order": order, **walls, "ratio": walls["stacked"] / walls["sequential"], "equal": equal}
    )
    print(
      f"round {r}: stacked / sequential = {rounds[-1]['ratio']:.3f}; per seed {equal}", flush=True
    )
  return {"seeds": seeds, "extra": extra, "rounds": rounds}


def _test_logits(config, workdir: pathlib.Path, seed: int | None):
  """(logits (n, C), labels) of the final model of `seed` on the test sets of every task."""
  import jax
  import numpy as np

  from ntkcl_jax import NTKCL, load_run, methods, section_weighted_logits
  from ntkcl_jax import plan as plan_lib

  rs = load_run(config, workdir, seed=seed)
  plan = plan_lib.resolve(rs.config)
  features = methods.method_class(plan.method)(plan).feature_fn(NTKCL(rs.spec))
  protos = np.asarray(rs.prototypes)

  @jax.jit
  def logits(images):
    return section_weighted_logits(features(rs.params, images), protos, plan.section_weights)

  outs, labels = [], []
  for batch in rs.stream.eval_batches(rs.stream.test_indices(rs.num_tasks - 1), 256, "test"):
    mask = np.asarray(batch["mask"], bool)
    outs.append(np.asarray(logits(batch["image"]))[mask])
    labels.append(np.asarray(batch["label"])[mask])
  return np.concatenate(outs), np.concatenate(labels)


def mesh(args: argparse.Namespace) -> dict[str, Any]:
  import numpy as np

  seeds = [int(s) for s in args.seeds.split(",")]
  flags = [f"--config.seeds={args.seeds}", *args.extra.split()]
  walls = {}
  for devices in (1, 8):
    walls[devices] = run_main(args.out / f"devices{devices}", flags, args.config, devices)
    print(f"{devices} device(s): {walls[devices]:.1f} s", flush=True)
  config = _load_config(args.config, flags)
  per_seed = {}
  for seed in seeds:
    (l1, y1), (l8, y8) = (_test_logits(config, args.out / f"devices{d}", seed) for d in (1, 8))
    np.testing.assert_array_equal(y1, y8)
    per_seed[str(seed)] = {
      "predictions": int(len(y1)),
      "differing_predictions": int((l1.argmax(-1) != l8.argmax(-1)).sum()),
      "max_abs_logit_diff": float(np.abs(l1 - l8).max()),
      "accuracy_matrix_identical": json.loads(
        (args.out / "devices1" / f"seed_{seed}" / "summary.json").read_text()
      )["accuracy_matrix"]
      == json.loads((args.out / "devices8" / f"seed_{seed}" / "summary.json").read_text())[
        "accuracy_matrix"
      ],
    }
    print(f"seed {seed}: {per_seed[str(seed)]}", flush=True)
  mesh_shape = json.loads((args.out / "devices8" / "summary.json").read_text())["mesh"]
  return {"seeds": seeds, "mesh_8_devices": mesh_shape, "walls": walls, "per_seed": per_seed}


def predictions(args: argparse.Namespace) -> dict[str, Any]:
  """Per seed: test predictions of a `speed` round's single run vs the stacked run's seed."""
  import numpy as np

  seeds = [int(s) for s in args.seeds.split(",")]
  extra = args.extra.split()
  stacked = _load_config(args.config, [f"--config.seeds={args.seeds}", *extra])
  per_seed = {}
  for seed in seeds:
    single = _load_config(args.config, [f"--config.seed={seed}", *extra])
    la, ya = _test_logits(single, args.out / f"seed{seed}", None)
    lb, yb = _test_logits(stacked, args.out / "stacked", seed)
    np.testing.assert_array_equal(ya, yb)
    per_seed[str(seed)] = {
      "predictions": int(len(ya)),
      "differing_predictions": int((la.argmax(-1) != lb.argmax(-1)).sum()),
      "max_abs_logit_diff": float(np.abs(la - lb).max()),
    }
    print(f"seed {seed}: {per_seed[str(seed)]}", flush=True)
  return {"seeds": seeds, "per_seed": per_seed}


def _load_config(path: str, flags: list[str]):
  """The config file with `--config.key=value` flags applied (as `ntkcl_jax.main` parses them)."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for flag in flags:
    key, _, value = flag[len("--config.") :].partition("=")
    section, _, name = key.rpartition(".")
    target = config[section] if section else config
    old = target[name]
    target[name] = type(old)(value == "True" if isinstance(old, bool) else value)
  return config


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The `stacked-run` subcommand's options."""
  parser.add_argument("what", choices=("speed", "mesh", "predictions"))
  parser.add_argument("--config", default=str(DEMO))
  parser.add_argument("--seeds", default="0,1,2,3,4")
  parser.add_argument("--extra", default="--config.analysis.enabled=False")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--out", type=pathlib.Path, required=True)
  parser.add_argument("--json", action="store_true")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
  """Runs the `stacked-run` benchmark; `parser.error` reports a bad option."""
  print(f"CPU: {harness.cpu_name('unknown')}; load average {os.getloadavg()}", flush=True)
  result = {"speed": speed, "mesh": mesh, "predictions": predictions}[args.what](args)
  result["cpu"] = harness.cpu_name("unknown")
  result["load_average_end"] = os.getloadavg()
  if args.json:
    print(json.dumps(result))
  return 0
