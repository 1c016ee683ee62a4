"""Cosine heads, the fusion layer and the section-weighted prototype logits (SPEC 1.5, 1.6)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from ntkcl_jax.models.peft import torch_linear_kernel_init

NORM_EPS_SQ = 1e-24  # the reference clamps norms at 1e-12; we clamp squared norms before the sqrt.


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / max(‖x‖, 1e-12) with a gradient that stays finite at x = 0 (a zero row stays 0)."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, NORM_EPS_SQ))


def cosine_logits(x: jax.Array, w: jax.Array, sigma: jax.Array | float = 1.0) -> jax.Array:
  """sigma · <x/|x|, w_k/|w_k|> (SPEC 1.6).

  Args:
    x: (b, D) features.
    w: (K, D) class rows; an all-zero row gives logit 0.
    sigma: scalar; 1.0 for prototypes, trainable for the proxy head.
  Returns:
    (b, K) float32 logits.
  """
  chex.assert_rank([x, w], 2)
  chex.assert_equal_shape_suffix([x, w], 1)
  x = l2_normalize(x.astype(jnp.float32))
  w = l2_normalize(w.astype(jnp.float32))
  return sigma * (x @ w.T)


def section_weighted_logits(
  features: jax.Array, prototypes: jax.Array, weights: Sequence[float]
) -> jax.Array:
  """Test logits Σ_j ω_j · cos(m^(j), μ_k^(j)) over d-wide sections (SPEC 1.6).

  Args:
    features: (b, D) with D = len(weights)·d, sections in concatenation order
      ([PTM;] EMA; current).
    prototypes: (C_seen, D) class means, same layout.
    weights: ω per section, e.g. (0.3, 0.1) or with PTM (1.0, 0.3, 0.1).
  Returns:
    (b, C_seen) logits.
  """
  n = len(weights)
  b, dim = features.shape
  chex.assert_shape(prototypes, (None, dim))
  if dim % n:
    raise ValueError(f"Feature width {dim} does not split into {n} equal sections.")
  f = features.reshape(b, n, dim // n)
  p = prototypes.reshape(prototypes.shape[0], n, dim // n)
  cos = jnp.einsum("bjd,kjd->bkj", l2_normalize(f), l2_normalize(p))
  return cos @ jnp.asarray(weights, jnp.float32)


class ProxyHead(nn.Module):
  """Per-task cosine head (SPEC 1.6): kernel (D, s_t) ~ U(±1/√D), trainable sigma = 1."""

  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    kernel = self.param("kernel", torch_linear_kernel_init(width), (width, self.num_classes))
    sigma = self.param("sigma", nn.initializers.ones, ())
    return cosine_logits(x, kernel.T, sigma)


class Fusion(nn.Module):
  """AttentionFusion(D) in its effective form (SPEC 1.5, Q1).

  Each sample is one token, so the softmax over one key is identically 1 and
    m = c + 0.1·p + 0.5·HeadDrop(W_v c + b_v),
  HeadDrop being inverted dropout of whole head chunks (D/heads wide) per (sample, head), active
  only in training. Query and key never affect the output; with `with_qk=True` (reference,
  `fusion_qk='dead_qk'`) they exist as parameters (weight decay, L_reg) exactly as in the
  reference.
  """

  width: int
  num_heads: int = 8
  dropout: float = 0.1
  with_qk: bool = True
  p_scale: float = 0.1
  attn_scale: float = 0.5
  dtype: Any = jnp.float32

  def setup(self):
    init = torch_linear_kernel_init(self.width)
    dense = lambda: nn.Dense(self.width, kernel_init=init, bias_init=init, dtype=self.dtype)  # noqa: E731
    if self.with_qk:
      self.query, self.key = dense(), dense()
    self.value = dense()

  def __call__(self, c: jax.Array, p: jax.Array, *, deterministic: bool) -> jax.Array:
    """c, p: (b, D) → m: (b, D)."""
    chex.assert_equal_shape([c, p])
    v = self.value(c).astype(jnp.float32)
    if not deterministic and self.dropout > 0:
      keep = jax.random.bernoulli(
        self.make_rng("dropout"), 1.0 - self.dropout, (c.shape[0], self.num_heads, 1)
      )
      v = v.reshape(c.shape[0], self.num_heads, -1)
      v = jnp.where(keep, v / (1.0 - self.dropout), 0.0).reshape(c.shape)
    return c + self.p_scale * p + self.attn_scale * v

  def touch_qk(self, x: jax.Array) -> jax.Array:
    """Creates the dead query/key parameters at init; their outputs are never used."""
    return self.query(x).sum() + self.key(x).sum() if self.with_qk else jnp.zeros(())
