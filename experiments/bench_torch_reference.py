"""PyTorch baseline of the official NTK-CL train and eval steps, timed like `bench_step.py`.

Commands (from the repository root; PyTorch is NOT a project dependency, install the CPU wheel
first with ``pip install torch==2.13.0``, which these machines serve from a local wheel)::

  python experiments/bench_torch_reference.py --size tiny --threads 1        # smoke run
  python experiments/bench_torch_reference.py --size vitb --counts-only      # build, check counts
  python experiments/bench_torch_reference.py --size vitb --repeats 3 --json # the baseline
  python experiments/bench_torch_reference.py --size vitb --ptm on --phase train

Why: the official code (`Programmergg/NTK-CL` at 24de712, PyTorch 2.0.1 + timm 0.6.12) cannot run
here (timm 0.6.12 imports torchvision, which cannot be imported on these machines). This file is a
self-contained re-implementation of the *computation* of its training and test steps: the same
passes, the same matmuls in the same shapes, the same autograd graph and the same optimiser, on
random weights (the cost does not depend on them), float32, so that `bench_step.py`'s JAX step can
be compared with it on the same CPUs. It was written from reading the official source; none of
its code is reused.

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
state during task 1).

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
import dataclasses
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

try:
  import torch
  import torch.nn.functional as F
except ImportError:  # the parent prints how to install it
  torch = None
  F = None


@dataclasses.dataclass(frozen=True)
class Geometry:
  """ViT and PEFT geometry of one size."""

  image_size: int = 224
  patch_size: int = 16
  channels: int = 3
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  adapter_dim: int = 16
  num_prompts: int = 10
  ln_eps: float = 1e-6

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_tokens(self) -> int:
    return 1 + self.num_patches


SIZES = {
  # name -> (geometry, batch, num_classes C, task (k_t, s_t), check the ViT-B parameter counts)
  "vitb": (Geometry(), 16, 100, (10, 10), True),
  "tiny": (
    Geometry(image_size=32, patch_size=4, width=64, depth=2, num_heads=4, mlp_dim=256),
    16,
    10,
    (2, 2),
    False,
  ),
}

# Official hyper-parameters (main.py defaults and the cifar224 entry; SPEC §2.6).
ADAPTER_SCALE = 0.1
ADAPTER_DROPOUT = 0.1
PROMPT_CARRY = 0.1
FUSION_HEADS = 8
FUSION_DROPOUT = 0.1
ORTH_K = 40
MI_TAU = 0.1
NCE_TEMP = 0.03  # λ_MI for CIFAR-100 (the batch-16 benchmark)
DIS_TEMP = 1e-4  # λ_orth
REG_TEMP = 1e-3  # λ_reg
LR, MOMENTUM, WEIGHT_DECAY = 0.025, 0.9, 5e-4
SECTION_WEIGHTS = {False: (0.3, 0.1), True: (1.0, 0.3, 0.1)}  # (γ, α) / (β, γ, α)
TOPK = 5

VITB_COUNTS = {
  "backbone": 85_798_656,
  "bank": 346_512,
  "adapters": 12 * 25_360,
  "prompt_generators": 12 * 3_516,
  "fusion": {False: 7_082_496, True: 15_932_160},
}


# ------------------------------------------------------------------------------------------------
# Parameters (plain tensors; nn.Linear / nn.LayerNorm / nn.Conv2d compute exactly these F calls).


def _uniform(gen: torch.Generator, shape: tuple[int, ...], bound: float) -> torch.Tensor:
  return (torch.rand(shape, generator=gen) * 2.0 - 1.0) * bound


def _linear(gen: torch.Generator, fan_in: int, fan_out: int) -> dict[str, torch.Tensor]:
  """PyTorch Linear default init: weight (out, in) and bias (out,) ~ U(±1/√in)."""
  bound = fan_in**-0.5
  return {
    "weight": _uniform(gen, (fan_out, fan_in), bound),
    "bias": _uniform(gen, (fan_out,), bound),
  }


def _layer_norm_params(width: int, value: float = 1.0) -> dict[str, torch.Tensor]:
  return {"weight": torch.full((width,), value), "bias": torch.zeros(width)}


def build_backbone(g: Geometry, gen: torch.Generator) -> dict[str, Any]:
  """Random ViT (frozen): patch conv (d, C, P, P), cls (1, 1, d), pos (1, N, d), blocks, norm."""
  d, m = g.width, g.mlp_dim
  blocks = []
  for _ in range(g.depth):
    blocks.append(
      {
        "norm1": _layer_norm_params(d),
        "q": _linear(gen, d, d),
        "k": _linear(gen, d, d),
        "v": _linear(gen, d, d),
        "proj": _linear(gen, d, d),
        "norm2": _layer_norm_params(d),
        "fc1": _linear(gen, d, m),
        "fc2": _linear(gen, m, d),
      }
    )
  fan_in = g.channels * g.patch_size**2
  return {
    "patch": {
      "weight": _uniform(gen, (d, g.channels, g.patch_size, g.patch_size), fan_in**-0.5),
      "bias": _uniform(gen, (d,), fan_in**-0.5),
    },
    "cls": torch.randn((1, 1, d), generator=gen) * 0.02,
    "pos": torch.randn((1, g.num_tokens, d), generator=gen) * 0.02,
    "blocks": blocks,
    "norm": _layer_norm_params(d),
  }


def build_bank(g: Geometry, gen: torch.Generator) -> dict[str, list[dict[str, Any]]]:
  """One PEFT bank with the official init: per block an adapter (down kaiming-uniform, a = √5,
  i.e. U(±1/√d), bias 0; up all zero) and a prompt generator (mix (n_p, N) and LayerNorm all
  zero)."""
  d, r, n_p, n = g.width, g.adapter_dim, g.num_prompts, g.num_tokens
  adapters, prompts = [], []
  for _ in range(g.depth):
    adapters.append(
      {
        "down": {"weight": _uniform(gen, (r, d), d**-0.5), "bias": torch.zeros(r)},
        "up": {"weight": torch.zeros(d, r), "bias": torch.zeros(d)},
      }
    )
    prompts.append(
      {
        "mix": {"weight": torch.zeros(n_p, n), "bias": torch.zeros(n_p)},
        "norm": _layer_norm_params(d, 0.0),
      }
    )
  return {"adapters": adapters, "prompts": prompts}


def build_fusion(dim: int, gen: torch.Generator) -> dict[str, Any]:
  """AttentionFusion(D): query, key, value Linear D→D with bias (PyTorch default init)."""
  return {name: _linear(gen, dim, dim) for name in ("query", "key", "value")}


def tensors(tree: Any) -> list[torch.Tensor]:
  """All tensors of a nested dict/list, in a fixed order."""
  if isinstance(tree, torch.Tensor):
    return [tree]
  items = tree.values() if isinstance(tree, dict) else tree
  return [t for x in items for t in tensors(x)]


def named_tensors(tree: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
  if isinstance(tree, torch.Tensor):
    return [(prefix, tree)]
  items = tree.items() if isinstance(tree, dict) else enumerate(tree)
  return [nt for k, x in items for nt in named_tensors(x, f"{prefix}/{k}" if prefix else str(k))]


def count(tree: Any) -> int:
  return sum(t.numel() for t in tensors(tree))


def build_model(
  g: Geometry, use_ptm: bool, k_t: int, s_t: int, num_classes: int, seed: int = 0
) -> dict[str, Any]:
  """Backbone, EMA and current banks, fusion, regularisation snapshot, proxy head, prototypes.

  Trainable (requires_grad): the current bank, the fusion and the proxy head, as in the official
  `vit_base_patch16_224_*` freezing and `PromptNet.initialize_fc`. Prototypes: `train_fc`
  (k_t + s_t, D) with k_t random old rows and s_t zero rows (official state during a task);
  `eval_fc` (C, D) with the k_t + s_t seen rows random.
  """
  gen = torch.Generator().manual_seed(seed)
  feat = g.width * (3 if use_ptm else 2)
  model = {
    "backbone": build_backbone(g, gen),
    "ema": build_bank(g, gen),
    "current": build_bank(g, gen),
  }
  model["fusion"] = build_fusion(feat, gen)
  # `reg_*` deep copies of the current bank and fusion (frozen; L_reg targets, official layout)
  model["reg"] = {
    "bank": _clone_tree(model["current"]),
    "fusion": _clone_tree(model["fusion"]),
  }
  model["proxy"] = {
    "weight": _uniform(gen, (s_t, feat), feat**-0.5),
    "sigma": torch.ones(1),
  }
  train_fc = torch.zeros(k_t + s_t, feat)
  train_fc[:k_t] = torch.randn((k_t, feat), generator=gen)
  eval_fc = torch.zeros(num_classes, feat)
  eval_fc[: k_t + s_t] = torch.randn((k_t + s_t, feat), generator=gen)
  model["train_fc"], model["eval_fc"], model["fc_sigma"] = train_fc, eval_fc, torch.ones(1)
  for t in tensors(model):
    t.requires_grad_(False)
  for t in tensors([model["current"], model["fusion"], model["proxy"]]):
    t.requires_grad_(True)
  return model


def _clone_tree(tree: Any) -> Any:
  if isinstance(tree, torch.Tensor):
    return tree.detach().clone()
  if isinstance(tree, dict):
    return {k: _clone_tree(v) for k, v in tree.items()}
  return [_clone_tree(v) for v in tree]


def parameter_counts(model: dict[str, Any], use_ptm: bool, check: bool) -> dict[str, int]:
  """Counts of the backbone, one bank (adapters, prompt generators) and the fusion; with `check`
  asserts the ViT-B/16 values of SPEC §2.2."""
  counts = {
    "backbone": count(model["backbone"]),
    "bank": count(model["current"]),
    "adapters": count(model["current"]["adapters"]),
    "prompt_generators": count(model["current"]["prompts"]),
    "ema_bank": count(model["ema"]),
    "fusion": count(model["fusion"]),
    "proxy_head": count(model["proxy"]),
    "trainable": sum(t.numel() for t in tensors(model) if t.requires_grad),
  }
  if check:
    for key in ("backbone", "bank", "adapters", "prompt_generators"):
      assert counts[key] == VITB_COUNTS[key], (key, counts[key], VITB_COUNTS[key])
    assert counts["ema_bank"] == VITB_COUNTS["bank"], counts["ema_bank"]
    assert counts["fusion"] == VITB_COUNTS["fusion"][use_ptm], counts["fusion"]
  return counts


# ------------------------------------------------------------------------------------------------
# Forward (official computation order and shapes).


def _lin(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
  return F.linear(x, p["weight"], p["bias"])


def _ln(x: torch.Tensor, p: dict[str, torch.Tensor], eps: float) -> torch.Tensor:
  return F.layer_norm(x, (x.shape[-1],), p["weight"], p["bias"], eps)


def attention(x: torch.Tensor, p: dict[str, Any], heads: int) -> torch.Tensor:
  """(B, n, d) -> (B, n, d): separate q/k/v Linears, per-head bmm, softmax, output projection."""
  b, n, d = x.shape
  hd = d // heads

  def split(t):  # (B, n, d) -> (B·heads, n, hd), contiguous like the official `_shape`
    return t.view(b, n, heads, hd).transpose(1, 2).contiguous().view(b * heads, n, hd)

  k, v, q = split(_lin(x, p["k"])), split(_lin(x, p["v"])), split(_lin(x, p["q"]))
  scores = torch.bmm(q, k.transpose(1, 2)) * hd**-0.5
  out = torch.bmm(scores.softmax(dim=-1), v)
  return _lin(out.view(b, heads, n, hd).transpose(1, 2).reshape(b, n, d), p["proj"])


def mlp(x: torch.Tensor, p: dict[str, Any], eps: float) -> torch.Tensor:
  """fc2(GELU(fc1(LN2(x)))), (B, n, d) -> (B, n, d)."""
  return _lin(F.gelu(_lin(_ln(x, p["norm2"], eps), p["fc1"])), p["fc2"])


def adapter(h: torch.Tensor, p: dict[str, Any], training: bool) -> torch.Tensor:
  """(B, n, d) -> (B, n, d): up(dropout(relu(down(h)))) · 0.1."""
  z = F.dropout(F.relu(_lin(h, p["down"])), ADAPTER_DROPOUT, training)
  return _lin(z, p["up"]) * ADAPTER_SCALE


def prompt_generator(h: torch.Tensor, p: dict[str, Any], g: Geometry) -> torch.Tensor:
  """(B, N or N + n_p, d) -> (B, N + n_p, d): new prompts from the token-axis Linear + LN,
  carried prompts (recognised by the sequence length) cut out and added ×0.1."""
  n_p = g.num_prompts
  carried = None
  if h.shape[1] == g.num_tokens + n_p:
    carried = h[:, 1 : 1 + n_p]
    h = torch.cat((h[:, :1], h[:, 1 + n_p :]), dim=1)
  u = _lin(h.transpose(2, 1), p["mix"]).transpose(2, 1)  # (B, n_p, d)
  new = _ln(u, p["norm"], g.ln_eps)
  if carried is not None:
    new = new + PROMPT_CARRY * carried
  return torch.cat((h[:, :1], new, h[:, 1:]), dim=1)


def block(
  x: torch.Tensor,
  p: dict[str, Any],
  g: Geometry,
  mode: str,
  peft: dict[str, Any] | None,
  training: bool,
) -> torch.Tensor:
  """One pre-LN block in "channel" (optional adapter parallel to the MLP) or "patch" mode."""
  h = x + attention(_ln(x, p["norm1"], g.ln_eps), p, g.num_heads)
  if mode == "channel":
    out = mlp(h, p, g.ln_eps) + h
    return out if peft is None else out + adapter(h, peft, training)
  y = mlp(prompt_generator(h, peft, g), p, g.ln_eps)
  if y.shape == h.shape:
    return y + h
  # block 0: the residual reaches CLS and the patch tokens, not the new prompts (in place)
  y[:, 0] += h[:, 0]
  y[:, 1 + g.num_prompts :] += h[:, 1:]
  return y


def embed(images: torch.Tensor, bb: dict[str, Any], g: Geometry) -> torch.Tensor:
  """(B, 3, H, W) -> (B, N, d): patch conv, CLS, position embedding."""
  x = F.conv2d(images, bb["patch"]["weight"], bb["patch"]["bias"], stride=g.patch_size)
  x = x.flatten(2).transpose(1, 2)
  x = torch.cat((bb["cls"].expand(x.shape[0], -1, -1), x), dim=1)
  return x + bb["pos"]


def run_pass(
  x: torch.Tensor,
  model: dict[str, Any],
  g: Geometry,
  mode: str,
  bank: str | None,
  training: bool,
) -> torch.Tensor:
  """All blocks from the embedded tokens x (B, N, d), final LN on all tokens -> CLS (B, d)."""
  kind = "adapters" if mode == "channel" else "prompts"
  for l, p in enumerate(model["backbone"]["blocks"]):
    peft = None if bank is None else model[bank][kind][l]
    x = block(x, p, g, mode, peft, training)
  return _ln(x, model["backbone"]["norm"], g.ln_eps)[:, 0]


def features(
  images: torch.Tensor, model: dict[str, Any], g: Geometry, use_ptm: bool, training: bool
) -> tuple[torch.Tensor, torch.Tensor]:
  """(B, 3, H, W) -> c, p (B, D): [PTM,] EMA, current sections, each pass from block 0."""
  x = embed(images, model["backbone"], g)
  ptm = [run_pass(x, model, g, "channel", None, training)] if use_ptm else []
  c = [run_pass(x, model, g, "channel", bank, training) for bank in ("ema", "current")]
  p = [run_pass(x, model, g, "patch", bank, training) for bank in ("ema", "current")]
  return torch.cat(ptm + c, dim=1), torch.cat(ptm + p, dim=1)


def fusion(c: torch.Tensor, p: torch.Tensor, f: dict[str, Any], training: bool) -> torch.Tensor:
  """AttentionFusion over one token per sample: (B, D), (B, D) -> m (B, D)."""
  b, dim = c.shape
  hd = dim // FUSION_HEADS

  def heads(t):  # (B, D) -> (B, heads, 1, hd)
    return t.view(b, -1, FUSION_HEADS, hd).transpose(1, 2)

  q, k, v = heads(_lin(p, f["query"])), heads(_lin(c, f["key"])), heads(_lin(c, f["value"]))
  scores = torch.softmax(q @ k.transpose(-2, -1) / hd**0.5, dim=-1)
  scores = F.dropout(scores, FUSION_DROPOUT, training)
  fused = (scores @ v).transpose(1, 2).contiguous().view(b, dim)
  return 0.5 * fused + c + 0.1 * p


def cosine(x: torch.Tensor, w: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
  """σ·cos(x, w_k): (B, D), (K, D) -> (B, K)."""
  return sigma * F.linear(F.normalize(x, p=2, dim=1), F.normalize(w, p=2, dim=1))


def reweighted(x: torch.Tensor, w: torch.Tensor, sigma: torch.Tensor, width: int) -> torch.Tensor:
  """Section-weighted cosine logits: Σ_j ω_j cos(x^(j), w_k^(j)) over width-d sections."""
  num = x.shape[1] // width
  out = 0.0
  for j, weight in enumerate(SECTION_WEIGHTS[num == 3]):
    sl = slice(j * width, (j + 1) * width)
    out = (
      out + F.linear(F.normalize(x[:, sl], p=2, dim=1), F.normalize(w[:, sl], p=2, dim=1)) * weight
    )
  return sigma * out


def orthogonal_residuals(
  fc: torch.Tensor, c: torch.Tensor, p: torch.Tensor, m: torch.Tensor
) -> torch.Tensor:
  """Full SVD of the column-normalised prototypes (D, rows); first 40 left singular vectors U;
  signed sum of x̂ − x̂UUᵀ over c and p (m's residual is computed and discarded, as upstream)."""
  u, _, _ = torch.linalg.svd(F.normalize(fc.transpose(0, 1), p=2, dim=0), full_matrices=True)
  basis = u[:, :ORTH_K]

  def residual(x):
    xn = F.normalize(x, p=2, dim=-1)
    return xn - xn @ basis @ basis.T

  res_c, res_p, _ = residual(c), residual(p), residual(m)
  return res_c.sum() + res_p.sum()


def mutual_information(feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
  """L_MI (SPEC §2.1) of (n, D) features with (n,) labels: one global positive log-sum-exp plus
  the mean per-row log-sum-exp over all other rows."""
  z = F.normalize(feats, p=2, dim=1)
  sim = z @ z.T / MI_TAU
  eye = torch.eye(sim.shape[0], dtype=torch.bool)
  positive = (labels[:, None] == labels[None, :]) & ~eye
  pos_term = -torch.log((torch.exp(sim) * positive).sum())
  neg_term = torch.logsumexp(sim.masked_fill(eye, float("-inf")), dim=1).mean()
  return pos_term + neg_term


def reg_loss(model: dict[str, Any]) -> torch.Tensor:
  """Σ‖θ − θ_snap‖² over the "weight" tensors of the current bank and the fusion Linears."""
  pairs = named_tensors({"bank": model["current"], "fusion": model["fusion"]})
  snaps = dict(named_tensors(model["reg"]))
  terms = [(t - snaps[n]).pow(2).sum() for n, t in pairs if n.endswith("weight")]
  return torch.stack(terms).sum()


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
  if not bool(torch.isfinite(x).all()):
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
  return x


def make_train_step(model: dict[str, Any], g: Geometry, use_ptm: bool, k_t: int, s_t: int):
  """Official training step: returns step(images (B, 3, H, W), labels (B,)) -> loss (float)."""
  trainable = tensors([model["current"], model["fusion"], model["proxy"]])
  opt = torch.optim.SGD(trainable, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

  def step(images: torch.Tensor, labels: torch.Tensor) -> float:
    c, p = features(images, model, g, use_ptm, training=True)
    m = fusion(c, p, model["fusion"], training=True)
    orth = orthogonal_residuals(model["train_fc"], c, p, m)
    local = labels - k_t
    proxy = model["proxy"]
    ce = [F.cross_entropy(cosine(x, proxy["weight"], proxy["sigma"]), local) for x in (c, p, m)]
    old = model["train_fc"][:-s_t]
    picked = torch.randperm(old.shape[0])[: images.shape[0]]
    mi = -mutual_information(torch.cat((m, old[picked]), dim=0), torch.cat((labels, picked)))
    reg = reg_loss(model)
    mi, orth, reg = _finite_or_zero(mi), _finite_or_zero(orth), _finite_or_zero(reg)
    loss = sum(ce) + mi * NCE_TEMP + orth * DIS_TEMP + reg * REG_TEMP
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()

  return step


def make_eval_step(model: dict[str, Any], g: Geometry, use_ptm: bool, num_seen: int):
  """Official test step: images (B, 3, H, W) -> top-k class ids (B, k) of m's logits."""

  @torch.no_grad()
  def step(images: torch.Tensor) -> torch.Tensor:
    c, p = features(images, model, g, use_ptm, training=False)
    m = fusion(c, p, model["fusion"], training=False)
    orthogonal_residuals(model["eval_fc"][:num_seen], c, p, m)  # computed and unused upstream
    fc, sigma = model["eval_fc"], model["fc_sigma"]
    logits = [reweighted(x, fc, sigma, g.width) for x in (c, p, m)]
    return torch.topk(logits[2][:, :num_seen], k=min(TOPK, num_seen), dim=1)[1]

  return step


# ------------------------------------------------------------------------------------------------
# Analytic FLOP count of the official structure.


def analytic_flops(
  g: Geometry, use_ptm: bool, num_classes: int, k_t: int, s_t: int, batch: int
) -> dict[str, float]:
  """Matmul FLOPs per image (2 per multiply-add) of the official forward, train and eval steps.

  Notation: d width, m MLP width, L depth, N = 1 + (H/P)² tokens, N' = N + n_p, r adapter
  bottleneck, D = feature width (2d, 3d with PTM), K = 40, dense(n, i, o) = 2·n·i·o.

    attn_w(n) = 4·dense(n, d, d)   (q, k, v, out: frozen weights)   attn_aa(n) = 4·n²·d
    mlp(n)    = dense(n, d, m) + dense(n, m, d)      adapter(n) = dense(n, d, r) + dense(n, r, d)
    pgen      = 2·N·d·n_p (token-axis Linear)        embed = dense(N − 1, 3P², d) (once)
    plain     = L·[attn_w(N) + attn_aa(N) + mlp(N)]
    channel   = plain + L·adapter(N)
    patch     = attn_w(N) + attn_aa(N) + pgen + mlp(N')
                + (L − 1)·[attn_w(N') + attn_aa(N') + pgen + mlp(N')]
    fusion    = 3·dense(1, D, D) + 4·D      orth = 3·2·dense(1, D, K)   (c, p and m projected)
    forward   = embed + [plain] + 2·channel + 2·patch + fusion

  Train = forward + orth + 3·dense(1, D, s_t) (proxy head) + L_MI Gram dense(n, D, n)/b with
  n = b + min(b, k_t), plus the backward autograd records: the two current passes only (the
  EMA/PTM passes have no input requiring grad). Channel/current: block 0 only its adapter (up:
  weight and input gradients, down: weight gradient), blocks 1..L−1 1× frozen-weight matmuls
  (input gradient), 2× attention scores/A·V and adapters. Patch/current: block 0 the prompt
  Linear's weight gradient and the input gradient of its MLP on all N' rows, blocks 1..L−1 1×
  frozen weights, 2× scores/A·V and prompt Linears. Fusion 2×, proxy head 2×, the c and p
  projections 1×, the Gram 2×. Eval = forward + orth + 3·dense(1, D, C) (reweighted logits of c,
  p, m). LayerNorm, softmax, GELU, the SVD and the optimiser update are not counted.
  """
  d, m, n, r, n_p, L = g.width, g.mlp_dim, g.num_tokens, g.adapter_dim, g.num_prompts, g.depth
  n2, big_d = n + n_p, g.width * (3 if use_ptm else 2)

  def dense(rows, i, o):
    return 2.0 * rows * i * o

  def attn_w(k):
    return 4 * dense(k, d, d)

  def attn_aa(k):
    return 4.0 * k * k * d

  def mlp_f(k):
    return dense(k, d, m) + dense(k, m, d)

  def adapter_f(k):
    return dense(k, d, r) + dense(k, r, d)

  pgen = 2.0 * n * d * n_p
  emb = dense(g.num_patches, g.patch_size**2 * g.channels, d)
  plain = L * (attn_w(n) + attn_aa(n) + mlp_f(n))
  channel = plain + L * adapter_f(n)
  patch = attn_w(n) + attn_aa(n) + pgen + mlp_f(n2)
  patch += (L - 1) * (attn_w(n2) + attn_aa(n2) + pgen + mlp_f(n2))
  fuse = 3 * dense(1, big_d, big_d) + 4.0 * big_d
  orth = 3 * 2 * dense(1, big_d, min(ORTH_K, big_d))
  forward = emb + (plain if use_ptm else 0.0) + 2 * channel + 2 * patch + fuse

  heads = 3 * dense(1, big_d, s_t)
  n_mi = batch + min(batch, k_t)
  gram = dense(n_mi, big_d, n_mi) / batch
  bwd_channel = 2 * dense(n, r, d) + dense(n, d, r)
  bwd_channel += (L - 1) * (attn_w(n) + mlp_f(n) + 2 * attn_aa(n) + 2 * adapter_f(n))
  bwd_patch = pgen + mlp_f(n2) + (L - 1) * (attn_w(n2) + mlp_f(n2) + 2 * attn_aa(n2) + 2 * pgen)
  bwd_rest = 2 * fuse + 2 * heads + 2 * dense(1, big_d, min(ORTH_K, big_d)) * 2 + 2 * gram
  train = forward + orth + heads + gram + bwd_channel + bwd_patch + bwd_rest
  return {
    "forward": forward,
    "train": train,
    "eval": forward + orth + 3 * dense(1, big_d, num_classes),
  }


# ------------------------------------------------------------------------------------------------
# Worker: one (PTM setting, phase) in a fresh process.


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "cpu"


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

    def call():
      return step(images, labels)

  else:
    step = make_eval_step(model, g, cfg["ptm"], k_t + s_t)

    def call():
      return step(images)

  t0 = time.perf_counter()
  first = call()
  first_call_s = time.perf_counter() - t0
  times, cpu_times = [], []
  for _ in range(cfg["repeats"]):
    t0, c0 = time.perf_counter(), time.process_time()
    call()
    times.append(time.perf_counter() - t0)
    cpu_times.append(time.process_time() - c0)

  # The official step's SVD alone (same matrix), to show its share of the step.
  fc = model["train_fc"] if cfg["phase"] == "train" else model["eval_fc"][: k_t + s_t]
  svd_times = []
  for _ in range(3):
    t0 = time.perf_counter()
    torch.linalg.svd(F.normalize(fc.transpose(0, 1), p=2, dim=0), full_matrices=True)
    svd_times.append(time.perf_counter() - t0)

  median = statistics.median(times)
  return {
    **cfg,
    "batch": batch,
    "platform": "cpu",
    "device_kind": _cpu_name(),
    "torch": torch.__version__,
    "torch_threads": torch.get_num_threads(),
    "param_counts": counts,
    "init_s": init_s,
    "first_call_s": first_call_s,
    "times_s": times,
    "median_s": median,
    "min_s": min(times),
    "img_s": batch / median,
    "img_s_best": batch / min(times),
    "cpu_s": cpu_times,
    "median_cpu_s": statistics.median(cpu_times),
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


def run_config(cfg: dict[str, Any], subprocess_mode: bool, timeout: float) -> dict[str, Any]:
  if not subprocess_mode:
    return run_worker(cfg)
  return bench_util.run_worker_process(__file__, cfg, timeout)


def print_results(results: list[dict[str, Any]], dot: float, dot_cpu: float) -> None:
  head = (
    f"{'size':5} {'ptm':5} {'phase':5} {'img/s':>7} {'med s':>7} {'min s':>7} {'cpu s':>7} "
    f"{'1st':>6} {'svd s':>6} {'GF/img ana':>10} {'GFLOP/s':>8} {'/dot32':>6} {'/dotcpu':>7} "
    f"{'RSS GB':>6} {'load':>4}"
  )
  print(head)
  print("-" * len(head))
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
    bench_util.print_result(run_worker(json.loads(args.worker)))
    return 0

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
    f"device: cpu {_cpu_name()}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
    f"{threads} torch threads, load average {os.getloadavg()}"
  )
  dot_before = dot_rate(args.dot_size, args.dot_repeats)
  print(bench_util.rate_line(dot_before, "before"))

  results = []
  configs = list(itertools.product(ptms, phases))
  for rnd in range(args.rounds):
    for ptm, phase in configs if rnd % 2 == 0 else configs[::-1]:
      cfg = {
        "size": args.size,
        "ptm": ptm,
        "phase": phase,
        "repeats": args.repeats,
        "batch": args.batch,
        "threads": threads,
      }
      t0 = time.perf_counter()
      r = run_config(cfg, not args.no_subprocess, args.worker_timeout)
      results.append(r)
      status = r.get("error") or f"{r['img_s']:.3g} img/s"
      print(
        f"  [{time.perf_counter() - t0:6.1f} s] round {rnd} {args.size} ptm={ptm} {phase}: "
        f"{status}",
        flush=True,
      )

  dot_after = dot_rate(args.dot_size, args.dot_repeats)
  dot, dot_cpu = bench_util.larger_rate(dot_before, dot_after)
  print(bench_util.rate_line(dot_after, "after"))
  print(
    "\nOfficial NTK-CL structure in PyTorch (no block-0 sharing, full last block, per-step SVD). "
    f"GFLOP/s and /dot32 use the analytic matmul count and the larger float32 dot median "
    f"({dot / 1e9:.1f} GFLOP/s); /dotcpu = analytic FLOPs per CPU-second of the phase's process "
    "over the dot's; svd s = the step's full SVD alone (included in the step time); RSS = peak "
    "host RSS of the phase's own process; load = 1-min load average after the phase.\n"
  )
  print_results(results, dot, dot_cpu)
  if args.json:
    print(
      json.dumps(
        {
          "device": f"cpu {_cpu_name()}",
          "torch": torch.__version__,
          "threads": threads,
          "dot_before": dot_before,
          "dot_after": dot_after,
          "dot_flop_s": dot,
          "dot_flop_per_cpu_s": dot_cpu,
          "results": results,
        }
      )
    )
  return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
  sys.exit(main())
