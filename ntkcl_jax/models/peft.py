"""PEFT branches of NTK-CL: channel adapters and patch prompt generators (SPEC 1.2-1.4).

A `PEFTBank` holds one `ChannelAdapter` and one `PromptGenerator` per encoder block
(`adapter_{l}`, `prompt_{l}`). NTK-CL keeps two banks with identical layout: `peft/current`
(trained) and `peft/ema` (changed only by the adaptive EMA, `ntkcl_jax/ema.py`).
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from ntkcl_jax.models.vit import LN_EPS


def torch_linear_kernel_init(fan_in: int) -> nn.initializers.Initializer:
  """U(±1/√fan_in): PyTorch's kaiming-uniform (a=√5) Linear weight init."""
  bound = fan_in**-0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class ChannelAdapter(nn.Module):
  """down (d→r) → ReLU → Dropout → up (r→d) → ×scale (SPEC 1.2).

  Init: `down/kernel` ~ U(±1/√d), `down/bias` = 0, `up/*` = 0, so a fresh adapter outputs 0.
  """

  width: int
  bottleneck: int = 16
  scale: float = 0.1
  dropout: float = 0.1
  dtype: Any = jnp.float32

  def setup(self):
    self.down = nn.Dense(
      self.bottleneck,
      kernel_init=torch_linear_kernel_init(self.width),
      bias_init=nn.initializers.zeros,
      dtype=self.dtype,
    )
    self.up = nn.Dense(
      self.width,
      kernel_init=nn.initializers.zeros,
      bias_init=nn.initializers.zeros,
      dtype=self.dtype,
    )
    self.drop = nn.Dropout(self.dropout)

  def __call__(self, h: jax.Array, *, deterministic: bool) -> jax.Array:
    """(b, n, d) → (b, n, d). Dropout draws from the 'dropout' RNG stream when active."""
    z = self.drop(nn.relu(self.down(h)), deterministic=deterministic)
    return self.up(z) * self.scale


class PromptGenerator(nn.Module):
  """Token-mixing prompt generator (SPEC 1.3): P = LN(mixᵀ h'), (b, N, d) → (b, n_prompts, d).

  `mix` is a Dense over the token axis (kernel (N, n_prompts), bias (n_prompts,)); `norm` is a
  LayerNorm over d. Reference init is all zero, which makes P ≡ β (input-independent; SPEC Q2);
  `kaiming_mix=True` draws the mix kernel from U(±1/√N) instead (bias, γ, β stay 0).
  """

  num_tokens: int
  num_prompts: int = 10
  kaiming_mix: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    kernel_init = (
      torch_linear_kernel_init(self.num_tokens) if self.kaiming_mix else nn.initializers.zeros
    )
    self.mix = nn.Dense(
      self.num_prompts, kernel_init=kernel_init, bias_init=nn.initializers.zeros, dtype=self.dtype
    )
    self.norm = nn.LayerNorm(
      epsilon=LN_EPS,
      scale_init=nn.initializers.zeros,
      bias_init=nn.initializers.zeros,
      dtype=self.dtype,
    )

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens (b, N, d) without prompts → prompts (b, n_prompts, d)."""
    chex.assert_axis_dimension(tokens, 1, self.num_tokens)
    u = self.mix(jnp.swapaxes(tokens, 1, 2))  # (b, d, n_prompts)
    return self.norm(jnp.swapaxes(u, 1, 2))


class PEFTBank(nn.Module):
  """One adapter and one prompt generator per block: `adapter_{l}`, `prompt_{l}`."""

  depth: int
  width: int
  num_tokens: int
  bottleneck: int = 16
  adapter_scale: float = 0.1
  adapter_dropout: float = 0.1
  num_prompts: int = 10
  kaiming_mix: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    for l in range(self.depth):
      setattr(
        self,
        f"adapter_{l}",
        ChannelAdapter(
          self.width, self.bottleneck, self.adapter_scale, self.adapter_dropout, dtype=self.dtype
        ),
      )
      setattr(
        self,
        f"prompt_{l}",
        PromptGenerator(self.num_tokens, self.num_prompts, self.kaiming_mix, dtype=self.dtype),
      )

  def adapter(self, l: int, h: jax.Array, *, deterministic: bool) -> jax.Array:
    return getattr(self, f"adapter_{l}")(h, deterministic=deterministic)

  def prompts(self, l: int, tokens: jax.Array) -> jax.Array:
    return getattr(self, f"prompt_{l}")(tokens)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Touches every sub-module once (used only to create parameters)."""
    out = 0.0
    for l in range(self.depth):
      out = out + self.adapter(l, tokens, deterministic=True).sum()
      out = out + self.prompts(l, tokens).sum()
    return out


class PEFTBanks(nn.Module):
  """The `peft` scope: `current` (trained) and `ema` (frozen) banks, created with separate keys."""

  bank: PEFTBank

  def setup(self):
    self.current = self.bank.clone(parent=self, name="current")
    self.ema = self.bank.clone(parent=self, name="ema")
