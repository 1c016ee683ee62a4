"""Command line: `python -m ntkcl_jax.main --config experiments/configs/<name>.py --workdir DIR`.

Kept short so the logic stays importable (`ntkcl_jax.train.run`). Rerunning the same command on
the same workdir resumes; `--config.key=value` overrides (unknown keys are an error listing the
valid ones). On multi-host systems (TPU pod slices) every worker runs the same command with
`--multihost` (or the explicit `--coordinator_address/--num_processes/--process_id`); see
`experiments/launch_tpu_pod.sh`. `--config.train.platform=gpu|tpu|cpu` stops at start when JAX
did not get that backend (a CUDA or TPU install that silently fell back to CPU).
"""

from __future__ import annotations

import logging
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from ntkcl_jax.cli import fail as _fail
from ntkcl_jax.cli import parse_flags as _parse_flags

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
    # Cross-process collectives of the CPU client (ignored by GPU/TPU). Querying the backend here
    # (jax.default_backend(), jax.devices()) would initialise it and make initialize() fail.
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

  from ntkcl_jax import config as config_lib
  from ntkcl_jax import report, train
  from ntkcl_jax.checkpoint import CheckpointShapeError
  from ntkcl_jax.models.vit import CheckpointMismatchError

  config = _CONFIG.value
  if "://" in _WORKDIR.value:  # pathlib would turn gs://b/x into a local directory gs:/b/x
    _fail(
      f"--workdir={_WORKDIR.value}: the workdir must be a filesystem path (metrics.jsonl and "
      "config.json are written with open()); mount the bucket with gcsfuse and pass the mount "
      'path (README "GPU / TPU").'
    )
  hooks = {}
  try:
    if config.analysis.enabled:
      from analysis.hook import NTKHook

      seeds = config_lib.run_seeds(config)
      watched = seeds if config.analysis.seeds == "all" else seeds[:1]
      hooks = {s: [NTKHook(config_lib.seed_config(config, s))] for s in watched}
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
    workdir = pathlib.Path(_WORKDIR.value)
    stacked = "summaries" in summary  # config.seeds: one output directory per seed
    runs = (
      [(workdir / f"seed_{s}", sm) for s, sm in zip(summary["seeds"], summary["summaries"])]
      if stacked
      else [(workdir, summary)]
    )
    for out_dir, seed_summary in runs:
      report.write_plots(seed_summary, out_dir)
      if config.analysis.enabled and (out_dir / "analysis").is_dir():
        from analysis import plots

        plots.write_all(out_dir)
    print(summary["results_md"] if stacked else report.results_table(summary))
    print(f"wall time {summary['wall_time_s']:.1f} s; summary: {workdir}/summary.json")
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)
