"""`python -m ntkcl_jax.preflight --config <config.py> --target <target> [--json FILE]`."""

import sys

from absl import app, flags
from ml_collections import config_flags

from ntkcl_jax.cli import parse_flags
from ntkcl_jax.preflight.command import main
from ntkcl_jax.preflight.targets import valid_targets_text

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file.", lock_config=True
)
_TARGET = flags.DEFINE_string("target", None, f"What to compile for; {valid_targets_text()}")
_JSON = flags.DEFINE_string("json", None, "Also write the report as JSON to this file.")
flags.mark_flags_as_required(["config", "target"])

if __name__ == "__main__":
  app.run(
    lambda argv: sys.exit(main(_CONFIG.value, _TARGET.value, _JSON.value)), flags_parser=parse_flags
  )
