"""Command line: `python -m ntkcl_jax.main --config experiments/configs/<name>.py --workdir DIR`.

Kept short so the logic stays importable (`ntkcl_jax.train.run`). Rerunning the same command on
the same workdir resumes; `--config.key=value` overrides (unknown keys are an error listing the
valid ones). On multi-host systems (TPU pod slices) every worker runs the same command with
`--multihost` (or the explicit `--coordinator_address/--num_processes/--process_id`).
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it exists).")
_MULTIHOST = flags.DEFINE_bool(
  "multihost", False, "Call jax.distributed.initialize() (TPU pods, SLURM)."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def _initialize_distributed() -> None:
  import jax

  if _COORDINATOR.value:
    if jax.default_backend() == "cpu" or not jax.devices():
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _MULTIHOST.value:
    jax.distributed.initialize()


def main(argv: list[str]) -> int:
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
  for noisy in ("absl", "jax._src", "orbax", "etils"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  if _COORDINATOR.value or _MULTIHOST.value:
    _initialize_distributed()  # before any other JAX call

  import jax

  from ntkcl_jax import report, train
  from ntkcl_jax.checkpoint import CheckpointShapeError
  from ntkcl_jax.models.vit import CheckpointMismatchError

  config = _CONFIG.value
  hooks = []
  try:
    if config.analysis.enabled:
      from analysis.hook import NTKHook

      hooks.append(NTKHook(config))
    summary = train.run(config, _WORKDIR.value, hooks)
  except (
    ValueError,
    FileNotFoundError,
    NotImplementedError,
    train.NonFiniteLossError,
    CheckpointShapeError,
    CheckpointMismatchError,
  ) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if jax.process_index() == 0:
    report.write_plots(summary, _WORKDIR.value)
    print(report.results_table(summary))
    print(f"wall time {summary['wall_time_s']:.1f} s; summary: {_WORKDIR.value}/summary.json")
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
