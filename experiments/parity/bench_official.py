"""Worker for `python -m experiments.benchmarks step --vs-official DIR`: times the official NTK-CL
step itself (run as `experiments.parity.bench_official:run_worker` through the benchmarks' harness).

The official code runs unmodified through the stand-ins of `official.py` (plus patches 4-5 for the
tiny geometry), on random AugReg-layout backbone weights (`cases.backbone_arrays`; the cost does not
depend on them), at a mid-stream task like the `step` benchmark (k_t old classes with random
prototypes, s_t new). One train call = the official `_train` on a one-batch loader (SGD and cosine
scheduler creation, `_init_train`'s loop body: forward, losses, backward, `optimizer.step`,
`loss.item()`), dropout as released. One eval call = `_eval_results` on one batch (eval forward,
top-k, task-id bookkeeping). Timed and reported like our own step
(`harness.time_calls`: `img_s`, `median_s`, `peak_rss_bytes`).
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import numpy as np

from experiments.benchmarks import harness
from experiments.parity import cases, official


def run_worker(cfg: dict[str, Any]) -> dict[str, Any]:
  import torch

  from experiments.benchmarks.stepcase import SIZES

  vit_kw, batch, _, (k_t, s_t), _ = SIZES[cfg["size"]]
  batch = cfg.get("batch") or batch
  geo = official.Geometry(**vit_kw)
  torch.set_num_threads(cfg.get("threads") or os.cpu_count() or 1)
  torch.manual_seed(0)
  off = official.load(cfg["official"], num_tokens=geo.num_tokens)
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "augreg.npz")
    np.savez(path, **cases.backbone_arrays(geo, rng))
    off.timm.set_checkpoint(path)
    official.patch_geometry(off, geo)
    args = official.official_args(
      off.dir,
      "cifar224",
      init_cls=s_t,
      increment=s_t,
      batch_size=batch,
      init_epochs=1,
      later_epochs=1,
      hidden_size=geo.width,
      num_workers=0,
      use_init_ptm=cfg["ptm"],
      nb_tasks=k_t // s_t + 2,
    )
    args.dataset = "kvasir"  # top-1 only: the official top-5 fails below 5 seen classes (tiny)
    t0 = time.perf_counter()
    learner = off.learner.PromptLearner(args)
  net = learner._network
  learner._cur_task, learner._known_classes, learner._total_classes = k_t // s_t, k_t, k_t + s_t
  net.initialize_fc(k_t + s_t, k_t // s_t)
  with torch.no_grad():
    net.fc.weight[:k_t] = torch.randn(k_t, net.fc.weight.shape[1])
  init_s = time.perf_counter() - t0
  x = torch.rand(batch, 3, geo.image_size, geo.image_size)
  y = k_t + torch.randint(0, s_t, (batch,))
  loader = [(None, x, y)]
  if cfg["phase"] == "train":
    call = lambda _i: learner._train(loader)  # noqa: E731
  else:
    call = lambda _i: learner._eval_results(loader)  # noqa: E731
  import contextlib
  import io

  with contextlib.redirect_stderr(io.StringIO()):  # tqdm
    _, timing = harness.time_calls(call, cfg["repeats"], batch)
  return {
    **cfg,
    "batch": batch,
    "framework": "official",
    "torch": torch.__version__,
    "threads": torch.get_num_threads(),
    "init_s": init_s,
    **timing,
    "peak_rss_bytes": harness.peak_rss_bytes(),
    "load_avg": os.getloadavg()[0],
  }
