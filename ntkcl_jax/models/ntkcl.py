"""The NTK-CL network: frozen ViT, two PEFT banks, four (or five) passes and the fusion (SPEC 1).

Passes per image (SPEC 1.4): (0) plain pre-trained ViT if `use_init_ptm`, (1) channel/EMA,
(2) channel/current, (3) patch/EMA, (4) patch/current. Features are final-LN CLS tokens:
  c = [z_PTM;] c_EMA; c_cur        p = [z_PTM;] p_EMA; p_cur        m = Fusion(c, p)
each (b, D) with D = 2d, or 3d with the PTM pass.

Shared work (exact, not approximations): block 0's attention sub-layer and MLP(LN2(·)) of its
CLS/patch rows are identical in every pass, so they are computed once; in the last block only the
CLS row needs queries, attention output and MLP (keys/values still use all tokens). Both can be
switched off (`ModelSpec.share_block0`, `last_block_cls_only`) to measure what they save
(`python -m experiments.benchmarks step --ablate`); `ModelSpec.remat` rematerialises each block in the
backward pass (activation memory for compute: "dots" keeps the weight matmuls' outputs and
recomputes the rest, "full" recomputes everything). None of the three changes the features.

Parameter tree: {"backbone": AugReg layout, "peft": {"current", "ema"}, "fusion"}.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ntkcl_jax.models.heads import Fusion
from ntkcl_jax.models.peft import PEFTBank, PEFTBanks
from ntkcl_jax.models.vit import VisionTransformer, ViTSpec

MODEL_NAMES = ("both", "channel", "patch")
# ModelSpec.remat -> what a block keeps for the backward pass (`jax.checkpoint` policy).
REMAT_POLICIES = {
  "none": None,  # everything (no remat)
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # weight-matmul outputs
  "full": jax.checkpoint_policies.nothing_saveable,  # only the block input
  "dots_all": jax.checkpoint_policies.dots_saveable,  # every matmul output, attention's too
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything that fixes the network's shapes and its forward (plain values, no config).

  Attributes:
    vit: backbone geometry.
    adapter_dim, adapter_scale, adapter_dropout: channel adapter (SPEC 1.2).
    num_prompts, prompt_carry: patch prompt generator (SPEC 1.3).
    fusion_heads, fusion_dropout: fusion (SPEC 1.5).
    use_init_ptm: add the plain pre-trained pass as the first feature section.
    model_name: "both" (c, p, m), or the ablations "channel" / "patch" (SPEC 2.1).
    fusion_with_qk: keep the dead query/key parameters (quirk Q1 `fusion_qk='dead_qk'`).
    kaiming_mix: prompt mix-kernel init (quirk Q2 `prompt_init='kaiming_mix'`).
    fixed_197_tokens: reference geometry check (quirk Q8 `prompt_tokens='fixed_197'`).
    ema_branch_dropout: adapter dropout in the EMA channel pass during training (quirk Q9).
    dtype: compute dtype of the passes (parameters stay float32; features are returned float32).
    share_block0: compute the embedding, block 0's attention and its CLS/patch-row MLP once for
      all passes (True), or separately in every pass, as the reference does (False).
    last_block_cls_only: in the last block, compute queries, attention output and MLP for the CLS
      row only (True), or for every token (False; the patch pass then also runs the last
      block's prompt generator, as the reference does).
    remat: what each block application stores for the backward pass (`nn.remat` with a
      `REMAT_POLICIES` policy): "none" stores every activation; "dots" stores the outputs of the
      weight matmuls (QKV, projections, MLP, adapters) and recomputes LayerNorms, GELUs, attention
      scores and softmax; "full" stores only the block input and recomputes the whole block.
      Measured on the ViT-B/16 train step (2-core CPU, batch 16, `experiments.benchmarks step --ablate`):
      "dots" against "none" takes 0.89x the time and 0.78x the peak memory (0.69x XLA's planned
      temporaries; less memory traffic outweighs the recomputed elementwise work), "full" 1.05x
      the time and the same memory as "dots". Hence the default.
      "dots_all" also keeps the attention matmuls' outputs (scores, A·V; more memory, less
      recomputation); measured against "dots" with `python -m experiments.benchmarks ab` (see
      experiments/results/perf/cpu_step_profile.md).
  """

  vit: ViTSpec = ViTSpec()
  adapter_dim: int = 16
  adapter_scale: float = 0.1
  adapter_dropout: float = 0.1
  num_prompts: int = 10
  prompt_carry: float = 0.1
  fusion_heads: int = 8
  fusion_dropout: float = 0.1
  use_init_ptm: bool = False
  model_name: str = "both"
  fusion_with_qk: bool = True
  kaiming_mix: bool = False
  fixed_197_tokens: bool = True
  ema_branch_dropout: bool = True
  dtype: Any = jnp.float32
  share_block0: bool = True
  last_block_cls_only: bool = True
  remat: str = "dots"

  def __post_init__(self):
    if self.model_name not in MODEL_NAMES:
      raise ValueError(f"model_name={self.model_name!r}; valid: {MODEL_NAMES}.")
    if self.fixed_197_tokens and self.vit.num_tokens != 197:
      raise ValueError(
        f"quirks.prompt_tokens='fixed_197' (reference, Q8) supports only ViT-B/16 at 224 px "
        f"(197 tokens), but this geometry has {self.vit.num_tokens} tokens (image_size="
        f"{self.vit.image_size}, patch_size={self.vit.patch_size}). Set "
        "--config.quirks.prompt_tokens=from_config."
      )
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}; valid: {tuple(REMAT_POLICIES)}.")
    if self.vit.depth < 2:
      raise ValueError("NTK-CL needs at least 2 encoder blocks (prompts are carried from block 1).")

  @property
  def num_sections(self) -> int:
    return 3 if self.use_init_ptm else 2

  @property
  def feature_dim(self) -> int:
    """D: the width of c, p and m."""
    return self.num_sections * self.vit.width


class NTKCL(nn.Module):
  """images (b, H, W, C) → {"c", "p", "m"} features (b, D) (keys present per `model_name`).

  Call with `train=True` and `rngs={"dropout": key}` for the training forward (adapter dropout,
  fusion head-dropout), `train=False` for evaluation and prototypes.
  """

  spec: ModelSpec

  def setup(self):
    s = self.spec
    self.backbone = VisionTransformer(s.vit, dtype=s.dtype)
    self.peft = PEFTBanks(
      PEFTBank(
        depth=s.vit.depth,
        width=s.vit.width,
        num_tokens=s.vit.num_tokens,
        bottleneck=s.adapter_dim,
        adapter_scale=s.adapter_scale,
        adapter_dropout=s.adapter_dropout,
        num_prompts=s.num_prompts,
        kaiming_mix=s.kaiming_mix,
        dtype=s.dtype,
        parent=None,
      )
    )
    self.fusion = Fusion(
      s.feature_dim, s.fusion_heads, s.fusion_dropout, with_qk=s.fusion_with_qk, dtype=s.dtype
    )

  # -- passes -----------------------------------------------------------------------------------

  def _apply(self, fn, x):
    """fn(module, x) → x for one block application, under `nn.remat` unless remat="none".

    `fn` reaches sub-modules through its module argument (never through `self`), which is what
    lets Flax lift it; static values (block index, bank name, flags) come from the closure.
    """
    if self.spec.remat == "none":
      return fn(self, x)
    return nn.remat(fn, policy=REMAT_POLICIES[self.spec.remat])(self, x)

  def _cls_feature(self, x: jax.Array) -> jax.Array:
    return self.backbone.final_norm(x[:, 0]).astype(jnp.float32)

  def _block0(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Embedding and block 0 up to its MLP: h0 = x0 + Attn(LN1(x0)), mlp0 = MLP(LN2(h0))."""

    def fn(m, images):
      block0 = m.backbone.block(0)
      h0 = block0.attention_residual(m.backbone.embed(images))
      return h0, block0.mlp(h0)

    return self._apply(fn, images)

  def _plain_block(self, l: int, x: jax.Array) -> jax.Array:
    """One unmodified block; for the last block only the CLS row when `last_block_cls_only`."""
    cls_only = self.spec.last_block_cls_only and l == self.spec.vit.depth - 1

    def fn(m, x):
      block = m.backbone.block(l)
      h = block.attention_residual(x, cls_only=cls_only)
      return h + block.mlp(h)

    return self._apply(fn, x)

  def _plain_pass(self, images: jax.Array, block0) -> jax.Array:
    h0, mlp0 = block0 if self.spec.share_block0 else self._block0(images)
    x = h0 + mlp0
    for l in range(1, self.spec.vit.depth):
      x = self._plain_block(l, x)
    return self._cls_feature(x)

  def _channel_pass(self, bank: str, images, block0, *, deterministic: bool) -> jax.Array:
    """Channel mode: out = h + MLP(LN2(h)) + adapter(h), h = x + Attn(LN1(x)) (SPEC 1.2)."""
    h0, mlp0 = block0 if self.spec.share_block0 else self._block0(images)
    last = self.spec.vit.depth - 1
    x = h0 + mlp0 + getattr(self.peft, bank).adapter(0, h0, deterministic=deterministic)
    for l in range(1, last + 1):
      cls_only = self.spec.last_block_cls_only and l == last

      def fn(m, x, l=l, cls_only=cls_only):
        block = m.backbone.block(l)
        h = block.attention_residual(x, cls_only=cls_only)
        return h + block.mlp(h) + getattr(m.peft, bank).adapter(l, h, deterministic=deterministic)

      x = self._apply(fn, x)
    return self._cls_feature(x)

  def _patch_pass(self, bank: str, images, block0) -> jax.Array:
    """Patch mode (SPEC 1.3): 10 generated prompts after the CLS token from block 0 on."""
    s, last, n_p = self.spec, self.spec.vit.depth - 1, self.spec.num_prompts
    h0, mlp0 = block0 if s.share_block0 else self._block0(images)
    # Block 0: prompt rows get MLP(LN2(P)) only; CLS and patch rows equal the plain block's.
    prompts = getattr(self.peft, bank).prompts(0, h0)
    x = h0 + mlp0
    x = jnp.concatenate([x[:, :1], self.backbone.block(0).mlp(prompts), x[:, 1:]], axis=1)
    # With `last_block_cls_only` the last block reads only the CLS row, so its prompt generator
    # never affects the output and is skipped; otherwise it runs like every other block.
    for l in range(1, last if s.last_block_cls_only else last + 1):

      def fn(m, x, l=l):
        block = m.backbone.block(l)
        h = block.attention_residual(x)  # [cls, r, patches]
        carried = h[:, 1 : 1 + n_p]
        tokens = jnp.concatenate([h[:, :1], h[:, 1 + n_p :]], axis=1)
        prompts = getattr(m.peft, bank).prompts(l, tokens) + s.prompt_carry * carried
        z = jnp.concatenate([tokens[:, :1], prompts, tokens[:, 1:]], axis=1)
        return block.mlp(z) + h

      x = self._apply(fn, x)
    if s.last_block_cls_only:
      x = self._plain_block(last, x)
    return self._cls_feature(x)

  def __call__(self, images: jax.Array, *, train: bool, per_pass: bool = False) -> dict[str, Any]:
    """Features {"c", "p", "m"} (keys per `model_name`), each (b, D) float32.

    Args:
      images: (b, H, W, C).
      train: dropout on (adapter dropout in the current channel pass, and in the EMA one when
        `spec.ema_branch_dropout`, Q9; fusion head-dropout). Nothing else depends on it.
      per_pass: also return "passes": the final-LN CLS feature of every pass, (b, d) each, keys
        "ptm" (with `use_init_ptm`), "c_ema", "c_cur", "p_ema", "p_cur" (per `model_name`); c and
        p are their concatenations (for verifiers, e.g. `experiments/parity`).
    """
    s = self.spec
    block0 = self._block0(images) if s.share_block0 else None
    prefix = [self._plain_pass(images, block0)] if s.use_init_ptm else []
    feats, passes = {}, {"ptm": prefix[0]} if prefix else {}
    if s.model_name in ("both", "channel"):
      ema_det = not (train and s.ema_branch_dropout)
      c_ema = self._channel_pass("ema", images, block0, deterministic=ema_det)
      c_cur = self._channel_pass("current", images, block0, deterministic=not train)
      feats["c"] = jnp.concatenate([*prefix, c_ema, c_cur], axis=-1)
      passes.update(c_ema=c_ema, c_cur=c_cur)
    if s.model_name in ("both", "patch"):
      p_ema = self._patch_pass("ema", images, block0)
      p_cur = self._patch_pass("current", images, block0)
      feats["p"] = jnp.concatenate([*prefix, p_ema, p_cur], axis=-1)
      passes.update(p_ema=p_ema, p_cur=p_cur)
    if s.model_name == "both":
      feats["m"] = self.fusion(feats["c"], feats["p"], deterministic=not train)
    if per_pass:
      feats["passes"] = passes
    return feats

  def init_all(self, images: jax.Array) -> jax.Array:
    """Creates every parameter by touching each sub-module once, including those the forward
    never reads (last-block prompt generator, dead fusion query/key, fusion under the
    ablations). Use with `Module.init`; far cheaper than tracing the five passes."""
    out = self.backbone(images).sum()
    tokens = self.backbone.embed(images)
    for bank in (self.peft.ema, self.peft.current):
      out = out + bank(tokens)
    dummy = jnp.zeros((images.shape[0], self.spec.feature_dim), jnp.float32)
    return out + self.fusion(dummy, dummy, deterministic=True).sum() + self.fusion.touch_qk(dummy)


def test_feature_key(model_name: str) -> str:
  """Which feature ("m", "c" or "p") prototypes and test logits use for this `model_name`."""
  return {"both": "m", "channel": "c", "patch": "p"}[model_name]


def init_params(spec: ModelSpec, key: jax.Array, backbone: dict | None = None) -> dict[str, Any]:
  """Initial parameters {"backbone", "peft": {"current", "ema"}, "fusion"} (float32).

  Args:
    spec: model spec.
    key: PRNG key; the EMA bank gets its own draw (its `down` init differs from `current`).
    backbone: pre-trained backbone tree (e.g. from `load_augreg`); replaces the random one.
  """
  model = NTKCL(spec)
  v = spec.vit
  images = jnp.zeros((1, v.image_size, v.image_size, v.channels), jnp.float32)
  params = jax.jit(lambda k: model.init(k, images, method=NTKCL.init_all))(key)["params"]
  params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
  if backbone is not None:
    want = jax.tree_util.tree_structure(params["backbone"])
    if jax.tree_util.tree_structure(backbone) != want:
      raise ValueError("Backbone tree does not match the model's backbone layout.")
    params = {**params, "backbone": jax.tree_util.tree_map(jnp.asarray, backbone)}
  return params
