"""Shared config pieces: the base schema (`ntkcl_jax.config.base_config`) and argument parsing."""

from __future__ import annotations

import ml_collections

from ntkcl_jax.config import base_config

__all__ = ["base_config", "parse_arg", "with_backbone"]

# AugReg files (SPEC 1.1); put them under $NTKCL_WEIGHTS or pass backbone=/path/to/file.npz.
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
