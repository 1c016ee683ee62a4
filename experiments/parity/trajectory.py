"""Trajectory parity: the demo's 5-task sequence trained by the official code and by ntkcl-jax.

  python -m experiments.parity.trajectory --official /tmp/ntkcl_official [--epochs 3] \
      [--train-per-class 200] [--json out.json]

Setting (the demo, `experiments/configs/demo.py`): Split Animal-MNIST, class order seed 0, 5 tasks
x 2 classes, the shipped tiny ViT (28 px, patch 4, width 64, depth 4; 50 tokens), lr 0.02,
batch 32, weight decay 5e-3, λ_MI 0.2, reference mode. Differences from the demo, all so that the
two runs see exactly the same thing: no augmentation (train images go through the test transform,
resize 32 + centre crop 28), dropout off in both (official: rates 0 on the instances;
ntkcl-jax: `loss_fn(..., deterministic=True)`), `--train-per-class` training images per class
(first ones of the fixed split; 200 of 800 by default, for CPU time; `--test-per-class` likewise) and `--epochs` (3 as the demo).

Identical starting point: ntkcl-jax's `init_params` (both banks, fusion; the L_reg snapshot = the
init) and each task's `init_proxy_head(fold_in(key, t))` are loaded into the official modules
through `mapping.TABLE` (the official `initialize_fc` is wrapped to overwrite its fresh proxy head).
Identical batches: the official run goes first, unmodified (`incremental_train`, `_eval_results`,
`after_task` with a stand-in data manager over the same arrays, `num_workers=0`); the order its
`DataLoader` drew is recorded (`__getitem__` of the training set) and replayed to ntkcl-jax,
padded to the batch size with a validity mask. Its L_MI rows (`torch.randperm(n_old)`) and each
task's orthogonality basis (`torch.linalg.svd`; not unique below 40 classes) are recorded and
given to ntkcl-jax (`aux["mi_rows"]`, `aux["orth_basis"]`). Patches 4-6 of `official.py` apply.

ntkcl-jax side: the project's public functions in the order of SPEC 2.4 (`ours.sgd_step`, the
step `ours.py` also uses: `loss_fn` and `make_optimizer`, re-initialised per task; per-epoch
cosine lr, `ema_update` after every task but the last, class-mean prototypes of the eval feature,
`section_weighted_logits` argmax over seen classes), not `train.run` (its data stream draws its
own order and augmentation).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time

import numpy as np

from experiments.parity import mapping, official

GEO = official.Geometry(image_size=28, patch_size=4, width=64, depth=4, num_heads=4, mlp_dim=128)
NUM_TASKS, INC, BATCH, LR, WD, NCE = 5, 2, 32, 0.02, 5e-3, 0.2


def load_data(train_per_class: int, test_per_class: int = 200):
  from ntkcl_jax.data.class_order import class_order, relabel
  from ntkcl_jax.data.sources import animal_mnist
  from ntkcl_jax.data.transforms import test_transform_batch

  order = class_order(0, 10)
  out = {}
  for split in ("train", "test"):
    src = animal_mnist(split)
    y = relabel(src.labels, order)
    idx = np.arange(len(src))
    keep = train_per_class if split == "train" else test_per_class
    idx = np.concatenate([idx[y == c][:keep] for c in range(10)])
    x = test_transform_batch(src.images(idx), 28, 32)
    out[split] = (x.astype(np.float32), y[idx].astype(np.int64))
  return out


def init_ours(seed: int = 0):
  import jax

  from ntkcl_jax.models.ntkcl import ModelSpec, init_params
  from ntkcl_jax.models.vit import ViTSpec, load_augreg
  from ntkcl_jax.train_step import init_proxy_head

  vit = ViTSpec(GEO.image_size, GEO.patch_size, GEO.width, GEO.depth, GEO.num_heads, GEO.mlp_dim)
  spec = ModelSpec(vit=vit, fixed_197_tokens=False, remat="none")
  key = jax.random.key(seed)
  params = init_params(spec, key, backbone=load_augreg(_asset(), vit))
  proxies = [
    init_proxy_head(jax.random.fold_in(key, 1000 + t), spec.feature_dim, INC)
    for t in range(NUM_TASKS)
  ]
  to_np = lambda t: jax.tree_util.tree_map(np.asarray, t)  # noqa: E731
  return spec, to_np(params), [to_np(p) for p in proxies]


def _asset() -> str:
  import importlib.resources

  return str(importlib.resources.files("ntkcl_jax") / "assets" / "tiny_vit_fmnist.npz")


def run_official(official_dir, data, params, proxies, epochs):
  import torch
  from torch.utils.data import Dataset

  torch.manual_seed(0)
  off = official.load(official_dir, num_tokens=GEO.num_tokens)
  off.timm.set_checkpoint(_asset())
  official.patch_geometry(off, GEO)
  args = official.official_args(
    off.dir,
    "cifar224",
    init_cls=INC,
    increment=INC,
    batch_size=BATCH,
    init_lr=LR,
    later_lr=LR,
    weight_decay=WD,
    nce_temp=NCE,
    init_epochs=epochs,
    later_epochs=epochs,
    hidden_size=GEO.width,
    num_workers=0,
    use_init_ptm=False,
    nb_tasks=NUM_TASKS,
  )
  args.dataset = "kvasir"  # only sets top-k = 1 (top-5 of 2 classes would fail at task 0)
  learner = off.learner.PromptLearner(args)
  net = learner._network
  official.set_dropout(net, 0.0)
  tree = {**params, "reg_snapshot": {"peft": params["peft"]["current"], "fusion": params["fusion"]}}
  named = dict(net.named_parameters())
  skip = ("backbone.patch_embed", "backbone.cls_token", "backbone.pos_embed", "backbone.blocks.")
  skip += ("backbone.norm.",)
  names = [n for n in named if not n.startswith(skip)]
  with torch.no_grad():
    for n, v in mapping.project_to_official(tree, names).items():
      named[n].copy_(torch.from_numpy(np.array(v)))
  orig_init_fc = net.initialize_fc

  def initialize_fc(nb_classes, cur_task):  # overwrite the fresh proxy head with ours
    orig_init_fc(nb_classes, cur_task)
    vals = mapping.project_to_official(
      {"proxy_head": proxies[cur_task]}, ["proxy_fc.weight", "proxy_fc.sigma"]
    )
    with torch.no_grad():
      net.proxy_fc.weight.copy_(torch.from_numpy(vals["proxy_fc.weight"]))
      net.proxy_fc.sigma.copy_(torch.from_numpy(vals["proxy_fc.sigma"]))

  net.initialize_fc = initialize_fc
  log = {"order": [], "randperm": [], "svd_u": []}

  class DS(Dataset):
    def __init__(self, x, y, idx, record):
      self.x, self.y, self.idx, self.record = x, y, idx, record
      self.labels = y[idx]

    def __len__(self):
      return len(self.idx)

    def __getitem__(self, i):
      j = int(self.idx[i])
      if self.record:
        log["order"].append(j)
      return j, torch.from_numpy(self.x[j]).permute(2, 0, 1), int(self.y[j])

  class DataManager:
    nb_tasks = NUM_TASKS

    def get_task_size(self, t):
      return INC

    def get_dataset(self, classes, source, mode):
      x, y = data[source]
      idx = np.flatnonzero(np.isin(y, classes))
      return DS(x, y, idx, record=(source == "train" and mode == "train"))

  orig_randperm, orig_svd = torch.randperm, torch.linalg.svd

  def randperm(n, *a, **k):
    out = orig_randperm(n, *a, **k)
    log["randperm"].append((int(n), out.clone()))
    return out

  def svd(*a, **k):
    out = orig_svd(*a, **k)
    log["svd_u"].append(out[0].detach().clone())
    return out

  res = {"acc": [], "pred": [], "orders": [], "mi_rows": [], "basis": []}
  dm = DataManager()
  torch.randperm, torch.linalg.svd = randperm, svd
  try:
    for t in range(NUM_TASKS):
      n_log, n_rp, n_svd = len(log["order"]), len(log["randperm"]), len(log["svd_u"])
      learner.incremental_train(dm)
      y_pred, y_true = learner._eval_results(learner.test_loader)
      learner.after_task()
      res["acc"].append(float((y_pred[:, 0] == y_true).mean() * 100))
      res["pred"].append(y_pred[:, 0].copy())
      res["orders"].append(np.asarray(log["order"][n_log:]))
      k_t = t * INC
      res["mi_rows"].append([p.numpy() for n, p in log["randperm"][n_rp:] if n == k_t])
      res["basis"].append(log["svd_u"][n_svd].numpy()[:, :40])
  finally:
    torch.randperm, torch.linalg.svd = orig_randperm, orig_svd
  return res


def run_ours(spec, data, params, proxies, off_res, epochs):
  import jax
  import jax.numpy as jnp

  from experiments.parity.ours import sgd_step
  from ntkcl_jax import losses
  from ntkcl_jax.ema import ema_update
  from ntkcl_jax.models.heads import section_weighted_logits
  from ntkcl_jax.models.ntkcl import NTKCL
  from ntkcl_jax.optim import make_optimizer
  from ntkcl_jax.train_step import TaskInfo, make_feature_fn

  model = NTKCL(spec)
  weights = losses.LossWeights(mi=NCE, mi_sign=-1, orth=1e-4, reg=1e-3)
  tx = make_optimizer(WD)
  xtr, ytr = data["train"]
  xte, yte = data["test"]

  step = jax.jit(functools.partial(sgd_step, model=model, weights=weights, tx=tx, batch_size=BATCH))

  feat = jax.jit(make_feature_fn(model))
  backbone = jax.tree_util.tree_map(jnp.asarray, params["backbone"])
  cur = jax.tree_util.tree_map(jnp.asarray, params["peft"]["current"])
  ema = jax.tree_util.tree_map(jnp.asarray, params["peft"]["ema"])
  fusion = jax.tree_util.tree_map(jnp.asarray, params["fusion"])
  snap = {"peft": cur, "fusion": fusion}
  protos = np.zeros((10, spec.feature_dim), np.float32)
  res = {"acc": [], "pred": []}
  sw = (0.3, 0.1)
  for t in range(NUM_TASKS):
    k = t * INC
    trainable = {
      "peft": {"current": cur},
      "fusion": fusion,
      "proxy_head": jax.tree_util.tree_map(jnp.asarray, proxies[t]),
    }
    opt_state = tx.init(trainable)
    frozen = {"backbone": backbone, "peft": {"ema": ema}}
    aux = {
      "task": TaskInfo.make(k, INC, k, True),
      "prototypes": jnp.asarray(protos),
      "orth_basis": jnp.asarray(off_res["basis"][t], jnp.float32),
      "reg_snapshot": snap,
    }
    order = off_res["orders"][t]
    n_t = int(np.isin(ytr, np.arange(k, k + INC)).sum())
    assert len(order) == epochs * n_t, (len(order), epochs, n_t)
    mi_rows = iter(off_res["mi_rows"][t])
    for e in range(epochs):
      lr = 0.5 * LR * (1 + math.cos(math.pi * e / epochs))
      ep = order[e * n_t : (e + 1) * n_t]
      for b0 in range(0, n_t, BATCH):
        idx = ep[b0 : b0 + BATCH]
        pad = BATCH - len(idx)
        rows = np.full(8, -1, np.int32)
        r = next(mi_rows)[:BATCH]
        rows[: len(r)] = r
        batch = {
          "image": jnp.asarray(
            np.concatenate([xtr[idx], np.zeros((pad, *xtr.shape[1:]), np.float32)])
          ),
          "label": jnp.asarray(np.concatenate([ytr[idx], np.full(pad, k)]), jnp.int32),
          "mask": jnp.asarray(np.arange(BATCH) < len(idx)),
        }
        _, _, trainable, opt_state = step(
          trainable, opt_state, frozen, {**aux, "mi_rows": jnp.asarray(rows)}, batch, lr
        )
    cur, fusion = trainable["peft"]["current"], trainable["fusion"]
    if t < NUM_TASKS - 1:  # Q5 reference: no EMA update after the last task
      ema = ema_update(ema, cur, t)
    full = {"backbone": backbone, "peft": {"current": cur, "ema": ema}, "fusion": fusion}
    for c in range(k, k + INC):
      xs = xtr[ytr == c]
      f = np.concatenate(
        [np.asarray(feat(full, jnp.asarray(xs[i : i + 256]))) for i in range(0, len(xs), 256)]
      )
      protos[c] = f.mean(0)
    seen = yte < k + INC
    xs, ys = xte[seen], yte[seen]
    preds = []
    for i in range(0, len(xs), 256):
      m = feat(full, jnp.asarray(xs[i : i + 256]))
      logits = np.asarray(section_weighted_logits(m, jnp.asarray(protos[: k + INC]), sw))
      preds.append(logits.argmax(-1))
    pred = np.concatenate(preds)
    res["acc"].append(float((pred == ys).mean() * 100))
    res["pred"].append(pred)
    snap = {"peft": cur, "fusion": fusion}
  return res


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--official", required=True)
  ap.add_argument("--epochs", type=int, default=3)
  ap.add_argument("--train-per-class", type=int, default=200)
  ap.add_argument("--test-per-class", type=int, default=200, help="200 = the whole test split")
  ap.add_argument("--json", default=None)
  a = ap.parse_args(argv)
  t0 = time.time()
  data = load_data(a.train_per_class, a.test_per_class)
  spec, params, proxies = init_ours()
  off = run_official(a.official, data, params, proxies, a.epochs)
  t1 = time.time()
  ours = run_ours(spec, data, params, proxies, off, a.epochs)
  t2 = time.time()
  agree = [float((o == p).mean() * 100) for o, p in zip(off["pred"], ours["pred"])]
  out = {
    "epochs": a.epochs,
    "train_per_class": a.train_per_class,
    "test_per_class": a.test_per_class,
    "official_acc": off["acc"],
    "ours_acc": ours["acc"],
    "acc_diff": [o - p for o, p in zip(ours["acc"], off["acc"])],
    "agreement_per_task": agree,
    "final_agreement": agree[-1],
    "seconds": {"official": round(t1 - t0, 1), "ours": round(t2 - t1, 1)},
  }
  print(f"{'task':>4} {'official %':>10} {'ntkcl-jax %':>11} {'diff':>6} {'same pred %':>11}")
  for t in range(NUM_TASKS):
    print(
      f"{t:4d} {off['acc'][t]:10.2f} {ours['acc'][t]:11.2f} {out['acc_diff'][t]:6.2f} {agree[t]:11.2f}"
    )
  print(json.dumps(out))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(out, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
