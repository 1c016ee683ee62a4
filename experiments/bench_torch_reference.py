"""PyTorch baseline of the official NTK-CL train and eval steps, timed like `bench_step.py`.

Commands (from the repository root; PyTorch is NOT a project dependency, install the CPU wheel
first with ``pip install torch==2.13.0``, which these machines serve from a local wheel)::

  python experiments/bench_torch_reference.py --size tiny --threads 1        # smoke run
  python experiments/bench_torch_reference.py --size vitb --counts-only      # build, check counts
  python experiments/bench_torch_reference.py --size vitb --repeats 3 --json # the baseline
  python experiments/bench_torch_reference.py --size vitb --ptm on --phase train

Why: the official code (`Programmergg/NTK-CL` at 24de712, PyTorch 2.0.1 + timm 0.6.12) cannot run
here (timm 0.6.12 imports torchvision, which cannot be imported on these machines). This script,
with `torch_reference_model.py` (sizes, parameters, analytic FLOPs) and `torch_reference_step.py`
(forward and steps), is a self-contained re-implementation of the *computation* of its training
and test steps: the same passes, the same matmuls in the same shapes, the same autograd graph and
the same optimiser, on random weights (the cost does not depend on them), float32, so that
`bench_step.py`'s JAX step can be compared with it on the same CPUs. It was written from reading
the official source; none of its code is reused.

Official behaviour followed (file / function of the official repository):

* Backbone (`models/prompt_vit.py`: `VisionTransformer_Prompt`, `Block`, `Attention`): ViT-B/16
  at 224 px, conv patch embedding, CLS + learned position embedding (197 tokens), 12 pre-LN blocks
  (LayerNorm eps 1e-6), 12 heads, exact GELU MLP 3072, final LayerNorm, CLS feature; frozen
  (`requires_grad=False`). The official `Attention` splits timm's fused qkv Linear into three
  Linears `q_proj`, `k_proj`, `v_proj` (with bias) and computes softmax(QKᵀ/8)·V with explicit
  `bmm`s: done the same way here (same parameter count as one qkv Linear).
* Channel adapter (`Channel_Prompt`): down 768→16, ReLU, functional dropout 0.1 (active whenever
  the network is in train mode, also in the frozen EMA bank, SPEC Q9), up 16→768, ×0.1, added to
  the MLP output and the post-attention residual (`Block.forward`, mode "channel").
* Patch prompt generator (`Patch_Prompt`): Linear over the token axis 197→10 applied to the
  transposed tokens, LayerNorm, inserted after CLS; carried prompts (detected by the sequence
  length 197 + 10) are cut out, and the new ones get +0.1·old. At block 0 the MLP output gets the
  residual only at CLS and patch positions, added in place (`Block.forward`, mode "patch").
* Passes (`VisionTransformer_Prompt.forward`, `forward_blocks`): the patch embedding is computed
  once per forward, then *every* pass runs all 12 blocks from it (block 0 is not shared), the last
  block on all tokens, final LayerNorm on all tokens, then CLS. Order: [PTM (channel mode, no
  adapters)], channel/EMA, channel/current, patch/EMA, patch/current; c = [z_PTM; c_EMA; c_cur],
  p = [z_PTM; p_EMA; p_cur].
* No `torch.no_grad()` around the EMA or PTM passes: the official forward runs all passes with
  autograd enabled. Since none of their inputs or weights require grad, autograd records nothing
  for them; the same holds here (grad mode on, same `requires_grad` flags).
* Fusion (`models/fusion_nets.py`: `AttentionFusion`): q = Linear(p), k = Linear(c),
  v = Linear(c), D→D with bias, 8 heads over one token, softmax, Dropout(0.1) on the scores,
  m = 0.5·attn + c + 0.1·p. All three Linears are computed and differentiated.
* Train step (`models/learner.py`: `PromptLearner._init_train`; `models/inc_net.py`:
  `PromptNet.forward`, `orthogonalize_with_truncated_svd`, `CosineLinear`,
  `MutualInformationLoss`): network in train mode; proxy cosine head (trainable σ) on c, p, m and
  three cross-entropies with labels y − k_t; every forward also takes a full SVD
  (`full_matrices=True`) of the column-normalised prototype matrix (D × seen classes, frozen),
  keeps the first 40 left singular vectors and projects the normalised c, p and m (m's result is
  unused); L_orth = signed sum of the c and p residuals; L_MI on [m; M old prototype rows chosen
  by a fresh `randperm`] (τ = 0.1), subtracted with weight nce_temp = 0.03 (CIFAR-100, batch 16);
  L_reg = Σ‖θ − θ_snap‖² over the "weight" tensors of the current bank and of the fusion q/k/v
  Linears, weight 1e-3; L_orth weight 1e-4; non-finite L_MI / L_orth / L_reg replaced by 0;
  `zero_grad`, `backward`, `SGD(lr=0.025, momentum=0.9, weight_decay=5e-4)` over the trainable
  parameters only (current bank, fusion, proxy head), then `loss.item()`.
* Eval step (`PromptLearner._eval_results`, `PromptNet.forward(test=True)`,
  `CosineLinear.forward_reweight`): network in eval mode under `torch.no_grad()`, the same five or
  four passes, fusion, the (unused) SVD and projections, section-weighted cosine logits for c, p
  and m (weights [0.3, 0.1], with PTM [1.0, 0.3, 0.1]; σ = 1), top-k (k = 5) of m's logits.

Deliberate differences: the official prototype matrix at a mid-stream task has only the seen
rows; the eval step here scores all C = 100 (ViT-B) rows like `bench_step.py` and ranks the seen
ones (dense(1, D, C − seen) more FLOPs per image, < 0.001 % of the step). The official code hard-
codes 197 tokens and 768-wide logit sections; the `tiny` size uses its own token count and width.
Data loading, augmentation, the host-side accuracy bookkeeping and task-id accuracy are not timed
(as in `bench_step.py`). Mid-stream task: k_t = s_t = 10 (ViT-B) or 2 (tiny), proxy head with
s_t outputs, training prototype matrix with k_t random old rows and s_t zero rows (the official
state during task 1). The timing loop, memory fields, worker processes and JSON output are
`bench_util.py`'s (pure Python: nothing here imports JAX, whose memory would join the RSS).

Measured like `bench_step.py`: every (PTM setting, phase) runs in a fresh subprocess (its peak
RSS, `getrusage(RUSAGE_SELF).ru_maxrss`, is its own); the first call (warm-up) is reported apart;
the step time is the median and min of `--repeats` further calls; CPU time per call from
`time.process_time()`. The dense matmul rate (torch float32 n×n @ n×n, 2n³ FLOPs, median of
repeats) is measured in the parent before and after, with the same thread count. FLOPs per image
are the analytic matmul count of this official structure (`analytic_flops`; the SVD is not a
matmul and is timed apart as "svd s", its share of the step). `--threads` defaults to
`os.cpu_count()`.
"""

from __future__ import annotations

import argparse
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
from experiments.torch_reference_model import (
  SIZES,
  F,
  Geometry,
  analytic_flops,
  build_model,
  parameter_counts,
  torch,
)
from experiments.torch_reference_step import make_eval_step, make_train_step

# ------------------------------------------------------------------------------------------------
# Worker: one (PTM setting, phase) in a fresh process.


def _setup(cfg: dict[str, Any]) -> tuple[Geometry, int, int, int, int, bool]:
  g, batch, num_classes, (k_t, s_t), check = SIZES[cfg["size"]]
  torch.set_num_threads(cfg["threads"])
  torch.manual_seed(0)
  return g, cfg.get("batch") or batch, num_classes, k_t, s_t, check


def run_worker(cfg: dict[str, Any]) -> dict[str, Any]:
  """Builds and times one phase ("train" or "eval") of one configuration."""
  load_before = os.getloadavg()[0]
  g, batch, num_classes, k_t, s_t, check = _setup(cfg)
  t0 = time.perf_counter()
  model = build_model(g, cfg["ptm"], k_t, s_t, num_classes)
  counts = parameter_counts(model, cfg["ptm"], check)
  gen = torch.Generator().manual_seed(1)
  images = torch.rand((batch, g.channels, g.image_size, g.image_size), generator=gen)
  labels = k_t + torch.randint(0, s_t, (batch,), generator=gen)
  init_s = time.perf_counter() - t0
  rss_after_init = bench_util.proc_status_bytes("VmRSS")

  if cfg["phase"] == "train":
    step = make_train_step(model, g, cfg["ptm"], k_t, s_t)

    def call(_i):
      return step(images, labels)

  else:
    step = make_eval_step(model, g, cfg["ptm"], k_t + s_t)

    def call(_i):
      return step(images)

  first, timing = bench_util.time_calls(call, cfg["repeats"], batch)

  # The official step's SVD alone (same matrix), to show its share of the step.
  fc = model["train_fc"] if cfg["phase"] == "train" else model["eval_fc"][: k_t + s_t]
  svd_times = []
  for _ in range(3):
    t0 = time.perf_counter()
    torch.linalg.svd(F.normalize(fc.transpose(0, 1), p=2, dim=0), full_matrices=True)
    svd_times.append(time.perf_counter() - t0)

  return {
    **cfg,
    "batch": batch,
    "platform": "cpu",
    "device_kind": bench_util.cpu_name(),
    "torch": torch.__version__,
    "torch_threads": torch.get_num_threads(),
    "param_counts": counts,
    "init_s": init_s,
    **timing,
    "svd_s": statistics.median(svd_times),
    "analytic_flops_per_img": analytic_flops(g, cfg["ptm"], num_classes, k_t, s_t, batch)[
      cfg["phase"]
    ],
    "peak_rss_bytes": bench_util.peak_rss_bytes(),
    "rss_after_init_bytes": rss_after_init,
    "loss_finite": (bool(torch.isfinite(torch.tensor(first))) if cfg["phase"] == "train" else None),
    "load_avg_before": load_before,
    "load_avg_after": os.getloadavg()[0],
  }


# ------------------------------------------------------------------------------------------------
# Parent: matmul rate, configurations, table.


def dot_rate(n: int, repeats: int) -> dict[str, Any]:
  """FLOP/s of a torch float32 (n, n) @ (n, n) matmul (`bench_util.matmul_rate`)."""
  gen = torch.Generator().manual_seed(0)
  a, b = torch.randn((n, n), generator=gen), torch.randn((n, n), generator=gen)
  return bench_util.matmul_rate(lambda: torch.mm(a, b), n, "float32", repeats)


def print_results(results: list[dict[str, Any]], dot: float, dot_cpu: float) -> None:
  head = (
    f"{'size':5} {'ptm':5} {'phase':5} {'img/s':>7} {'med s':>7} {'min s':>7} {'cpu s':>7} "
    f"{'1st':>6} {'svd s':>6} {'GF/img ana':>10} {'GFLOP/s':>8} {'/dot32':>6} {'/dotcpu':>7} "
    f"{'RSS GB':>6} {'load':>4}"
  )
  bench_util.print_header(head)
  for r in results:
    if "error" in r:
      print(f"{r['size']:5} {r['ptm']!s:5} {r['phase']:5} ERROR {r['error']}")
      continue
    flops = r["analytic_flops_per_img"]
    rate = flops * r["img_s"]
    rate_cpu = flops * r["batch"] / r["median_cpu_s"]
    print(
      f"{r['size']:5} {r['ptm']!s:5} {r['phase']:5} {r['img_s']:7.3g} {r['median_s']:7.3f} "
      f"{r['min_s']:7.3f} {r['median_cpu_s']:7.3f} {r['first_call_s']:6.2f} {r['svd_s']:6.3f} "
      f"{flops / 1e9:10.4g} {rate / 1e9:8.3g} {rate / dot:6.2f} {rate_cpu / dot_cpu:7.2f} "
      f"{r['peak_rss_bytes'] / 1e9:6.2f} {r['load_avg_after']:4.1f}"
    )


def counts_only(size: str, ptms: list[bool]) -> list[dict[str, Any]]:
  """Builds the model (no forward) and prints / checks its parameter counts."""
  g, _, num_classes, (k_t, s_t), check = SIZES[size]
  rows = []
  for ptm in ptms:
    counts = parameter_counts(build_model(g, ptm, k_t, s_t, num_classes), ptm, check)
    status = "checked against SPEC §2.2" if check else "not checked (tiny)"
    print(f"{size} ptm={ptm}: {counts} ({status})")
    rows.append({"size": size, "ptm": ptm, "param_counts": counts, "checked": check})
  return rows


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", choices=("vitb", "tiny"), default="tiny")
  p.add_argument("--ptm", choices=("off", "on", "both"), default="both", help="PTM pass")
  p.add_argument("--phase", choices=("train", "eval", "both"), default="both")
  p.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up call")
  p.add_argument("--batch", type=int, default=None, help="override the size's batch (16)")
  p.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPUs)")
  p.add_argument("--rounds", type=int, default=1, help="repeat all configs, alternating order")
  p.add_argument("--dot-size", type=int, default=2048)
  p.add_argument("--dot-repeats", type=int, default=5)
  p.add_argument("--counts-only", action="store_true", help="build, print and check counts only")
  p.add_argument("--no-subprocess", action="store_true", help="one process (peak RSS then mixes)")
  p.add_argument("--worker-timeout", type=float, default=3600.0)
  p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if torch is None:
    p.error("PyTorch is not installed: pip install torch==2.13.0 (CPU wheel; not a dependency)")

  if args.worker:
    return bench_util.serve_worker(run_worker, args.worker)

  threads = args.threads or os.cpu_count() or 1
  torch.set_num_threads(threads)
  ptms = {"off": [False], "on": [True], "both": [False, True]}[args.ptm]
  if args.counts_only:
    rows = counts_only(args.size, ptms)
    if args.json:
      print(json.dumps({"torch": torch.__version__, "counts": rows}))
    return 0

  phases = ["train", "eval"] if args.phase == "both" else [args.phase]
  print(
    f"device: cpu {bench_util.cpu_name()}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
    f"{threads} torch threads, load average {os.getloadavg()}"
  )
  dot_fns = {"float32": lambda: dot_rate(args.dot_size, args.dot_repeats)}
  dot_before = bench_util.dot_rates(dot_fns, "before")["float32"]

  results = []
  configs = list(itertools.product(ptms, phases))
  for rnd in range(args.rounds):
    for ptm, phase in bench_util.alternate(configs, rnd):
      cfg = {
        "size": args.size,
        "ptm": ptm,
        "phase": phase,
        "repeats": args.repeats,
        "batch": args.batch,
        "threads": threads,
      }
      t0 = time.perf_counter()
      r = bench_util.run_config(
        __file__, run_worker, cfg, not args.no_subprocess, args.worker_timeout
      )
      results.append(r)
      label = f"{args.size} ptm={ptm} {phase}"
      print(bench_util.progress_line(time.perf_counter() - t0, rnd, label, r), flush=True)

  dot_after = bench_util.dot_rates(dot_fns, "after")["float32"]
  dot, dot_cpu = bench_util.larger_rate(dot_before, dot_after)
  print(
    "\nOfficial NTK-CL structure in PyTorch (no block-0 sharing, full last block, per-step SVD). "
    f"GFLOP/s and /dot32 use the analytic matmul count and the larger float32 dot median "
    f"({dot / 1e9:.1f} GFLOP/s); /dotcpu = analytic FLOPs per CPU-second of the phase's process "
    "over the dot's; svd s = the step's full SVD alone (included in the step time); RSS = peak "
    "host RSS of the phase's own process; load = 1-min load average after the phase.\n"
  )
  print_results(results, dot, dot_cpu)
  return bench_util.finish(
    args.json,
    {
      "device": f"cpu {bench_util.cpu_name()}",
      "torch": torch.__version__,
      "threads": threads,
      **bench_util.dot_fields(dot_before, dot_after, dot, dot_cpu),
      "results": results,
    },
  )


if __name__ == "__main__":
  sys.exit(main())
