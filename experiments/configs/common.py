"""Shared config pieces: the base schema (`ntkcl_jax.config.base_config`) and argument parsing."""

from __future__ import annotations

import ml_collections

from ntkcl_jax.config import base_config

__all__ = ["base_config", "parse_arg", "vitb_config", "with_backbone"]

# AugReg files (SPEC 1.1): under the `weights_dir=` argument, or pass backbone=/path/to/file.npz.
BACKBONES = {
  "in21k": "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz",
  "in1k": "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz",
}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `key=value,key=value` config arguments, typed by `defaults`; unknown keys raise."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"Unknown config argument '{key}'; valid: {sorted(defaults)}.")
    kind = type(defaults[key])
    out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
  return ml_collections.ConfigDict(out)


def with_backbone(config: ml_collections.ConfigDict, backbone: str, weights_dir: str) -> None:
  """ViT-B/16 geometry and the AugReg file for `backbone` ('in21k', 'in1k' or a path)."""
  config.backbone.checkpoint_path = (
    f"{weights_dir.rstrip('/')}/{BACKBONES[backbone]}" if backbone in BACKBONES else backbone
  )


def vitb_config(arg: str | None) -> ml_collections.ConfigDict:
  """The base config of a ViT-B/16 benchmark (SPEC 2.6); each benchmark file sets its data and
  hyper-parameters on it by name.

  Arguments (`file.py:key=value,...`): backbone (in21k | in1k | a path to an AugReg .npz),
  weights_dir (where the AugReg files live), data_dir, seed (0-4), mode (reference | corrected).
  """
  args = parse_arg(
    arg, backbone="in21k", weights_dir="weights", data_dir="", seed=0, mode="reference"
  )
  c = base_config()
  c.seed, c.mode = args.seed, args.mode
  c.data.data_dir = args.data_dir
  with_backbone(c, args.backbone, args.weights_dir)
  return c
