"""Times the empirical-NTK backends on NTK-CL (SPEC 7.2) and the analysis overhead of a run.

Kernel timing: Θ over N probe images of f(θ_A, x) = S·m (gaussian projection, k outputs) w.r.t.
θ_A = peft/current, eval mode, `trace_axes=(-1,)`, `vmap_axes=0`, exactly as `analysis.hook`
measures it, for every backend × implementation (native 1, 2, 0=AUTO; neural_tangents 1, 2, 3).
Two models: the demo's tiny geometry (28 px, patch 4, width 64, depth 4) and ViT-B/16-sized PEFT
parameters (224 px, width 768, depth 12; random backbone; heavy on a CPU, `--skip-vitb`). The first
call (compilation + one run) is reported apart; then the median of `--repeats` calls.

  python -m experiments.benchmarks ntk --skip-vitb                 # tiny model only
  python -m experiments.benchmarks ntk --n-vitb 4 --impls native:1  # ViT-B, one implementation
  python -m experiments.benchmarks ntk --demo-workdir workdirs/demo # analysis overhead of a demo run
  python -m experiments.benchmarks ntk --sweep-n 8,16,32,64          # cost vs probe size N, exponents
  ... --json                                                   # one JSON object on the last line

The sweep mode times one implementation (`--sweep-impl`, default native:1) on the tiny model for
each N in a fresh subprocess and reports the median time and the memory the kernel adds (peak RSS
minus the RSS after building the model once, before the kernel's compilation; so it includes
compilation and the analysis imports, a fixed part that flattens the fit at small N), then the
least-squares slope of log(time) and log(memory) on log(N): the fitted exponents (Θ is (N, N), the
Jacobians (N·k, P): expect between 1 and 2).

The overhead mode reads `summary.json` of a run made with `--config.analysis.enabled=True` and
reports `ntk.overhead_s` (all time inside the hook) against `wall_time_s`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

from experiments.benchmarks import harness

ALL_IMPLS = (
  "native:1",
  "native:2",
  "native:0",
  "neural_tangents:1",
  "neural_tangents:2",
  "neural_tangents:3",
)


def _device() -> str:
  import jax

  d = jax.devices()[0]
  return f"{d.platform}:{getattr(d, 'device_kind', '')} x{jax.device_count()}"


def _model(kind: str):
  """(spec, params) of the demo-sized or ViT-B/16-sized NTK-CL, random weights."""
  import jax

  from ntkcl_jax import ModelSpec, ViTSpec, init_params

  if kind == "tiny":
    vit = ViTSpec(image_size=28, patch_size=4, width=64, depth=4, num_heads=4, mlp_dim=128)
    spec = ModelSpec(vit=vit, fixed_197_tokens=False)
  else:
    spec = ModelSpec()  # ViT-B/16 at 224 px (SPEC 1)
  params = init_params(spec, jax.random.key(0))
  # Move off the init point (up = 0 there, which zeroes half the Jacobian).
  leaves, tree = jax.tree.flatten(params["peft"]["current"])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [x + 0.01 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  params["peft"]["current"] = jax.tree.unflatten(tree, leaves)
  return spec, params


def time_kernels(kind: str, n: int, impls, repeats: int, k: int) -> list[dict]:
  """One row per backend:implementation: first-call and median seconds, or the error."""
  import jax.numpy as jnp
  import numpy as np

  from analysis import measure, nt_compat

  spec, params = _model(kind)
  theta, rest = measure.split_params(params, "peft")
  num_params = sum(int(np.prod(x.shape)) for x in __import__("jax").tree.leaves(theta))
  v = spec.vit
  images = np.random.default_rng(0).uniform(size=(n, v.image_size, v.image_size, 3))
  images = images.astype(np.float32)
  proj = jnp.asarray(measure.projection_matrix(0, k, spec.feature_dim))
  f = measure.make_output_fn(spec)
  rows, reference = [], None
  for item in impls:
    backend, impl = item.split(":")
    row = {
      "model": kind,
      "backend": backend,
      "implementation": int(impl),
      "n": n,
      "outputs": k,
      "params": num_params,
    }
    if backend == "neural_tangents" and not nt_compat.available():
      rows.append({**row, "error": "neural-tangents not installed"})
      continue
    try:
      meter = measure.KernelMeter(f, implementation=int(impl), backend=backend)
      start = time.perf_counter()
      theta_nn = meter.gram(theta, images, rest=rest, projection=proj)
      first = time.perf_counter() - start
      times = []
      for _ in range(repeats):
        start = time.perf_counter()
        meter.gram(theta, images, rest=rest, projection=proj)
        times.append(time.perf_counter() - start)
    except Exception as e:  # report and go on: one failing implementation is a result too
      rows.append({**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
      continue
    if reference is None:
      reference = theta_nn
    rel = float(np.abs(theta_nn - reference).max() / np.abs(reference).max())
    rows.append(
      {
        **row,
        "first_s": first,
        "median_s": statistics.median(times),
        "max_rel_diff_vs_first": rel,
        **kernel_checks(theta_nn),
      }
    )
  return rows


def kernel_checks(theta_nn) -> dict:
  """What Θ is, not how fast: its shape, whether it is finite and symmetric, and its eigenvalue
  range relative to the largest (a Gram matrix is PSD: the smallest is >= 0 up to rounding)."""
  import numpy as np

  t = np.asarray(theta_nn, np.float64)
  finite = bool(np.isfinite(t).all())
  out = {"theta_shape": list(t.shape), "theta_finite": finite}
  if finite and t.ndim == 2 and t.shape[0] == t.shape[1]:
    eig = np.linalg.eigvalsh((t + t.T) / 2)
    scale = max(float(np.abs(eig).max()), 1e-30)
    out["theta_asymmetry"] = float(np.abs(t - t.T).max() / scale)
    out["theta_min_eig_rel"] = float(eig.min() / scale)
  return out


def sweep_point(n: int, impl: str, repeats: int, k: int) -> dict:
  """One N of the sweep, in this (fresh) process: time_kernels' row plus the added memory."""
  import jax

  jax.block_until_ready(_model("tiny"))  # compile and run the init before the baseline
  before = harness.proc_status_bytes("VmRSS")
  (row,) = time_kernels("tiny", n, [impl], repeats, k)
  peak = harness.peak_rss_bytes()
  return {**row, "rss_before_bytes": before, "added_peak_bytes": peak - before}


def sweep_worker(cfg: dict) -> dict:
  """The harness worker of one sweep point (`SWEEP_WORKER`): `sweep_point` on `cfg`."""
  return sweep_point(cfg["n"], cfg["impl"], cfg["repeats"], cfg["k"])


SWEEP_WORKER = "experiments.benchmarks.ntk:sweep_worker"


def fit_exponent(ns, values) -> float:
  """Least-squares slope of log(values) on log(ns)."""
  import numpy as np

  return float(np.polyfit(np.log(ns), np.log(values), 1)[0])


def sweep(ns: list[int], impl: str, repeats: int, k: int, timeout: float = 3600.0) -> dict:
  """Time and added memory vs N (a subprocess each) and their fitted exponents."""
  points = []
  for n in ns:
    cfg = {"n": n, "impl": impl, "repeats": repeats, "k": k}
    point = harness.run_worker_process(SWEEP_WORKER, cfg, timeout)
    if "model" not in point:  # the process failed (a failing kernel is a row with "error")
      raise SystemExit(f"sweep point N={n} failed: {point.get('error')}")
    points.append(point)
  ok = [p for p in points if "error" not in p]
  out = {"impl": impl, "points": points}
  if len(ok) >= 2:
    n_ok = [p["n"] for p in ok]
    out["time_exponent"] = fit_exponent(n_ok, [p["median_s"] for p in ok])
    out["memory_exponent"] = fit_exponent(n_ok, [max(p["added_peak_bytes"], 1) for p in ok])
  return out


def overhead(workdir: str) -> dict:
  """Analysis overhead of a finished run: ntk.overhead_s vs wall_time_s of summary.json."""
  summary = json.loads((pathlib.Path(workdir) / "summary.json").read_text())
  ntk = summary.get("ntk")
  if not ntk:
    raise SystemExit(f"{workdir}/summary.json has no 'ntk' section; run with analysis enabled.")
  wall, over = float(summary["wall_time_s"]), float(ntk["overhead_s"])
  return {
    "workdir": str(workdir),
    "wall_time_s": wall,
    "overhead_s": over,
    "training_s": wall - over,
    "overhead_pct_of_wall": 100 * over / wall,
    "overhead_pct_of_training": 100 * over / (wall - over),
    "measure_s": ntk.get("measure_s"),
    "num_rows": ntk.get("num_rows"),
  }


def _table(rows: list[dict]) -> str:
  lines = [
    "| model | backend | impl | N | first call (s) | median (s) | max rel diff |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    if "error" in r:
      lines.append(
        f"| {r['model']} | {r['backend']} | {r['implementation']} | {r['n']} | "
        f"error: {r['error']} | | |"
      )
    else:
      lines.append(
        f"| {r['model']} | {r['backend']} | {r['implementation']} | {r['n']} | "
        f"{r['first_s']:.2f} | {r['median_s']:.3f} | {r['max_rel_diff_vs_first']:.1e} |"
      )
  return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
  """The `ntk` subcommand's options."""
  p.add_argument("--impls", default=",".join(ALL_IMPLS), help="backend:impl,... to time")
  p.add_argument("--n-tiny", type=int, default=16, help="probe images, tiny model")
  p.add_argument("--n-vitb", type=int, default=4, help="probe images, ViT-B/16 model")
  p.add_argument("--k", type=int, default=16, help="gaussian projection outputs")
  p.add_argument("--repeats", type=int, default=3, help="timed calls after the first")
  p.add_argument("--skip-tiny", action="store_true")
  p.add_argument("--skip-vitb", action="store_true")
  p.add_argument("--demo-workdir", help="report the analysis overhead of this run instead")
  p.add_argument("--sweep-n", default="", help="comma-separated probe sizes (tiny model)")
  p.add_argument("--sweep-impl", default="native:1", help="backend:impl for --sweep-n")
  p.add_argument("--json", action="store_true", help="one JSON object on the last line")


def run(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
  """Runs the `ntk` benchmark; `p.error` reports a bad option."""

  if args.sweep_n:
    result = sweep([int(x) for x in args.sweep_n.split(",")], args.sweep_impl, args.repeats, args.k)
    print(f"device {_device()}; tiny model, {args.sweep_impl}, k={args.k}")
    print(f"{'N':>5} {'first s':>8} {'median s':>9} {'added MB':>9}")
    for pt in result["points"]:
      if "error" in pt:
        print(f"{pt['n']:5d} error: {pt['error']}")
      else:
        print(
          f"{pt['n']:5d} {pt['first_s']:8.2f} {pt['median_s']:9.3f} "
          f"{pt['added_peak_bytes'] / 2**20:9.1f}"
        )
    if "time_exponent" in result:
      print(
        f"fitted exponents (log-log least squares): time ~ N^{result['time_exponent']:.2f}, "
        f"added memory ~ N^{result['memory_exponent']:.2f}"
      )
  elif args.demo_workdir:
    result = {"overhead": overhead(args.demo_workdir)}
    o = result["overhead"]
    print(
      f"analysis overhead {o['overhead_s']:.1f} s of {o['wall_time_s']:.1f} s wall "
      f"({o['overhead_pct_of_wall']:.1f}% of wall, {o['overhead_pct_of_training']:.1f}% of "
      f"training); {o['num_rows']} probe rows; per point {o['measure_s']}"
    )
  else:
    impls = [s for s in args.impls.split(",") if s]
    rows = []
    if not args.skip_tiny:
      rows += time_kernels("tiny", args.n_tiny, impls, args.repeats, args.k)
    if not args.skip_vitb:
      rows += time_kernels("vitb16", args.n_vitb, impls, args.repeats, args.k)
    print(
      f"device {_device()}; Θ of S·m (k={args.k}) w.r.t. peft/current, first call includes "
      "compilation"
    )
    print(_table(rows))
    result = {"device": _device(), "kernels": rows}
  if args.json:
    print(json.dumps(result))
  return 0
