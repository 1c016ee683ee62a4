"""experiments/configs: each benchmark config states its values by name and documents itself."""

import importlib
import pathlib

import pytest

from experiments.configs import common
from ntkcl_jax import config as config_lib
from ntkcl_jax.data.class_order import task_splits

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs"
BENCHMARKS = sorted(
  p.stem for p in CONFIGS.glob("*.py") if p.stem not in ("__init__", "common", "demo")
)
# SPEC 2.6 [REF], one row per benchmark (the file stem; the reference key in the comment):
# C, init, increment, T, lr, batch, epochs, weight decay, PTM pass, λ_MI
SPEC_2_6 = {
  "cifar100": (100, 10, 10, 10, 0.025, 16, 20, 5e-4, False, 0.03),  # cifar224
  "imagenet_r": (200, 20, 20, 10, 0.02, 16, 20, 5e-3, False, 0.2),  # imagenetr
  "imagenet_a": (200, 20, 20, 10, 0.02, 16, 20, 5e-3, False, 0.2),  # imageneta
  "domainnet": (345, 23, 23, 15, 0.02, 96, 50, 5e-3, False, 0.2),  # domainnet
  "oxford_pets": (37, 7, 5, 7, 0.02, 96, 5, 5e-3, True, 0.2),  # oxfordpets
  "eurosat": (10, 2, 2, 5, 1e-4, 96, 5, 5e-3, True, 0.2),  # eurosat
  "plantvillage": (15, 3, 3, 5, 5e-3, 96, 5, 5e-3, True, 0.2),  # plantvillage
  "vtab": (50, 10, 10, 5, 0.03, 96, 45, 5e-3, True, 0.2),  # vtab
  "kvasir": (8, 2, 2, 4, 5e-3, 96, 5, 5e-3, True, 0.2),  # kvasir
}
# SPEC 2.6 "Shared" (the same for all nine), SPEC 1.1 (ViT-B/16 at 224 px, [0, 1] input) and
# SPEC 2.5 (RandomResizedCrop scale (0.05, 1); test: short side 256, centre crop 224).
SPEC_SHARED = {
  "model.name": "both",
  "model.adapter_dim": 16,
  "model.adapter_scale": 0.1,
  "model.adapter_dropout": 0.1,
  "model.num_prompts": 10,
  "model.prompt_carry": 0.1,
  "model.fusion_heads": 8,
  "model.fusion_dropout": 0.1,
  "model.frozen_prompt_list_num": 1,
  "eval.alpha": 0.1,
  "eval.beta": 1.0,
  "eval.gamma": 0.3,
  "eval.head": "prototypes",
  "loss.lambda_orth": 1e-4,
  "loss.lambda_reg": 1e-3,
  "loss.tau": 0.1,
  "loss.svd_k": 40,
  "train.momentum": 0.9,
  "train.use_ema": True,
  "train.max_tasks": -1,
  "method": "ntkcl",
  "mode": "reference",
  "backbone.image_size": 224,
  "backbone.patch_size": 16,
  "backbone.width": 768,
  "backbone.depth": 12,
  "backbone.num_heads": 12,
  "backbone.mlp_dim": 3072,
  "data.value_range": "0_1",
  "data.crop_scale_min": 0.05,
  "data.resize_size": 256,
  "data.max_train_per_class": -1,
  "data.max_test_per_class": -1,
}


def test_every_benchmark_config_is_pinned():
  # the nine SPEC 2.6 benchmarks, plus the offline tiny one (no SPEC 2.6 row)
  assert sorted(SPEC_2_6) == sorted(set(BENCHMARKS) - {"fashion_mnist"})


@pytest.mark.parametrize("name", BENCHMARKS)
def test_config_validates_and_documents_itself(name):
  module = importlib.import_module(f"experiments.configs.{name}")
  config = module.get_config()
  config_lib.validate(config)
  doc = module.__doc__
  assert "python -m ntkcl_jax.main --config experiments/configs/" in doc
  if name != "fashion_mnist":  # the offline tiny benchmark has no published target
    assert "Target (SPEC 5" in doc
    source = (CONFIGS / f"{name}.py").read_text()
    for key in ("num_classes", "init_cls", "increment", "lr", "batch_size", "epochs"):
      assert f".{key} = " in source, f"{name}.py does not state {key} by name"


@pytest.mark.parametrize("backbone", ["in21k", "in1k"])
@pytest.mark.parametrize("name", sorted(SPEC_2_6))
def test_benchmark_hyperparameters_are_spec_2_6(name, backbone):
  # "Both backbones use the same values" (SPEC 2.6); only the AugReg file differs (SPEC 1.1).
  c = importlib.import_module(f"experiments.configs.{name}").get_config(
    f"backbone={backbone},seed=3"
  )
  # every quirk at its released-code value (SPEC 0 "Modes", 4)
  assert config_lib.validate(c) == config_lib.resolve_quirks("reference")
  got = (
    c.data.num_classes,
    c.data.init_cls,
    c.data.increment,
    len(task_splits(c.data.num_classes, c.data.init_cls, c.data.increment)),
    c.train.lr,
    c.train.batch_size,
    c.train.epochs,
    c.train.weight_decay,
    c.model.use_init_ptm,
    c.loss.lambda_mi,
  )
  assert got == SPEC_2_6[name] and c.seed == 3
  # no remainder task on any of the nine (SPEC 2.7)
  C, init, inc, T = SPEC_2_6[name][:4]
  assert init + (T - 1) * inc == C
  flat = config_lib.flat_config(c)
  assert {k: flat[k] for k in SPEC_SHARED} == SPEC_SHARED
  assert c.data.name == name
  assert c.backbone.checkpoint_path == f"weights/{common.BACKBONES[backbone]}"
  assert ("imagenet2012" in c.backbone.checkpoint_path) == (backbone == "in1k")
