"""Throughput, FLOPs, memory and compile time of the jitted NTK-CL train and eval steps.

Commands (from the repository root)::

  python experiments/bench_step.py --size tiny                       # demo geometry, quick
  python experiments/bench_step.py --size vitb --repeats 3           # ViT-B/16 224 px, batch 16
  python experiments/bench_step.py --size all --ablate --json        # per-change table, JSON last
  python experiments/bench_step.py --size vitb --ptm off --dtype bfloat16 --repeats 2

What is measured, per configuration (size × PTM pass × dtype × optimisation switches) and phase:

* train: `jax.jit(make_train_step(...), donate_argnums=(0,))` exactly as `ntkcl_jax.train` builds
  it (SGD with momentum and weight decay on the trainable partition, the full reference-mode loss:
  three CEs, L_MI, L_orth, L_reg), at a mid-stream task (k_t = s_t = 10 for ViT-B, 2 for tiny).
* eval: `jax.jit(make_eval_fn(...))`: eval-mode features and the section-weighted prototype
  logits (top-1/top-5), C = 100 (ViT-B) or 10 (tiny) classes.

The backbone is random (geometry is what matters for cost). Compile time (`lower` + `compile`)
and the first call are reported apart; the step time is the median and min of `--repeats` further
calls, each ended by `block_until_ready`. Every (configuration, phase) runs in a fresh subprocess,
so its peak memory is its own: host peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`, which includes
compilation) on CPU, the device's `memory_stats()["peak_bytes_in_use"]` on GPU/TPU; XLA's planned
temporary buffer (`compiled.memory_analysis().temp_size_in_bytes`) is printed too. The dense
matmul rate (a jitted n×n @ n×n dot, 2n³ FLOPs, float32 and bfloat16) is measured in this process
on the same device, before and after the configurations, to turn FLOP/s into a utilisation ratio.

FLOPs per image come from XLA (`compiled.cost_analysis()["flops"]` / batch; it counts a dot as
2·M·N·K plus one per elementwise op) and from the analytic count of `analytic_flops` (matmuls
only, 2 per multiply-add; the formula is in its docstring).

Optimisation switches: `--no-share-block0` computes the embedding and block 0 in every pass,
`--no-cls-only` runs the last block on all tokens, `--remat {none,dots,full}` picks what each block
stores for the backward pass (`ModelSpec`); `--grad-frozen` also differentiates the frozen backbone
and EMA bank (what a step without the trainable/frozen split computes), `--no-donate` keeps the
state buffers undonated (train step only). `--ablate` runs, per size and PTM setting, all
optimisations on (the default) against each one changed alone (`ABLATIONS`; a train-only change
is measured on the train step only), and prints the ratio table.

Baselines for the float32 all_on rows: `--vs-torch` runs, right after each of our (PTM, phase)
workers, the same configuration of `bench_torch_reference.py` (the official NTK-CL step's
computation in PyTorch; needs `pip install torch==2.13.0`) and prints ours/PyTorch ratios of
images/s and peak RSS from the same run; rounds alternate the order. The figures quoted in the
performance issue (`REFERENCE`, measured on other 2-core CPUs) are printed too, for orientation.

  python experiments/bench_step.py --size vitb --vs-torch --rounds 2 --json   # side by side
  python experiments/bench_step.py --size vitb --vs-official /tmp/ntkcl_official --rounds 2  # the
      # official step itself (experiments/parity/bench_official.py), same run, alternating order
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from experiments import bench_util

REFERENCE = {
  # (ptm) -> official PyTorch NTK-CL, 2 CPU cores, float32, ViT-B/16, batch 16 (ranges: min, max),
  # as quoted by the performance issue (its CPUs: AVX-512/AMX; check `lscpu` for yours)
  False: {"train_img_s": (1.24, 1.33), "eval_img_s": (1.90, 2.05), "peak_rss_gb": 6.6},
  True: {"train_img_s": (1.10, 1.10), "eval_img_s": (1.61, 1.63), "peak_rss_gb": 6.8},
}

SIZES = {
  # name -> (ViTSpec kwargs, batch, num_classes C, task (k_t, s_t), fixed_197_tokens)
  "vitb": (dict(), 16, 100, (10, 10), True),
  "tiny": (
    dict(image_size=28, patch_size=4, width=64, depth=4, num_heads=4, mlp_dim=128),
    32,
    10,
    (2, 2),
    False,
  ),
}

SWITCH_DEFAULTS = {
  "share_block0": True,
  "last_block_cls_only": True,
  "remat": "dots",
  "grad_frozen": False,
  "donate": True,
}
TRAIN_ONLY = ("remat", "grad_frozen", "donate")  # switches that do not touch the eval step
ABLATIONS = {
  # row name -> (switch overrides, what the row measures)
  "all_on": (
    {},
    "every optimisation at its default (block 0 shared, CLS-only last block, remat dots)",
  ),
  "no_share_block0": (
    {"share_block0": False},
    "embedding + block 0 recomputed in every pass (saves: sharing block 0)",
  ),
  "no_cls_only": (
    {"last_block_cls_only": False},
    "last block on all tokens (saves: CLS-only last block)",
  ),
  "grad_frozen": (
    {"grad_frozen": True},
    "weight gradients of the frozen backbone and EMA bank too (saves: the trainable split)",
  ),
  "no_donate": ({"donate": False}, "train state not donated (saves: buffer donation)"),
  "remat_none": (
    {"remat": "none"},
    "every activation stored (saves: remat keeping only the weight-matmul outputs)",
  ),
  "remat_full": ({"remat": "full"}, "full per-block remat (memory for one more forward)"),
}


# ------------------------------------------------------------------------------------------------
# Analytic FLOP count.


def analytic_flops(spec, num_classes: int, head_width: int, batch: int) -> dict[str, float]:
  """Matmul FLOPs per image (2 per multiply-add) of the forward, train step and eval step.

  Notation: d width, m MLP width, L depth, N = 1 + (H/P)² tokens, N' = N + n_p with n_p prompts,
  r adapter bottleneck, D = feature width (2d, 3d with PTM), dense(n, i, o) = 2·n·i·o.

    attn(n)    = dense(n, d, 3d) + dense(n, d, d) + 4·n²·d       (QKV, out, scores + A·V)
    attn_cls(n)= dense(n, d, 2d) + 2·dense(1, d, d) + 4·n·d      (K, V on n; Q, out, rows: 1)
    mlp(n)     = dense(n, d, m) + dense(n, m, d)
    adapter(n) = dense(n, d, r) + dense(n, r, d)      prompt_gen = 2·N·d·n_p   (token mixing)
    block0     = dense(N-1, P²·3, d) + attn(N) + mlp(N)           (embedding + block 0)
    last(n)    = attn_cls(n) + mlp(1)  [CLS-only]  or  attn(n) + mlp(n)
    plain      = Σ_{l=1}^{L-2} [attn(N) + mlp(N)] + last(N)
    channel    = adapter(N) + Σ_{l=1}^{L-2} [attn(N) + mlp(N) + adapter(N)] + last(N) + adapter
    patch      = prompt_gen + mlp(n_p) + Σ_{l=1}^{L-2} [attn(N') + prompt_gen + mlp(N')]
                 + last(N') [+ prompt_gen when not CLS-only]
    forward    = block0·(1 if shared else #passes) + [plain] + 2·channel + 2·patch
                 + dense(1, D, D)                                                  (fusion value)

  Train adds the proxy head (3·dense(1, D, K)), L_MI (dense(1, D, min(B, C))), L_orth
  (2·2·dense(1, D, 40)) and the backward of the two *current* passes, fusion and heads only
  (frozen passes get none): 1× the forward FLOPs of matmuls with a frozen weight (input gradient
  only), 2× for activation-activation matmuls (scores, A·V) and trainable weights (adapters,
  prompt generators, fusion, heads; an upper bound for the block-0 ones, whose input is constant);
  remat="full" adds one more forward of the two current passes ("dots" recomputes only
  activation-activation matmuls and elementwise work). Eval adds the prototype logits
  dense(1, D, C). LayerNorm, softmax, GELU and the optimiser update are not counted.
  """
  v = spec.vit
  d, m, n, r, n_p = v.width, v.mlp_dim, v.num_tokens, spec.adapter_dim, spec.num_prompts
  n2, big_d, cls_only = n + n_p, spec.feature_dim, spec.last_block_cls_only

  def dense(rows, i, o):
    return 2.0 * rows * i * o

  def attn(k):  # -> (frozen-weight flops, activation-activation flops)
    return dense(k, d, 3 * d) + dense(k, d, d), 4.0 * k * k * d

  def attn_cls(k):
    return dense(k, d, 2 * d) + 2 * dense(1, d, d), 4.0 * k * d

  def mlp(k):
    return dense(k, d, m) + dense(k, m, d)

  def adapter(k):
    return dense(k, d, r) + dense(k, r, d)

  prompt_gen = 2.0 * v.num_tokens * d * n_p

  def last(k):  # -> (frozen, act, rows the last block outputs)
    if cls_only:
      fw, aa = attn_cls(k)
      return fw + mlp(1), aa, 1
    fw, aa = attn(k)
    return fw + mlp(k), aa, k

  # Each pass as (frozen-weight, activation-activation, trainable-weight) FLOPs after block 0.
  def plain():
    fw, aa = attn(n)
    lf, la, _ = last(n)
    return ((v.depth - 2) * (fw + mlp(n)) + lf, (v.depth - 2) * aa + la, 0.0)

  def channel():
    fw, aa = attn(n)
    lf, la, rows = last(n)
    tw = adapter(n) + (v.depth - 2) * adapter(n) + adapter(rows)
    return ((v.depth - 2) * (fw + mlp(n)) + lf, (v.depth - 2) * aa + la, tw)

  def patch():
    fw, aa = attn(n2)
    lf, la, _ = last(n2)
    tw = prompt_gen * (1 + (v.depth - 2) + (0 if cls_only else 1))
    return (mlp(n_p) + (v.depth - 2) * (fw + mlp(n2)) + lf, (v.depth - 2) * aa + la, tw)

  fw0, aa0 = attn(n)
  block0 = dense(v.num_patches, v.patch_size**2 * v.channels, d) + fw0 + aa0 + mlp(n)
  passes = [channel(), channel(), patch(), patch()] + ([plain()] if spec.use_init_ptm else [])
  n_block0 = 1 if spec.share_block0 else len(passes)
  fusion = dense(1, big_d, big_d)
  forward = n_block0 * block0 + sum(sum(p) for p in passes) + fusion
  cur = [channel(), patch()]  # the two passes that get a backward
  heads = 3 * dense(1, big_d, head_width) + dense(1, big_d, min(batch, num_classes))
  heads += 2 * 2 * dense(1, big_d, 40)
  backward = sum(fw + 2 * aa + 2 * tw for fw, aa, tw in cur) + 2 * (fusion + heads)
  recompute = {"none": 0.0, "dots": sum(aa for _, aa, _ in cur), "full": sum(map(sum, cur))}
  train = forward + heads + backward + recompute[spec.remat]
  return {"forward": forward, "train": train, "eval": forward + dense(1, big_d, num_classes)}


# ------------------------------------------------------------------------------------------------
# Worker: one (configuration, phase) in a fresh process.


def _cost_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def build_spec(cfg: dict[str, Any]):
  import jax.numpy as jnp

  from ntkcl_jax.models.ntkcl import ModelSpec
  from ntkcl_jax.models.vit import ViTSpec

  vit_kw, _, _, _, fixed_197 = SIZES[cfg["size"]]
  return ModelSpec(
    vit=ViTSpec(**vit_kw),
    use_init_ptm=cfg["ptm"],
    fixed_197_tokens=fixed_197,
    dtype=jnp.dtype(cfg["dtype"]),
    share_block0=cfg["share_block0"],
    last_block_cls_only=cfg["last_block_cls_only"],
    remat=cfg["remat"],
  )


def _grad_frozen_step(model, tx, batch_size: int):
  """`make_train_step` that also takes the gradient w.r.t. `frozen` (and discards it)."""
  import jax
  import optax

  from ntkcl_jax import losses
  from ntkcl_jax.train_step import TrainState, loss_fn

  def train_step(state, frozen, aux, batch, key, lr):
    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
    (_, terms), (grads, frozen_grads) = grad_fn(
      state.params,
      frozen,
      aux,
      batch,
      key,
      model=model,
      weights=losses.LossWeights(),
      batch_size=batch_size,
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree_util.tree_map(lambda p, u: p - lr * u, state.params, updates)
    terms["grad_norm"] = optax.global_norm(grads)
    terms["frozen_grad_norm"] = optax.global_norm(frozen_grads)
    return TrainState(params=params, opt_state=opt_state, step=state.step + 1), terms

  return train_step


def run_worker(cfg: dict[str, Any]) -> dict[str, Any]:
  """Builds, compiles and times one phase ("train" or "eval") of one configuration."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ntkcl_jax import losses
  from ntkcl_jax.models.ntkcl import NTKCL, init_params
  from ntkcl_jax.optim import make_optimizer
  from ntkcl_jax.train_step import (
    TaskInfo,
    TrainState,
    init_proxy_head,
    make_eval_fn,
    make_train_step,
    reg_targets,
    split_trainable,
  )

  load_before = os.getloadavg()[0]
  _, batch_size, num_classes, (k_t, s_t), _ = SIZES[cfg["size"]]
  batch_size = cfg.get("batch") or batch_size
  spec = build_spec(cfg)
  model = NTKCL(spec)
  v = spec.vit
  t0 = time.perf_counter()
  params = init_params(spec, jax.random.key(0))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(size=(batch_size, v.image_size, v.image_size, 3)), jnp.float32)
  protos = np.zeros((num_classes, spec.feature_dim), np.float32)
  protos[: k_t + s_t] = rng.normal(size=(k_t + s_t, spec.feature_dim))
  protos_j = jnp.asarray(protos)
  jax.block_until_ready(params)
  init_s = time.perf_counter() - t0
  rss_after_init = bench_util.proc_status_bytes("VmRSS")

  if cfg["phase"] == "train":
    params["proxy_head"] = init_proxy_head(jax.random.key(1), spec.feature_dim, s_t)
    trainable, frozen = split_trainable(params)
    tx = make_optimizer(5e-4, 0.9)
    state = TrainState(params=trainable, opt_state=tx.init(trainable), step=jnp.int32(0))
    aux = {
      "task": TaskInfo.make(k_t, s_t, n_old=k_t, use_reg=True),
      "prototypes": protos_j,
      "orth_basis": jnp.asarray(losses.orthogonality_basis(protos[: k_t + s_t], 40)),
      # a copy: the state is donated, the snapshot must not alias its buffers (as in train.py)
      "reg_snapshot": jax.tree_util.tree_map(jnp.copy, reg_targets(trainable)),
    }
    labels = k_t + rng.integers(0, s_t, size=batch_size)
    batch = {
      "image": images,
      "label": jnp.asarray(labels, jnp.int32),
      "mask": jnp.ones((batch_size,), bool),
    }
    if cfg["grad_frozen"]:
      # Differentiate the frozen partition too (its gradient norm joins the terms, so XLA
      # cannot drop it): the cost the trainable/frozen split avoids.
      step = _grad_frozen_step(model, tx, batch_size)
    else:
      step = make_train_step(model, losses.LossWeights(), tx, batch_size)
    fn = jax.jit(step, donate_argnums=(0,) if cfg["donate"] else ())
    keys = [jax.random.key(i) for i in range(cfg["repeats"] + 1)]
    lr = 0.01
    t0 = time.perf_counter()
    compiled = fn.lower(state, frozen, aux, batch, keys[0], lr).compile()
    compile_s = time.perf_counter() - t0

    def call(i):
      nonlocal state
      state, terms = compiled(state, frozen, aux, batch, keys[i], lr)
      jax.block_until_ready((state, terms))
      return terms

  else:
    eval_params = {k: params[k] for k in ("backbone", "peft", "fusion")}
    weights = (1.0, 0.3, 0.1) if spec.use_init_ptm else (0.3, 0.1)
    fn = jax.jit(make_eval_fn(model, weights))
    num_seen = jnp.int32(k_t + s_t)
    t0 = time.perf_counter()
    compiled = fn.lower(eval_params, protos_j, num_seen, images).compile()
    compile_s = time.perf_counter() - t0

    def call(i):
      out = compiled(eval_params, protos_j, num_seen, images)
      jax.block_until_ready(out)
      return out

  t0 = time.perf_counter()
  first = call(0)
  first_call_s = time.perf_counter() - t0
  times, cpu_times = [], []
  for i in range(cfg["repeats"]):
    t0, c0 = time.perf_counter(), time.process_time()
    call(i + 1)
    times.append(time.perf_counter() - t0)
    cpu_times.append(time.process_time() - c0)
  finite = None
  if cfg["phase"] == "train":
    finite = bool(np.isfinite(float(first["total"])))

  mem = compiled.memory_analysis()
  dev = jax.local_devices()[0]
  stats = dev.memory_stats() or {}
  median = statistics.median(times)
  return {
    **cfg,
    "batch": batch_size,
    "platform": dev.platform,
    "device_kind": dev.device_kind,
    "init_s": init_s,
    "compile_s": compile_s,
    "first_call_s": first_call_s,
    "times_s": times,
    "median_s": median,
    "min_s": min(times),
    "img_s": batch_size / median,
    "img_s_best": batch_size / min(times),
    "cpu_s": cpu_times,
    "median_cpu_s": statistics.median(cpu_times),
    "xla_flops_per_img": (lambda f: None if f is None else f / batch_size)(_cost_flops(compiled)),
    # the analytic count covers the shipped step (frozen weights get no gradient)
    "analytic_flops_per_img": (
      None
      if cfg.get("grad_frozen")
      else analytic_flops(spec, num_classes, s_t, batch_size)[cfg["phase"]]
    ),
    "xla_temp_bytes": getattr(mem, "temp_size_in_bytes", None),
    "peak_rss_bytes": bench_util.peak_rss_bytes(),
    "rss_after_init_bytes": rss_after_init,
    "device_peak_bytes": stats.get("peak_bytes_in_use"),
    "loss_finite": finite,
    "load_avg_before": load_before,
    "load_avg_after": os.getloadavg()[0],
  }


# ------------------------------------------------------------------------------------------------
# Parent: matmul rate, configurations, tables.


def dot_rate(n: int, dtype: str, repeats: int) -> dict[str, Any]:
  """FLOP/s of a jitted (n, n) @ (n, n) dot in `dtype` (`bench_util.matmul_rate`)."""
  import jax
  import jax.numpy as jnp

  a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.dtype(dtype)) for i in (0, 1))
  f = jax.jit(jnp.dot)
  return bench_util.matmul_rate(lambda: jax.block_until_ready(f(a, b)), n, dtype, repeats)


def _run_torch(cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
  """`bench_torch_reference.py`'s worker for the same size, PTM, phase, repeats and batch (its
  own process, all CPU threads), tagged as this script's all_on float32 configuration."""
  keys = ("size", "ptm", "phase", "repeats", "batch")
  tcfg = {**{k: cfg[k] for k in keys}, "threads": os.cpu_count() or 1}
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_torch_reference.py")
  r = bench_util.run_worker_process(script, tcfg, timeout)
  return {**r, "dtype": "float32", **SWITCH_DEFAULTS, "framework": "torch"}


def _run_official(cfg: dict[str, Any], official_dir: str, timeout: float) -> dict[str, Any]:
  """The official NTK-CL step itself (`experiments/parity/bench_official.py`: the released code,
  unmodified, through the parity stand-ins) for the same size, PTM, phase, repeats and batch."""
  keys = ("size", "ptm", "phase", "repeats", "batch")
  ocfg = {**{k: cfg[k] for k in keys}, "threads": os.cpu_count() or 1, "official": official_dir}
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parity", "bench_official.py")
  r = bench_util.run_worker_process(script, ocfg, timeout)
  return {**r, "dtype": "float32", **SWITCH_DEFAULTS, "framework": "official"}


def run_config(cfg: dict[str, Any], subprocess_mode: bool, timeout: float) -> dict[str, Any]:
  if not subprocess_mode:
    return run_worker(cfg)
  return bench_util.run_worker_process(__file__, cfg, timeout)


def _variant(switches: dict[str, Any]) -> str:
  names = {
    "share_block0": lambda v: "no_share_block0",
    "last_block_cls_only": lambda v: "no_cls_only",
    "remat": lambda v: f"remat_{v}",
    "grad_frozen": lambda v: "grad_frozen",
    "donate": lambda v: "no_donate",
  }
  changed = [names[k](switches[k]) for k, v in SWITCH_DEFAULTS.items() if switches[k] != v]
  return "+".join(changed) or "all_on"


def _fmt(x, spec=".3g"):
  return "-" if x is None else format(x, spec)


def print_results(
  results: list[dict[str, Any]], dots: dict[str, float], dots_cpu: dict[str, float]
) -> None:
  f32, f32_cpu = dots.get("float32"), dots_cpu.get("float32")
  head = (
    f"{'size':5} {'ptm':5} {'dtype':8} {'variant':16} {'phase':5} {'img/s':>7} {'med s':>7} "
    f"{'min s':>7} {'cpu s':>7} {'compile':>7} {'1st':>6} {'GF/img xla':>10} {'GF/img ana':>10} "
    f"{'GFLOP/s':>8} {'/dot32':>6} {'/dotcpu':>7} {'RSS GB':>6} {'temp GB':>7} {'load':>4}"
  )
  print(head)
  print("-" * len(head))
  for r in results:
    if "error" in r:
      print(
        f"{r['size']:5} {r['ptm']!s:5} {r['dtype']:8} {_variant(r):16} {r['phase']:5} "
        f"ERROR {r['error']}"
      )
      continue
    ana, xla = r["analytic_flops_per_img"], r["xla_flops_per_img"]
    flops = ana or xla or 0.0  # XLA's count where the analytic one does not apply
    rate = flops * r["img_s"]
    rate_cpu = flops * r["batch"] / r["median_cpu_s"]  # FLOPs per CPU-second of the process
    rss = r["device_peak_bytes"] or r["peak_rss_bytes"]
    print(
      f"{r['size']:5} {r['ptm']!s:5} {r['dtype']:8} {_variant(r):16} {r['phase']:5} "
      f"{r['img_s']:7.3g} {r['median_s']:7.3f} {r['min_s']:7.3f} {r['median_cpu_s']:7.3f} "
      f"{r['compile_s']:7.1f} "
      f"{r['first_call_s']:6.2f} {_fmt(xla and xla / 1e9):>10} "
      f"{_fmt(ana and ana / 1e9):>10} {rate / 1e9:8.3g} {_fmt(f32 and rate / f32, '.2f'):>6} "
      f"{_fmt(f32_cpu and rate_cpu / f32_cpu, '.2f'):>7} "
      f"{rss / 1e9:6.2f} {_fmt(r['xla_temp_bytes'] and r['xla_temp_bytes'] / 1e9, '.2f'):>7} "
      f"{r['load_avg_after']:4.1f}"
    )


def print_reference(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
  rows = []
  for r in best_of_rounds(results):
    if "error" in r or r["size"] != "vitb" or r["dtype"] != "float32" or _variant(r) != "all_on":
      continue
    ref = REFERENCE[r["ptm"]]
    lo, hi = ref[f"{r['phase']}_img_s"]
    rss = r["peak_rss_bytes"] / 1e9
    rows.append(
      {
        "ptm": r["ptm"],
        "phase": r["phase"],
        "ours_img_s": r["img_s"],
        "ref_img_s": [lo, hi],
        "speedup_vs_ref_mid": r["img_s"] / ((lo + hi) / 2),
        "ours_peak_rss_gb": rss,
        "ref_peak_rss_gb": ref["peak_rss_gb"],
        "rss_ratio": rss / ref["peak_rss_gb"],
      }
    )
  if rows:
    print("\nViT-B/16 float32 batch 16 vs the issue's quoted PyTorch figures (other CPUs):")
    print(
      f"{'ptm':5} {'phase':5} {'ours img/s':>10} {'ref img/s':>11} {'ours/ref':>8} "
      f"{'RSS GB':>6} {'ref GB':>6} {'ratio':>5}"
    )
    for x in rows:
      print(
        f"{x['ptm']!s:5} {x['phase']:5} {x['ours_img_s']:10.3f} "
        f"{x['ref_img_s'][0]:5.2f}-{x['ref_img_s'][1]:<5.2f} {x['speedup_vs_ref_mid']:8.2f} "
        f"{x['ours_peak_rss_gb']:6.2f} {x['ref_peak_rss_gb']:6.1f} {x['rss_ratio']:5.2f}"
      )
  return rows


def print_vs_torch(
  results: list[dict[str, Any]],
  torch_results: list[dict[str, Any]],
  label: str = "the official step's computation in PyTorch",
) -> list:
  """ours / PyTorch (same run, best round each) of images/s and peak RSS, per PTM and phase."""
  ours = {
    (r["size"], r["ptm"], r["phase"]): r
    for r in best_of_rounds(results)
    if "error" not in r and r["dtype"] == "float32" and _variant(r) == "all_on"
  }
  rows = []
  for t in best_of_rounds(torch_results):
    key = (t["size"], t["ptm"], t["phase"])
    if "error" in t or key not in ours:
      continue
    o = ours[key]
    rows.append(
      {
        "size": t["size"],
        "ptm": t["ptm"],
        "phase": t["phase"],
        "ours_img_s": o["img_s"],
        "torch_img_s": t["img_s"],
        "speedup": o["img_s"] / t["img_s"],
        "ours_peak_rss_gb": o["peak_rss_bytes"] / 1e9,
        "torch_peak_rss_gb": t["peak_rss_bytes"] / 1e9,
        "rss_ratio": o["peak_rss_bytes"] / t["peak_rss_bytes"],
        "torch_threads": t["threads"],
      }
    )
  if rows:
    print(f"\nSame run, float32: ours (defaults) vs {label}")
    print(
      f"{'size':5} {'ptm':5} {'phase':5} {'ours img/s':>10} {'torch img/s':>11} {'speedup':>7} "
      f"{'RSS GB':>6} {'torch GB':>8} {'ratio':>5}"
    )
    for x in rows:
      print(
        f"{x['size']:5} {x['ptm']!s:5} {x['phase']:5} {x['ours_img_s']:10.3f} "
        f"{x['torch_img_s']:11.3f} {x['speedup']:7.2f} {x['ours_peak_rss_gb']:6.2f} "
        f"{x['torch_peak_rss_gb']:8.2f} {x['rss_ratio']:5.2f}"
      )
  return rows


def best_of_rounds(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per (size, PTM, dtype, variant, phase): the round with the smallest median time
  (other jobs on a shared machine only ever slow a round down)."""
  best: dict[tuple, dict[str, Any]] = {}
  for r in results:
    key = (r["size"], r["ptm"], r["dtype"], _variant(r), r["phase"])
    if "error" in r:
      best.setdefault(key, r)
    elif "error" in best.get(key, {"error": 1}) or r["median_s"] < best[key]["median_s"]:
      best[key] = r
  return list(best.values())


def ablation_table(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Ratios variant / all_on of step time, FLOPs and peak memory, per size, PTM, dtype, phase
  (best round of each)."""
  results = best_of_rounds(results)
  base = {
    (r["size"], r["ptm"], r["dtype"], r["phase"]): r
    for r in results
    if "error" not in r and _variant(r) == "all_on"
  }
  rows = []
  for r in results:
    key = (r["size"], r["ptm"], r["dtype"], r["phase"])
    if "error" in r or _variant(r) == "all_on" or key not in base:
      continue
    b = base[key]
    mem = lambda x: x["device_peak_bytes"] or x["peak_rss_bytes"]  # noqa: E731
    rows.append(
      {
        "size": r["size"],
        "ptm": r["ptm"],
        "dtype": r["dtype"],
        "phase": r["phase"],
        "variant": _variant(r),
        "measures": ABLATIONS.get(_variant(r), ("", ""))[1],
        "time_ratio": r["median_s"] / b["median_s"],
        "min_time_ratio": r["min_s"] / b["min_s"],
        "cpu_time_ratio": r["median_cpu_s"] / b["median_cpu_s"],
        "xla_flops_ratio": (
          r["xla_flops_per_img"] / b["xla_flops_per_img"]
          if r["xla_flops_per_img"] and b["xla_flops_per_img"]
          else None
        ),
        "analytic_flops_ratio": (
          r["analytic_flops_per_img"] / b["analytic_flops_per_img"]
          if r["analytic_flops_per_img"] and b["analytic_flops_per_img"]
          else None
        ),
        "peak_mem_ratio": mem(r) / mem(b),
        "temp_ratio": (
          r["xla_temp_bytes"] / b["xla_temp_bytes"]
          if r["xla_temp_bytes"] and b["xla_temp_bytes"]
          else None
        ),
        "compile_ratio": r["compile_s"] / b["compile_s"],
      }
    )
  if rows:
    print(
      "\nAblation: each row = that variant / all optimisations on (same size, PTM, dtype, phase)"
    )
    print(
      f"{'size':5} {'ptm':5} {'dtype':8} {'phase':5} {'variant':16} {'time':>6} {'min t':>6} "
      f"{'cpu t':>6} "
      f"{'FLOP xla':>8} {'FLOP ana':>8} {'peak mem':>8} {'temp':>6} {'compile':>7}"
    )
    for x in rows:
      print(
        f"{x['size']:5} {x['ptm']!s:5} {x['dtype']:8} {x['phase']:5} {x['variant']:16} "
        f"{x['time_ratio']:6.2f} {x['min_time_ratio']:6.2f} {x['cpu_time_ratio']:6.2f} "
        f"{_fmt(x['xla_flops_ratio'], '.2f'):>8} "
        f"{_fmt(x['analytic_flops_ratio'], '.2f'):>8} {x['peak_mem_ratio']:8.2f} "
        f"{_fmt(x['temp_ratio'], '.2f'):>6} {x['compile_ratio']:7.2f}"
      )
    for name, (_, what) in ABLATIONS.items():
      print(f"  {name}: {what}")
  return rows


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", choices=("vitb", "tiny", "all"), default="tiny")
  p.add_argument("--ptm", choices=("off", "on", "both"), default="both", help="PTM pass")
  p.add_argument("--dtype", default="float32", help="float32, bfloat16 or both comma-separated")
  p.add_argument("--phase", choices=("train", "eval", "both"), default="both")
  p.add_argument("--repeats", type=int, default=None, help="timed calls (default 10 tiny, 3 ViT-B)")
  p.add_argument("--batch", type=int, default=None, help="override the size's batch")
  p.add_argument("--no-share-block0", action="store_true")
  p.add_argument("--no-cls-only", action="store_true")
  p.add_argument("--remat", choices=("none", "dots", "full"), default="dots")
  p.add_argument("--grad-frozen", action="store_true")
  p.add_argument("--no-donate", action="store_true")
  p.add_argument("--ablate", action="store_true", help="all on vs each switch changed alone")
  p.add_argument("--rounds", type=int, default=1, help="repeat all configs, alternating order")
  p.add_argument("--dot-size", type=int, default=2048)
  p.add_argument("--dot-repeats", type=int, default=5)
  p.add_argument("--no-subprocess", action="store_true", help="one process (peak RSS then mixes)")
  p.add_argument("--worker-timeout", type=float, default=3600.0)
  p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
  p.add_argument(
    "--vs-torch", action="store_true", help="time bench_torch_reference.py's step beside ours"
  )
  p.add_argument(
    "--vs-official",
    metavar="DIR",
    default=None,
    help="time the official NTK-CL step itself (extracted checkout DIR, run unmodified through "
    "experiments/parity's stand-ins) beside ours, alternating order",
  )
  p.add_argument(
    "--xla-flags", default=None, help="extra XLA_FLAGS for this run and its workers (appended)"
  )
  p.add_argument("--worker", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.xla_flags:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()

  if args.worker:
    bench_util.print_result(run_worker(json.loads(args.worker)))
    return 0

  if args.vs_torch and importlib.util.find_spec("torch") is None:
    p.error("--vs-torch needs PyTorch: pip install torch==2.13.0 (the CPU wheel)")
  if args.vs_official and importlib.util.find_spec("torch") is None:
    p.error("--vs-official needs PyTorch: pip install torch==2.13.0 (the CPU wheel)")
  if args.vs_torch and args.no_subprocess:
    p.error("--vs-torch compares per-process peak memory: drop --no-subprocess")

  import jax

  dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
  for d in dtypes:
    if d not in ("float32", "bfloat16"):
      p.error(f"--dtype {d!r}: choose float32 and/or bfloat16")
  sizes = ["tiny", "vitb"] if args.size == "all" else [args.size]
  ptms = {"off": [False], "on": [True], "both": [False, True]}[args.ptm]
  phases = ["train", "eval"] if args.phase == "both" else [args.phase]
  chosen = {
    "share_block0": not args.no_share_block0,
    "last_block_cls_only": not args.no_cls_only,
    "remat": args.remat,
    "grad_frozen": args.grad_frozen,
    "donate": not args.no_donate,
  }
  variants = (
    [{**SWITCH_DEFAULTS, **over} for over, _ in ABLATIONS.values()] if args.ablate else [chosen]
  )

  dev = jax.local_devices()[0]
  print(
    f"device: {dev.platform} {dev.device_kind} x{jax.device_count()}, jax {jax.__version__}, "
    f"{os.cpu_count()} CPUs, load average {os.getloadavg()}, "
    f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
  )
  dots_before = {d: dot_rate(args.dot_size, d, args.dot_repeats) for d in ("float32", "bfloat16")}
  for x in dots_before.values():
    print(bench_util.rate_line(x, "before"))

  results, torch_results, official_results = [], [], []
  # Rounds alternate the variant order (A B C D, D C B A, ...), so a slow spell on a shared
  # machine does not always hit the same variant; tables use each configuration's best round.
  for rnd in range(args.rounds):
    order = variants if rnd % 2 == 0 else variants[::-1]
    for size, ptm, dtype, sw, phase in itertools.product(sizes, ptms, dtypes, order, phases):
      if args.ablate and phase == "eval" and any(sw[k] != SWITCH_DEFAULTS[k] for k in TRAIN_ONLY):
        continue  # the eval step is the all_on one
      repeats = args.repeats or (10 if size == "tiny" else 3)
      cfg = {
        "size": size,
        "ptm": ptm,
        "dtype": dtype,
        "phase": phase,
        "repeats": repeats,
        "batch": args.batch,
        **sw,
      }
      with_torch = args.vs_torch and dtype == "float32" and _variant(sw) == "all_on"
      frameworks = ["jax", "torch"] if with_torch else ["jax"]
      if args.vs_official and dtype == "float32" and _variant(sw) == "all_on":
        frameworks.append("official")
      for framework in frameworks if rnd % 2 == 0 else frameworks[::-1]:
        t0 = time.perf_counter()
        if framework == "jax":
          r = run_config(cfg, not args.no_subprocess, args.worker_timeout)
          results.append(r)
        elif framework == "official":
          r = _run_official(cfg, args.vs_official, args.worker_timeout)
          official_results.append(r)
        else:
          r = _run_torch(cfg, args.worker_timeout)
          torch_results.append(r)
        status = r.get("error") or f"{r['img_s']:.3g} img/s"
        print(
          f"  [{time.perf_counter() - t0:6.1f} s] round {rnd} {framework} {size} ptm={ptm} "
          f"{dtype} {_variant(sw)} {phase}: {status}",
          flush=True,
        )

  dots_after = {d: dot_rate(args.dot_size, d, args.dot_repeats) for d in ("float32", "bfloat16")}
  larger = {d: bench_util.larger_rate(dots_before[d], dots_after[d]) for d in dots_before}
  dots = {d: rate for d, (rate, _) in larger.items()}
  dots_cpu = {d: per_cpu for d, (_, per_cpu) in larger.items()}
  for x in dots_after.values():
    print(bench_util.rate_line(x, "after"))
  print(
    "\nGFLOP/s and /dot32 use the analytic count and the larger of the two float32 dot medians "
    f"({dots['float32'] / 1e9:.1f} GFLOP/s); RSS = peak host RSS of the phase's own process "
    "(device peak on accelerators); temp = XLA's planned temporary buffer; load = 1-min load "
    "average after the phase; /dotcpu = the step's analytic FLOPs per CPU-second of its process "
    "over the dot's (less sensitive to other jobs on the machine).\n"
  )
  print_results(results, dots, dots_cpu)
  ref_rows = print_reference(results)
  torch_rows = print_vs_torch(results, torch_results)
  official_rows = print_vs_torch(
    results, official_results, "the official NTK-CL step itself (torch column = official)"
  )
  abl_rows = ablation_table(results) if args.ablate else []
  if args.json:
    print(
      json.dumps(
        {
          "device": f"{dev.platform} {dev.device_kind}",
          "jax": jax.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "dot_before": dots_before,
          "dot_after": dots_after,
          "dot_flop_s": dots,
          "dot_flop_per_cpu_s": dots_cpu,
          "results": results,
          "reference": ref_rows,
          "torch_results": torch_results,
          "vs_torch": torch_rows,
          "official_results": official_results,
          "vs_official": official_rows,
          "ablation": abl_rows,
        }
      )
    )
  return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
  sys.exit(main())
