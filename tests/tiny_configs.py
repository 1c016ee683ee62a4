"""Tiny trainer configs and CLI helpers for the system tests.

`tiny_config()` is `experiments/configs/demo.py:get_config()` shrunk to a few seconds of compute:
16 training / 8 test images per class, one epoch, two tasks, a checkpoint every step, and (unless
`small=False`) a depth-2 width-16 randomly initialised backbone, which compiles in about half the
time of the shipped depth-4 width-64 one. Accuracies are then meaningless as numbers; the tests
compare runs with each other. `cli_flags()` gives the same config as `--config.key=value` flags, so
CLI subprocess tests run exactly what in-process `train.run` tests run.

Compilation dominates these runs on CPU, so subprocesses share a persistent compilation cache
(`subprocess_env(cache_dir=...)`): runs of the same config and device count compile once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from experiments.configs import demo
from tests import numerics

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "experiments" / "configs" / "demo.py"

# The shrink, as flat keys. Batch sizes divide 8 devices and 2 processes.
TINY: dict[str, Any] = {
  "data.max_train_per_class": 16,
  "data.max_test_per_class": 8,
  "train.epochs": 1,
  "train.max_tasks": 2,
  "train.batch_size": 16,
  "eval.batch_size": 16,
  "train.log_every_steps": 1,
  "train.checkpoint_every_steps": 1,
  "analysis.enabled": False,  # the demo turns NTK diagnostics on; tests/analysis covers them
}

SMALL_BACKBONE: dict[str, Any] = {
  "backbone.checkpoint_path": "",
  "backbone.patch_size": 7,
  "backbone.width": 16,
  "backbone.depth": 2,
  "backbone.num_heads": 2,
  "backbone.mlp_dim": 32,
  "model.num_prompts": 2,
  "model.adapter_dim": 4,
  "model.fusion_heads": 2,
}


# What a built-in method needs beyond the demo's settings to run (`Method.check_plan`).
METHOD_NEEDS: dict[str, dict[str, Any]] = {"ntkcl_ogd": {"train__use_ema": False}}


def method_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
  """`tiny_config(method=name)` with what the method needs (`METHOD_NEEDS`)."""
  return tiny_config(method=name, **METHOD_NEEDS.get(name, {}), **overrides)


def tiny_overrides(small: bool = True, **overrides: Any) -> dict[str, Any]:
  """Flat `key: value` changes to the demo config (`overrides` use "__" for ".")."""
  flat = {**TINY, **(SMALL_BACKBONE if small else {})}
  flat.update({k.replace("__", "."): v for k, v in overrides.items()})
  return flat


def tiny_config(small: bool = True, **overrides: Any) -> ml_collections.ConfigDict:
  """The demo config with `tiny_overrides(small, **overrides)` applied."""
  c = demo.get_config()
  for key, value in tiny_overrides(small, **overrides).items():
    section, _, name = key.rpartition(".")
    (c[section] if section else c)[name] = value
  return c


def cli_flags(small: bool = True, **overrides: Any) -> list[str]:
  """`--config.key=value` flags that turn the demo config into `tiny_config(small, **overrides)`."""
  return [f"--config.{k}={v}" for k, v in tiny_overrides(small, **overrides).items()]


def subprocess_env(
  num_devices: int = 8, cache_dir: str | os.PathLike | None = None
) -> dict[str, str]:
  """Environment for a child Python: CPU, `num_devices` simulated devices, the repo importable,
  XLA's optimisations as in this process (the numerics guard of `tests/numerics.py` included),
  and (with `cache_dir`) a persistent compilation cache shared by the children."""
  env = dict(os.environ)
  env.update(
    XLA_FLAGS=numerics.xla_flags(num_devices),
    JAX_PLATFORMS="cpu",
    JAX_DISABLE_MOST_OPTIMIZATIONS=numerics.optimizations_disabled_env(),
    TF_CPP_MIN_LOG_LEVEL="3",
    PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])),
  )
  if cache_dir is not None:
    env.update(
      JAX_COMPILATION_CACHE_DIR=str(cache_dir),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2",
    )
  return env


def cli_command(workdir: str | os.PathLike, *flags: str, config: str | None = None) -> list[str]:
  """`python -m ntkcl_jax.main --config <demo.py> --workdir <workdir> <flags>`."""
  return [
    sys.executable,
    "-m",
    "ntkcl_jax.main",
    f"--config={config or DEMO_CONFIG}",
    f"--workdir={workdir}",
    *flags,
  ]


def run_cli(
  workdir: str | os.PathLike,
  *flags: str,
  num_devices: int = 8,
  cache_dir: str | os.PathLike | None = None,
  timeout: float = 600,
  config: str | None = None,
) -> subprocess.CompletedProcess:
  """Runs the CLI to completion; returns the CompletedProcess (text stdout / stderr)."""
  return subprocess.run(
    cli_command(workdir, *flags, config=config),
    cwd=REPO,
    env=subprocess_env(num_devices, cache_dir),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def kill_at_first_checkpoint(
  workdir: pathlib.Path,
  flags: list[str],
  cache_dir: str | os.PathLike,
  log_path: pathlib.Path,
  number: int = 1,
) -> None:
  """Runs the CLI on 8 devices and SIGKILLs it as soon as checkpoint `number` (or a later one) is
  finished (the trainer numbers its saves 1, 2, ...; the tiny config saves after every step and
  at every task end, so 2 is task 0's end)."""
  with open(log_path, "w") as err:
    proc = subprocess.Popen(
      cli_command(workdir, *flags),
      cwd=REPO,
      env=subprocess_env(8, cache_dir),
      stdout=subprocess.DEVNULL,
      stderr=err,
    )
    deadline = time.monotonic() + 600
    try:
      while not [n for n in checkpoint_numbers(workdir) if n >= number]:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 600 s"
        time.sleep(0.02)
      os.kill(proc.pid, signal.SIGKILL)
    finally:
      proc.kill()
      proc.wait()
  assert proc.returncode == -signal.SIGKILL


def run_python(
  code: str,
  *args: str,
  num_devices: int = 8,
  cache_dir: str | os.PathLike | None = None,
  timeout: float = 600,
) -> subprocess.CompletedProcess:
  """`python -c code args...` from the repo root with `subprocess_env(num_devices, cache_dir)`;
  asserts exit status 0 (the child's stderr tail in the message) and returns the process."""
  r = subprocess.run(
    [sys.executable, "-c", code, *args],
    cwd=REPO,
    env=subprocess_env(num_devices, cache_dir),
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert r.returncode == 0, r.stderr[-4000:]
  return r


def free_port() -> int:
  """A TCP port on localhost that was free a moment ago."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# Session-wide pieces. Pytest fixtures defined here and imported into several test modules would be
# separate fixtures per module; these helpers key everything on the session's base temp directory
# instead, so the test modules share one compilation cache and one reference CLI run.


def compile_cache_dir(tmp_path_factory) -> pathlib.Path:
  """The session's persistent JAX compilation cache (shared by subprocesses and in-process runs)."""
  path = tmp_path_factory.getbasetemp() / "jax_compilation_cache"
  path.mkdir(exist_ok=True)
  return path


@contextlib.contextmanager
def compilation_cache(path: str | os.PathLike) -> Iterator[None]:
  """Uses the persistent compilation cache at `path` in this process, then switches it off again.

  Relies on `jax._src.compilation_cache.reset_cache` (JAX reads the cache settings once); without
  it the block runs uncached, which is only slower.
  """
  try:
    from jax._src import compilation_cache as cc
  except ImportError:  # pragma: no cover - a JAX without the private module
    yield
    return
  old_dir = jax.config.jax_compilation_cache_dir
  old_min = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  cc.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", old_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old_min)
    cc.reset_cache()


def reference_cli_run(tmp_path_factory) -> pathlib.Path:
  """Workdir of one uninterrupted CLI run of `cli_flags()` on 8 devices, made once per session."""
  workdir = tmp_path_factory.getbasetemp() / "cli_reference_run"
  if not (workdir / "summary.json").exists():
    r = run_cli(workdir, *cli_flags(), cache_dir=compile_cache_dir(tmp_path_factory))
    assert r.returncode == 0, f"reference CLI run failed:\n{r.stderr[-4000:]}"
  return workdir


# ------------------------------------------------------------------------------------------------
# Reading a run's outputs.


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def without_timing(record: dict[str, Any]) -> dict[str, Any]:
  """`record` without wall-clock fields (the only thing allowed to differ between equal runs)."""
  return {k: v for k, v in record.items() if "time" not in k}


def checkpoint_numbers(workdir: str | os.PathLike) -> list[int]:
  """Finished checkpoints in `workdir/checkpoints` (numbered directories), ascending."""
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def file_digests(directory: str | os.PathLike) -> dict[str, str]:
  """relative path -> sha256 of every file under `directory`."""
  root = pathlib.Path(directory)
  return {
    str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(root.rglob("*"))
    if p.is_file()
  }


def read_checkpoint(
  workdir: str | os.PathLike, number: int | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(state leaves by path as NumPy, meta) of checkpoint `number` (default: the latest)."""
  from ntkcl_jax.checkpoint import RunCheckpoints

  ckpts = RunCheckpoints(workdir, async_save=False)
  try:
    number = ckpts.latest() if number is None else number
    assert number is not None, f"no checkpoint in {workdir}"
    out = ckpts.manager.restore(
      number,
      args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()),
    )
  finally:
    ckpts.close()
  flat, _ = jax.tree_util.tree_flatten_with_path(out["state"])
  leaves = {jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(v) for k, v in flat}
  return leaves, out["meta"]
