"""Test fixtures: tiny model specs and an AugReg-layout `.npz` writer."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from ntkcl_jax.models.ntkcl import ModelSpec
from ntkcl_jax.models.vit import ViTSpec, expected_shapes

TINY_VIT = ViTSpec(image_size=16, patch_size=8, width=16, depth=3, num_heads=2, mlp_dim=32)


def tiny_spec(**overrides) -> ModelSpec:
  """A 3-block, width-16 NTK-CL spec (5 tokens, 3 prompts) with the from_config geometry."""
  base = ModelSpec(vit=TINY_VIT, adapter_dim=4, num_prompts=3, fixed_197_tokens=False)
  return dataclasses.replace(base, **overrides)


def fake_augreg_arrays(spec: ViTSpec, seed: int = 0, head: int = 7) -> dict[str, np.ndarray]:
  """Random float32 arrays under the exact AugReg flat keys for `spec`, plus a `head/*`."""
  rng = np.random.default_rng(seed)
  arrays = {k: rng.normal(0, 0.2, s).astype(np.float32) for k, s in expected_shapes(spec).items()}
  arrays["head/kernel"] = rng.normal(size=(spec.width, head)).astype(np.float32)
  arrays["head/bias"] = np.zeros(head, np.float32)
  return arrays


def write_fake_augreg(
  directory: pathlib.Path, spec: ViTSpec, seed: int = 0, **extra
) -> pathlib.Path:
  path = pathlib.Path(directory) / f"fake_augreg_{seed}.npz"
  np.savez(path, **{**fake_augreg_arrays(spec, seed), **extra})
  return path
