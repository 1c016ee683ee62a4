"""Runs one official NTK-CL training step on a parity case and writes the fixture `.npz`.

  pip install torch==2.13.0   # CPU wheel; torch is not a project dependency
  python -m experiments.parity.make_fixture --official /tmp/ntkcl_official --case tiny \
      --out tests/fixtures/parity_tiny.npz
  python -m experiments.parity.make_fixture --official DIR --case all     # the three tiny cases

`--official` is an extracted `Programmergg/NTK-CL` checkout (git archive 24de712), run unmodified
through the stand-ins and patches listed in `experiments/parity/official.py`.

The step runs twice, in float32 and in float64 (torch default dtype), on the same inputs
(`cases.make_inputs`). The fixture holds, for every quantity q, the float64 value `ref/<q>` and
the float32 noise floor `floor/<q>` = max|q_f32 − q_f64| (a scalar), plus `meta` (JSON) and the
draws the official step made that a port must be given: `in/mi_rows` (its `randperm` subset of
old prototype rows) and, when the basis is not unique, `in/orth_basis`. Quantities:
  features/pass_{ptm,c_ema,c_cur,p_ema,p_cur}, features/{c,p,m}   train forward (dropout rate 0)
  features/eval_{c,p,m}, logits/proto_{c,p,m}                     eval forward, prototype logits
  logits/proxy_{c,p,m}                                            proxy head in the train forward
  losses/{ce_c,ce_p,ce_m,mi,orth,reg,total}                        L_MI is the un-negated nce_loss
  grads/<official name>     every parameter of the official trainable set (`requires_grad`)
  sgd/<official name>       after one official `optimizer.step()` (SGD, momentum 0.9, wd)
  ema/<official name>       the "pre_" (EMA) bank after `update_ema(..., update_ratios(t))`
  basis/projector           U_r U_rᵀ of the official SVD's first r = rank(prototypes) columns
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
from typing import Any

import numpy as np

from experiments.parity import cases as cases_mod
from experiments.parity import mapping, official

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _flatten_for_official(tree) -> dict[str, Any]:
  return mapping.flatten(tree)


def run_official(off, case: cases_mod.Case, inputs: dict, dtype, basis=None) -> dict[str, Any]:
  """One official step in `dtype`; returns {quantity: np.ndarray} and the recorded draws."""
  import torch

  torch.set_default_dtype(dtype)
  torch.manual_seed(case.seed)
  geo = case.geometry
  tmp = pathlib.Path(tempfile.gettempdir()) / "ntkcl_parity"
  tmp.mkdir(exist_ok=True)
  ckpt = tmp / f"augreg_{case.name}_{os.getpid()}.npz"
  np.savez(ckpt, **inputs["backbone"])
  off.timm.set_checkpoint(str(ckpt))
  official.patch_geometry(off, geo)
  args = official.official_args(
    off.dir,
    case.dataset,
    init_cls=case.new,
    increment=case.new,
    batch_size=case.batch,
    init_epochs=1,
    later_epochs=1,
    hidden_size=geo.width,
    nb_tasks=case.task + 2,
  )
  assert bool(args.use_init_ptm) == inputs["use_init_ptm"]
  learner = off.learner.PromptLearner(args)
  net = learner._network
  learner._cur_task, learner._known_classes = case.task, case.known
  learner._total_classes = case.num_seen
  net.initialize_fc(case.num_seen, case.task)

  # Load the case's values through the one mapping table.
  named = dict(net.named_parameters())
  frozen_prefixes = ("backbone.patch_embed", "backbone.cls_token", "backbone.pos_embed")
  frozen_prefixes += ("backbone.blocks.", "backbone.norm.", "fc.")
  covered = [n for n in named if not n.startswith(frozen_prefixes)]
  tree = {
    **inputs["params"],
    "proxy_head": inputs["proxy_head"],
    "reg_snapshot": inputs["reg_snapshot"],
  }
  values = mapping.project_to_official(tree, covered)
  with torch.no_grad():
    for n, v in values.items():
      assert tuple(named[n].shape) == v.shape, (n, named[n].shape, v.shape)
      named[n].copy_(torch.from_numpy(np.asarray(v)))
    net.fc.weight.copy_(torch.from_numpy(inputs["prototypes"]))
  x = torch.from_numpy(inputs["images"]).permute(0, 3, 1, 2).to(dtype).contiguous()
  y = torch.from_numpy(inputs["labels"])
  out: dict[str, Any] = {}

  # Eval forward (prototype logits) with the pre-step parameters, as `_eval_results` does.
  net.eval()
  with torch.no_grad():
    c_out, p_out, m_out, _ = net(x, test=True)
  for k, o in (("c", c_out), ("p", p_out), ("m", m_out)):
    out[f"features/eval_{k}"] = o["features"]
    out[f"logits/proto_{k}"] = o["logits"]
  with torch.no_grad():
    out["losses/reg"] = official.reg_loss(net)

  # The training step: `_train` on a one-batch loader, dropout rates 0 (patch 6).
  official.set_dropout(net, 0.0)
  trainable = [n for n, p in net.named_parameters() if p.requires_grad]
  orig_svd, own_u = torch.linalg.svd, []
  if basis is not None:  # non-unique basis: every run gets the same one

    def fed_svd(a, full_matrices=True):
      u, s, v = orig_svd(a, full_matrices=full_matrices)
      own_u.append(u.detach().clone())  # the official SVD's own basis, for the invariant check
      u = u.clone()
      u[:, : basis.shape[1]] = torch.from_numpy(basis).to(u.dtype)
      return u, s, v

    torch.linalg.svd = fed_svd
  torch.manual_seed(case.seed)  # the step's own draws (L_MI rows) equal in both dtypes
  try:
    with official.recording(off, net) as rec:
      learner._train([(None, x, y)])
  finally:
    torch.linalg.svd = orig_svd
  (ch, pa, mx, orth), mi = rec["forward"][0], rec["mi"][0]
  names = (["pass_ptm"] if args.use_init_ptm else []) + [
    "pass_c_ema",
    "pass_c_cur",
    "pass_p_ema",
    "pass_p_cur",
  ]
  assert len(rec["cls"]) == len(names), len(rec["cls"])
  for n, v in zip(names, rec["cls"]):
    out[f"features/{n}"] = v
  for k, o in (("c", ch), ("p", pa), ("m", mx)):
    out[f"features/{k}"] = o["features"]
    out[f"logits/proxy_{k}"] = o["logits"]
  ce = rec["ce"]
  out["losses/ce_c"], out["losses/ce_p"], out["losses/ce_m"] = ce
  out["losses/mi"], out["losses/orth"] = mi, orth
  nz = lambda t: torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)  # noqa: E731
  out["losses/total"] = (
    ce[0]
    + ce[1]
    + ce[2]
    + nz(-mi) * args.nce_temp
    + nz(orth) * args.dis_temp
    + nz(out["losses/reg"]) * args.reg_temp
  )
  for n, p in net.named_parameters():
    if p.requires_grad:
      out[f"grads/{n}"] = p.grad
      out[f"sgd/{n}"] = p
  bb = net.backbone
  bb.update_ema(
    bb.channel_prompt_list, bb.pre_channel_prompt_list, off.learner.update_ratios(case.task)
  )
  bb.update_ema(
    bb.patch_prompt_list, bb.pre_patch_prompt_list, off.learner.update_ratios(case.task)
  )
  for n, p in net.named_parameters():
    if n.startswith(("backbone.pre_channel", "backbone.pre_patch")):
      out[f"ema/{n}"] = p
  out = {k: v.detach().cpu().numpy().astype(np.float64) for k, v in out.items()}
  u = (own_u or rec["svd_u"])[0].detach().cpu().numpy().astype(np.float64)
  rank = int(np.linalg.matrix_rank(inputs["prototypes"].astype(np.float64)))
  # The first r = min(rank, 40) columns span a unique subspace (distinct singular values): their
  # projector does not depend on the SVD's sign or completion choices.
  r = min(rank, 40)
  out["basis/projector"] = u[:, :r] @ u[:, :r].T
  draws = {
    "mi_rows": rec["randperm"][0][: case.batch].numpy().astype(np.int64),
    "rank": rank,
    "trainable": trainable,
    "args": {
      k: getattr(args, k)
      for k in (
        "init_lr",
        "weight_decay",
        "nce_temp",
        "dis_temp",
        "reg_temp",
        "alpha",
        "beta",
        "gamma",
        "use_init_ptm",
        "increment",
        "batch_size",
      )
    },
  }
  torch.set_default_dtype(torch.float32)
  return {"q": out, "draws": draws}


def make(official_dir: str, case: cases_mod.Case, out_path: pathlib.Path) -> dict[str, float]:
  import torch

  off = official.load(official_dir, num_tokens=case.geometry.num_tokens)
  inputs = cases_mod.make_inputs(case)
  basis = None
  if case.feed_basis:
    w = inputs["prototypes"].astype(np.float64)
    w = w / np.sqrt(np.maximum((w * w).sum(1, keepdims=True), 1e-24))
    basis = np.linalg.svd(w.T, full_matrices=True)[0][:, :40]
  r32 = run_official(off, case, inputs, torch.float32, basis)
  r64 = run_official(off, case, inputs, torch.float64, basis)
  d32, d64 = r32["draws"], r64["draws"]
  if not np.array_equal(d32["mi_rows"], d64["mi_rows"]):
    raise RuntimeError("float32 and float64 runs drew different L_MI rows.")
  arrays: dict[str, np.ndarray] = {}
  floors = {}
  for k, v64 in r64["q"].items():
    v32 = r32["q"][k]
    floors[k] = float(np.max(np.abs(v32 - v64))) if v64.size else 0.0
    arrays[f"ref/{k}"] = v64
    arrays[f"floor/{k}"] = np.float64(floors[k])
  arrays["in/mi_rows"] = d64["mi_rows"]
  if basis is not None:
    arrays["in/orth_basis"] = basis
  meta = {
    "case": case.name,
    "geometry": vars(case.geometry) if hasattr(case.geometry, "__dict__") else None,
    "dataset": case.dataset,
    "task": case.task,
    "known": case.known,
    "new": case.new,
    "batch": case.batch,
    "seed": case.seed,
    "feed_basis": case.feed_basis,
    "rank": d64["rank"],
    "inputs_sha256": cases_mod.inputs_sha256(inputs),
    "official_trainable": d64["trainable"],
    "official_args": d64["args"],
    "official_commit": _commit(official_dir),
    "torch": torch.__version__,
  }
  arrays["meta"] = np.array(json.dumps(meta))
  out_path.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(out_path, **arrays)
  return floors


def _commit(official_dir: str) -> str:
  p = pathlib.Path(official_dir) / ".parity_commit"
  return p.read_text().strip() if p.exists() else "24de712 (git archive; not recorded in the tree)"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--official", required=True, help="extracted NTK-CL checkout")
  ap.add_argument(
    "--case", default="all", help=f"one of {sorted(cases_mod.CASES)} or 'all' (the tiny ones)"
  )
  ap.add_argument(
    "--out", default=None, help="output .npz (default tests/fixtures/parity_<case>.npz)"
  )
  a = ap.parse_args(argv)
  names = [n for n in cases_mod.CASES if n != "vitb16"] if a.case == "all" else [a.case]
  for n in names:
    out = (
      pathlib.Path(a.out)
      if a.out and len(names) == 1
      else ROOT / "tests" / "fixtures" / f"parity_{n}.npz"
    )
    floors = make(a.official, cases_mod.CASES[n], out)
    print(
      f"{n}: wrote {out} ({out.stat().st_size / 1e3:.0f} kB, {len(floors)} quantities)",
      file=sys.stderr,
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
