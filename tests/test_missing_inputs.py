"""A benchmark config run without its data or its backbone weights stops at start with one error
naming everything missing (data and weights together, each with its fix), before anything is
written to the workdir. Compile-only code paths read neither, so config validation accepts them."""

from __future__ import annotations

import importlib

import pytest

from ntkcl_jax import config as config_lib
from ntkcl_jax import plan, run_state, train
from ntkcl_jax.models.vit import missing_checkpoint
from tests import tiny_configs as tc

BENCHMARK_CONFIGS = (
  "cifar100",
  "imagenet_r",
  "imagenet_a",
  "domainnet",
  "oxford_pets",
  "eurosat",
  "plantvillage",
  "vtab",
  "kvasir",
)


@pytest.mark.parametrize("name", BENCHMARK_CONFIGS)
def test_benchmark_without_data_and_weights_stops_before_writing(name, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  module = importlib.import_module(f"experiments.configs.{name}")
  config = module.get_config(f"data_dir={empty},weights_dir={tmp_path / 'weights'}")
  config_lib.validate(config)  # the config itself is fine (a compile-only path accepts it)
  workdir = tmp_path / "run"
  with pytest.raises(run_state.MissingInputsError) as err:
    train.run(config, workdir)
  message = str(err.value)
  assert message.startswith("this run's inputs are missing; nothing was written.")
  assert f"data ({name}, --config.data.data_dir='{empty}')" in message
  assert "Nothing is downloaded at run time" in message
  assert "backbone weights (--config.backbone.checkpoint_path)" in message
  assert str(tmp_path / "weights" / "B_16-i21k") in message and "never downloaded" in message
  assert not workdir.exists()


def test_weights_alone_missing_names_only_the_weights(tmp_path):
  config = tc.tiny_config(backbone__checkpoint_path=str(tmp_path / "nope.npz"))
  assert run_state.missing_inputs(plan.resolve(config)) == [
    "backbone weights (--config.backbone.checkpoint_path): "
    + missing_checkpoint(str(tmp_path / "nope.npz"))
  ]
  assert (
    run_state.missing_inputs(plan.resolve(tc.tiny_config())) == []
  )  # the demo's data and random backbone


def test_cli_first_run_of_cifar100_with_the_default_data_dir(tmp_path):
  """The first command a new user types for a benchmark: one `error:` message, no traceback,
  no workdir (TFDS's default data dir holds no prepared cifar100 here)."""
  r = tc.run_cli(
    tmp_path / "run", config="experiments/configs/cifar100.py", num_devices=1, timeout=120
  )
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr and r.stderr.count("error: ") == 1, r.stderr[-3000:]
  message = r.stderr[r.stderr.index("error: ") :]
  assert "backbone weights" in message and "weights/B_16-i21k" in message
  if "data (cifar100" in message:  # absent unless this machine has cifar100 prepared for TFDS
    assert "is not prepared in the default TFDS data dir" in message
    assert "tfds build cifar100 --file_format=array_record" in message
  assert not (tmp_path / "run").exists()
