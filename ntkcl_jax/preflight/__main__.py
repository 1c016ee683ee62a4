"""`python -m ntkcl_jax.preflight --config <config.py> --target <target> [--json FILE]
[--functions train_step,features,predict,ntk_block] [--slices N]
[--max-seeds | --max-batch | --max-ntk-block [--capacity-limit N]]`."""

import sys

from absl import app, flags
from ml_collections import config_flags

from ntkcl_jax.cli import parse_flags
from ntkcl_jax.preflight import gpus
from ntkcl_jax.preflight.command import main
from ntkcl_jax.preflight.targets import valid_targets_text

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file.", lock_config=True
)
_TARGET = flags.DEFINE_string("target", None, f"What to compile for; {valid_targets_text()}")
_JSON = flags.DEFINE_string("json", None, "Also write the report as JSON to this file.")
_FUNCTIONS = flags.DEFINE_list(
  "functions",
  None,
  "Compile only these of train_step, features, predict, ntk_block (default: the first three, "
  "and ntk_block, the NTK hook's kernel, when analysis.enabled).",
)
_SLICES = flags.DEFINE_integer(
  "slices", 1, "A multi-slice job: this many copies of the --target slice (TPU)."
)
_MAX_SEEDS = flags.DEFINE_bool(
  "max-seeds",
  False,
  "Search the largest number K of stacked seeds (--config.seeds=0,...,K-1) whose compiled "
  "functions fit the target's per-device HBM.",
)
_MAX_BATCH = flags.DEFINE_bool(
  "max-batch",
  False,
  "Search the largest train.batch_size (per seed) whose compiled functions fit the target's "
  "per-device HBM (multiples of the data axis only).",
)
_MAX_NTK_BLOCK = flags.DEFINE_bool(
  "max-ntk-block",
  False,
  "Search the largest NTK probe block (analysis.batch_size) whose kernel fits one device of the "
  "target (the NTK hook runs on one device).",
)
_LIMIT = flags.DEFINE_integer(
  "capacity-limit",
  None,
  "Largest value --max-seeds / --max-batch searches (default 1024 seeds, batch 65536).",
)
flags.mark_flags_as_required(["config", "target"])

if __name__ == "__main__":
  # Before anything asks JAX for a backend (app.run loads the config file): lets the CUDA plugin
  # register on a machine without an NVIDIA driver, so GPU targets compile (gpus.py). It only
  # skips the plugin's CUDA version check.
  gpus.allow_deviceless_cuda()
  app.run(
    lambda argv: sys.exit(
      main(
        _CONFIG.value,
        _TARGET.value,
        _JSON.value,
        functions=_FUNCTIONS.value,
        max_seeds=_MAX_SEEDS.value,
        max_batch=_MAX_BATCH.value,
        max_ntk_block=_MAX_NTK_BLOCK.value,
        capacity_limit=_LIMIT.value,
        slices=_SLICES.value,
      )
    ),
    flags_parser=parse_flags,
  )
