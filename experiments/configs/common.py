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


# SPEC 2.6 hyperparameters [REF]: C, init, inc, lr0, B, epochs, wd, PTM, λ_MI.
BENCHMARKS = {
  "cifar100": (100, 10, 10, 0.025, 16, 20, 5e-4, False, 0.03),
  "imagenet_r": (200, 20, 20, 0.02, 16, 20, 5e-3, False, 0.2),
  "imagenet_a": (200, 20, 20, 0.02, 16, 20, 5e-3, False, 0.2),
  "domainnet": (345, 23, 23, 0.02, 96, 50, 5e-3, False, 0.2),
  "oxford_pets": (37, 7, 5, 0.02, 96, 5, 5e-3, True, 0.2),
  "eurosat": (10, 2, 2, 1e-4, 96, 5, 5e-3, True, 0.2),
  "plantvillage": (15, 3, 3, 5e-3, 96, 5, 5e-3, True, 0.2),
  "vtab": (50, 10, 10, 0.03, 96, 45, 5e-3, True, 0.2),
  "kvasir": (8, 2, 2, 5e-3, 96, 5, 5e-3, True, 0.2),
}


def benchmark_config(name: str, arg: str | None) -> ml_collections.ConfigDict:
  """ViT-B/16 NTK-CL config of one SPEC 2.6 benchmark.

  Arguments (`file.py:key=value,...`): backbone (in21k | in1k | a path to an AugReg .npz),
  weights_dir (where the AugReg files live), data_dir, seed (0-4), mode (reference | corrected).
  """
  args = parse_arg(
    arg, backbone="in21k", weights_dir="weights", data_dir="", seed=0, mode="reference"
  )
  classes, init, inc, lr, batch, epochs, wd, ptm, lambda_mi = BENCHMARKS[name]
  c = base_config()
  c.seed, c.mode = args.seed, args.mode
  c.data.name = name
  c.data.data_dir = args.data_dir
  c.data.num_classes, c.data.init_cls, c.data.increment = classes, init, inc
  c.train.lr, c.train.batch_size, c.train.epochs, c.train.weight_decay = lr, batch, epochs, wd
  c.model.use_init_ptm = ptm
  c.loss.lambda_mi = lambda_mi
  with_backbone(c, args.backbone, args.weights_dir)
  return c
