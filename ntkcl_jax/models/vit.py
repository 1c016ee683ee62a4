"""Frozen ViT backbone in the Google AugReg layout, and its strict `.npz` loader (SPEC 1.1).

Pre-LN encoder blocks, exact (erf) GELU, LayerNorm eps 1e-6, learned position embedding, the feature
is the CLS token after the final LayerNorm. Parameter names follow the AugReg checkpoints exactly:

  embedding/{kernel (P,P,3,d) HWIO, bias}        cls (1,1,d)
  Transformer/posembed_input/pos_embedding (1,N,d)
  Transformer/encoderblock_{l}/LayerNorm_0, MultiHeadDotProductAttention_1/{query,key,value,out},
                               LayerNorm_2, MlpBlock_3/{Dense_0,Dense_1}
  Transformer/encoder_norm

The block is exposed piecewise (`attention_residual`, `mlp`) so that the NTK-CL passes
(`models/ntkcl.py`) can insert adapters and prompts between the sub-layers and share work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

LN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class ViTSpec:
  """Geometry of a ViT. Token count is 1 + (H/P)·(W/P), never hard-coded.

  Attributes:
    image_size: input height = width, in pixels.
    patch_size: P, patch height = width = conv stride.
    width: d, the token width.
    depth: L, the number of encoder blocks.
    num_heads: attention heads; `width` must divide evenly.
    mlp_dim: hidden width of each block's MLP.
    channels: input channels (3 for the AugReg checkpoints).
  """

  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  channels: int = 3

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(
        f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}; "
        f"choose an image size that is a multiple of the patch size (e.g. "
        f"{self.image_size // self.patch_size * self.patch_size})."
      )
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}.")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_tokens(self) -> int:
    """N = 1 + (H/P)(W/P): 197 for ViT-B/16 at 224 px."""
    return 1 + self.num_patches

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads


VIT_B16 = ViTSpec()


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention with AugReg's (d, heads, head_dim) kernels; optionally CLS-only queries."""

  num_heads: int
  head_dim: int
  width: int
  dtype: Any = jnp.float32

  def setup(self):
    dense = lambda: nn.DenseGeneral((self.num_heads, self.head_dim), dtype=self.dtype)  # noqa: E731
    self.query, self.key, self.value = dense(), dense(), dense()
    self.out = nn.DenseGeneral(self.width, axis=(-2, -1), dtype=self.dtype)

  def __call__(self, x_q: jax.Array, x_kv: jax.Array) -> jax.Array:
    """(b, Nq, d) queries attend over (b, Nkv, d) keys/values → (b, Nq, d)."""
    q = self.query(x_q) * (self.head_dim**-0.5)
    k, v = self.key(x_kv), self.value(x_kv)
    weights = jax.nn.softmax(jnp.einsum("bqhc,bkhc->bhqk", q, k).astype(jnp.float32), axis=-1)
    return self.out(jnp.einsum("bhqk,bkhc->bqhc", weights.astype(v.dtype), v))


class MlpBlock(nn.Module):
  mlp_dim: int
  width: int
  dtype: Any = jnp.float32

  def setup(self):
    self.Dense_0 = nn.Dense(self.mlp_dim, dtype=self.dtype)
    self.Dense_1 = nn.Dense(self.width, dtype=self.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.Dense_1(nn.gelu(self.Dense_0(x), approximate=False))


class EncoderBlock(nn.Module):
  """Pre-LN block, split into its two residual halves.

  `attention_residual(x)` = x + Attn(LN_0(x)); `mlp(h)` = MLP(LN_2(h)) without the residual, so a
  caller can add adapters (channel mode) or rebuild the token set (patch mode) in between.
  """

  spec: ViTSpec
  dtype: Any = jnp.float32

  def setup(self):
    s = self.spec
    self.LayerNorm_0 = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype)
    self.MultiHeadDotProductAttention_1 = MultiHeadDotProductAttention(
      s.num_heads, s.head_dim, s.width, dtype=self.dtype
    )
    self.LayerNorm_2 = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype)
    self.MlpBlock_3 = MlpBlock(s.mlp_dim, s.width, dtype=self.dtype)

  def attention_residual(self, x: jax.Array, cls_only: bool = False) -> jax.Array:
    """(b, N, d) → (b, N, d), or (b, 1, d) for the CLS row only when `cls_only`.

    Keys and values always use all N tokens; `cls_only` skips the other queries, which is exact
    whenever only the CLS token of this block's output is read (the last block, SPEC 4 note).
    """
    y = self.LayerNorm_0(x)
    if cls_only:
      return x[:, :1] + self.MultiHeadDotProductAttention_1(y[:, :1], y)
    return x + self.MultiHeadDotProductAttention_1(y, y)

  def mlp(self, h: jax.Array) -> jax.Array:
    """Token-wise MLP(LN_2(h)), no residual: (b, n, d) → (b, n, d)."""
    return self.MlpBlock_3(self.LayerNorm_2(h))

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.attention_residual(x)
    return h + self.mlp(h)


class PatchEmbedding(nn.Module):
  """Non-overlapping P x P patches → tokens: the stride-P, VALID convolution of AugReg's
  `embedding` ({kernel (P, P, C, d) HWIO, bias (d,)}, `nn.Conv`'s initialisers), written as a
  patch reshape and one matmul.

  The same function as the convolution. As a matmul it keeps every leading axis of the images
  a batch axis of the product: under `jax.vmap` over stacked seeds (K, b, H, W, C) the seed and
  batch axes stay apart and keep their shardings, where a vmapped convolution folds them into
  one batch axis of K·b rows that a (seed, data) mesh cannot split, so XLA gathered the whole
  stacked batch onto every device and embedded all of it there.
  """

  patch_size: int
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """(b, H, W, C) → (b, H/P, W/P, d)."""
    p, (b, h, w, c) = self.patch_size, images.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, self.width))
    bias = self.param("bias", nn.initializers.zeros, (self.width,))
    patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, h // p, w // p, p * p * c).astype(self.dtype)
    return patches @ kernel.reshape(p * p * c, self.width).astype(self.dtype) + bias.astype(
      self.dtype
    )


class PosEmbed(nn.Module):
  num_tokens: int
  width: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pe = self.param("pos_embedding", nn.initializers.normal(0.02), (1, self.num_tokens, self.width))
    return x + pe.astype(x.dtype)


class Encoder(nn.Module):
  """AugReg's `Transformer` scope: position embedding, `encoderblock_{l}`, `encoder_norm`."""

  spec: ViTSpec
  dtype: Any = jnp.float32

  def setup(self):
    self.posembed_input = PosEmbed(self.spec.num_tokens, self.spec.width)
    for l in range(self.spec.depth):
      setattr(self, f"encoderblock_{l}", EncoderBlock(self.spec, dtype=self.dtype))
    self.encoder_norm = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype)

  def block(self, l: int) -> EncoderBlock:
    return getattr(self, f"encoderblock_{l}")

  def __call__(self, x: jax.Array) -> jax.Array:
    for l in range(self.spec.depth):
      x = self.block(l)(x)
    return self.encoder_norm(x)


class VisionTransformer(nn.Module):
  """Plain ViT feature extractor: images (b, H, W, C) in the configured range → CLS (b, d).

  The piecewise methods (`embed`, `block`, `final_norm`) serve the NTK-CL passes; `__call__` is the
  pre-trained model (PTM) forward and what `experiments/pretrain_tiny.py` trains.
  """

  spec: ViTSpec
  dtype: Any = jnp.float32

  def setup(self):
    s = self.spec
    self.embedding = PatchEmbedding(s.patch_size, s.width, dtype=self.dtype)
    self.cls = self.param("cls", nn.initializers.zeros, (1, 1, s.width))
    self.Transformer = Encoder(s, dtype=self.dtype)

  def embed(self, images: jax.Array) -> jax.Array:
    """(b, H, W, C) → tokens (b, N, d): patches row-major, CLS first, position embedding added."""
    s = self.spec
    chex.assert_shape(images, (None, s.image_size, s.image_size, s.channels))
    x = self.embedding(images.astype(self.dtype))
    b = x.shape[0]
    x = x.reshape(b, s.num_patches, s.width)
    cls = jnp.broadcast_to(self.cls.astype(x.dtype), (b, 1, s.width))
    return self.Transformer.posembed_input(jnp.concatenate([cls, x], axis=1))

  def block(self, l: int) -> EncoderBlock:
    return self.Transformer.block(l)

  def final_norm(self, x: jax.Array) -> jax.Array:
    return self.Transformer.encoder_norm(x)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = self.embed(images)
    last = self.spec.depth - 1
    for l in range(last):
      x = self.block(l)(x)
    h = self.block(last).attention_residual(x, cls_only=True)
    x = h + self.block(last).mlp(h)
    return self.final_norm(x[:, 0]).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------
# AugReg .npz loading.


class CheckpointMismatchError(ValueError):
  """A checkpoint's keys or shapes disagree with the configured model."""


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, Mapping):
      flat.update(_flatten(v, path + "/"))
    else:
      flat[path] = v
  return flat


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, v in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def expected_shapes(spec: ViTSpec) -> dict[str, tuple[int, ...]]:
  """Flat `/`-key → shape of every backbone parameter, without allocating (jax.eval_shape)."""
  model = VisionTransformer(spec)
  dummy = jax.ShapeDtypeStruct((1, spec.image_size, spec.image_size, spec.channels), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), dummy)["params"]
  return {k: tuple(v.shape) for k, v in _flatten(shapes).items()}


def missing_checkpoint(path: str | epath.PathLike) -> str | None:
  """Why `load_augreg(path, ...)` cannot find its file (with the fix), or None when it exists."""
  if epath.Path(path).exists():
    return None
  return (
    f"Backbone checkpoint {path} does not exist. Set backbone.checkpoint_path (or the config "
    "argument weights_dir=<dir>) to a local copy of the AugReg file (e.g. "
    "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz from gs://vit_models/augreg/); "
    "checkpoints are never downloaded at run time."
  )


def load_augreg(path: str | epath.PathLike, spec: ViTSpec) -> dict[str, Any]:
  """Reads an AugReg `.npz` into the backbone parameter tree, strictly (SPEC 1.1).

  Args:
    path: local path or any path `etils.epath` understands (e.g. `gs://...` with the optional
      cloud filesystem installed). Nothing is downloaded implicitly.
    spec: the configured geometry; every key and shape must match it exactly.
  Returns:
    Nested dict of float32 NumPy arrays in the `VisionTransformer` layout. `head/*` is ignored.
  Raises:
    FileNotFoundError: no file at `path`.
    CheckpointMismatchError: the first missing/unexpected key, or the first key whose shape
      differs (both shapes named); `pre_logits/*` (the older ViT-B_16.npz layout) is rejected.
  """
  missing = missing_checkpoint(path)
  if missing:
    raise FileNotFoundError(missing)
  path = epath.Path(path)
  with path.open("rb") as f:
    with np.load(f, allow_pickle=False) as npz:
      flat = {k: np.asarray(npz[k]) for k in npz.files}
  return _check_and_build(flat, spec, str(path))


def _check_and_build(flat: dict[str, np.ndarray], spec: ViTSpec, where: str) -> dict[str, Any]:
  if any(k.startswith("pre_logits/") for k in flat):
    raise CheckpointMismatchError(
      f"{where} has 'pre_logits/*', the older ViT-B_16.npz layout; point backbone.checkpoint_path "
      "at the AugReg file B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz (SPEC 1.1)."
    )
  flat = {k: v for k, v in flat.items() if not k.startswith("head/")}
  want = expected_shapes(spec)
  for key, shape in want.items():
    if key not in flat:
      raise CheckpointMismatchError(
        f"{where} lacks key '{key}' (expected shape {shape}) required by {spec}."
      )
    got = tuple(flat[key].shape)
    if got != shape:
      raise CheckpointMismatchError(
        f"Key '{key}' is {got} in {where} but {shape} in the model ({spec}); does the config's "
        "backbone geometry (image_size, patch_size, width, depth, heads, mlp_dim) match the file?"
      )
  extra = sorted(set(flat) - set(want))
  if extra:
    raise CheckpointMismatchError(
      f"{where} has key '{extra[0]}' ({len(extra)} unexpected in all) that the model {spec} "
      "does not have; is it a checkpoint of another architecture?"
    )
  return _unflatten({k: flat[k].astype(np.float32) for k in want})


def save_augreg(path: str | epath.PathLike, backbone_params: Mapping[str, Any]) -> None:
  """Writes backbone parameters as a flat `/`-keyed `.npz` in the AugReg layout."""
  flat = {k: np.asarray(v, np.float32) for k, v in _flatten(backbone_params).items()}
  path = epath.Path(path)
  tmp = path.parent / (path.name + ".tmp")
  with tmp.open("wb") as f:
    np.savez(f, **flat)
  tmp.rename(path)
