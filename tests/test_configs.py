"""experiments/configs: each benchmark config states its values by name and documents itself."""

import importlib
import pathlib

import pytest

from ntkcl_jax import config as config_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs"
BENCHMARKS = sorted(
  p.stem for p in CONFIGS.glob("*.py") if p.stem not in ("__init__", "common", "demo")
)
# SPEC 2.6 [REF]: C, init, increment, lr, batch, epochs, weight decay, PTM pass, λ_MI
SPEC_2_6 = {
  "cifar100": (100, 10, 10, 0.025, 16, 20, 5e-4, False, 0.03),
  "domainnet": (345, 23, 23, 0.02, 96, 50, 5e-3, False, 0.2),
  "oxford_pets": (37, 7, 5, 0.02, 96, 5, 5e-3, True, 0.2),
  "eurosat": (10, 2, 2, 1e-4, 96, 5, 5e-3, True, 0.2),
  "vtab": (50, 10, 10, 0.03, 96, 45, 5e-3, True, 0.2),
}


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


@pytest.mark.parametrize("name", sorted(SPEC_2_6))
def test_benchmark_hyperparameters_are_spec_2_6(name):
  c = importlib.import_module(f"experiments.configs.{name}").get_config("backbone=in1k,seed=3")
  got = (
    c.data.num_classes,
    c.data.init_cls,
    c.data.increment,
    c.train.lr,
    c.train.batch_size,
    c.train.epochs,
    c.train.weight_decay,
    c.model.use_init_ptm,
    c.loss.lambda_mi,
  )
  assert got == SPEC_2_6[name] and c.seed == 3
  assert c.backbone.checkpoint_path.startswith("weights/") and "imagenet2012" in (
    c.backbone.checkpoint_path
  )
