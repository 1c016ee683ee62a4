"""The official NTK-CL model in PyTorch, for `bench_torch_reference.py`: sizes, official
hyper-parameters, the parameter tree (plain tensors, random weights, official shapes and
trainable flags) with its SPEC §2.2 counts, and the analytic matmul FLOP count of the official
structure. What is followed from the official source is listed in `bench_torch_reference.py`'s
docstring; the forward and the steps are `torch_reference_step.py`.

No JAX import here or below: this runs in a PyTorch worker whose peak RSS is measured.
"""

from __future__ import annotations

import dataclasses
from typing import Any

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
