"""The one trainer: class-incremental learning over a task stream (SPEC 2.4), any method.

Reads top to bottom: plan and workdir → data → mesh → method, parameters and compiled functions
→ session (init or resume) → tasks (`task_loop.run_task`: train, end of task, evaluate,
checkpoint, hooks) → summary. What is specific to a method (its model, step, end-of-task update,
features, prediction) comes through `methods.Method`; this module names none. `config.seeds`
trains several seeds in lockstep: the same code over a `SeedStack` (one plain run, or K stacked
runs whose step is vmapped over seeds), with host bookkeeping as one loop over seeds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections

from ntkcl_jax import config as config_lib
from ntkcl_jax import methods, metrics, report, sharding
from ntkcl_jax import plan as plan_lib
from ntkcl_jax.hooks import TaskHook
from ntkcl_jax.models.ntkcl import init_params
from ntkcl_jax.models.vit import load_augreg
from ntkcl_jax.plan import RunPlan
from ntkcl_jax.run_state import accuracy_matrix, build_streams, check_inputs
from ntkcl_jax.seed_stack import SeedStack
from ntkcl_jax.session import RunSession, open_session
from ntkcl_jax.steps import build_programs, seed_stack
from ntkcl_jax.task_loop import NonFiniteLossError, run_task
from ntkcl_jax.workdir import (
  ProgressBar,
  WorkdirMismatchError,
  check_workdir_config,
  write_json,
)

__all__ = ["NonFiniteLossError", "WorkdirMismatchError", "check_workdir_config", "run"]

log = logging.getLogger("ntkcl_jax")


def _seed_hooks(
  hooks: Sequence[TaskHook] | Mapping[int, Sequence[TaskHook]], seeds: tuple[int, ...]
) -> list[list[TaskHook]]:
  """Per seed, its hooks: a sequence watches the first seed, a mapping the seeds it names."""
  if not isinstance(hooks, Mapping):
    hooks = {seeds[0]: hooks}
  unknown = sorted(set(hooks) - set(seeds))
  if unknown:
    raise ValueError(f"hooks for seeds {unknown}, which this run ({list(seeds)}) does not train.")
  return [list(hooks.get(s, ())) for s in seeds]


def _initial_params(
  plan: RunPlan, method: methods.Method, stack: SeedStack
) -> tuple[list[dict[str, Any]], Any]:
  """(per seed, its parameters at init; the backbone as the compiled functions take it).

  A loaded backbone is shared by the seeds (stored once); without `backbone.checkpoint_path`
  each seed has its own random one (from its init key).
  """
  if plan.shared_backbone:
    backbone = load_augreg(plan.backbone_path, method.spec.vit)
  else:
    backbone = None
    log.warning("backbone.checkpoint_path is empty: using a randomly initialised backbone.")
  inits = [init_params(method.spec, config_lib.init_key(s), backbone) for s in plan.seeds]
  # placed explicitly (replicated, or stacked per seed): also what `preflight` compiles against
  shared = [backbone] if plan.shared_backbone else [p["backbone"] for p in inits]
  return inits, stack.place_backbone(shared, plan.shared_backbone)


def _write_summaries(
  session: RunSession,
  config: ml_collections.ConfigDict,
  backend: dict[str, Any],
  train_loop_time: list[dict[str, Any]],
  wall: float,
) -> list[dict[str, Any]]:
  """Per seed: its final metrics line, summary.json (process 0), and the summary dict."""
  plan = session.plan
  resumed_finished = session.resumed is not None and session.progress.task >= plan.num_tasks
  summaries = []
  for i, (seed, seed_log, writer) in enumerate(zip(plan.seeds, session.logs, session.writers)):
    R = accuracy_matrix(seed_log.stages, plan.num_tasks)
    A = [s["A"] for s in seed_log.stages]
    final = metrics.final_metrics(R, A)
    writer.write({"kind": "final", **final}, step=seed_log.total_steps or plan.num_tasks - 1)
    seed_run = config_lib.seed_config(config, seed) if plan.stacked else config
    summary = {
      "accuracy_matrix": final["R"],
      **{k: final[k] for k in ("avg_acc", "last_acc", "forgetting", "bwt")},
      "stages": seed_log.stages,
      "method": plan.method,
      "quirks": dataclasses.asdict(plan.quirks),
      # a stacked seed's summary carries the config of the single run it equals
      "config": config_lib.flat_config(seed_run),
      "num_devices": jax.device_count(),
      "num_processes": jax.process_count(),
      "backend": backend,
      # train-loop throughput of this process, per task, compile step excluded (`experiments.benchmarks loop`);
      # a stacked run's images are those of all its seeds
      "train_loop_time": train_loop_time,
      "wall_time_s": wall,
    }
    if plan.stacked:
      summary["stacked_seeds"] = list(plan.seeds)
    for hook in session.seed_hooks[i]:
      summary.update(hook.summary())
    # A rerun of a finished run keeps the sections its first run wrote and this one did not (a
    # hook has nothing new to report when every task was already done, e.g. "ntk"). Only then: a
    # run that started over (no checkpoint) must not inherit another run's sections.
    summary_path = session.out_dirs[i] / "summary.json"
    if resumed_finished and summary_path.exists():
      for key, value in json.loads(summary_path.read_text()).items():
        summary.setdefault(key, value)
    if session.is_writer:
      write_json(summary_path, summary)
    writer.close()
    summaries.append(summary)
  return summaries


def _seeds_summary(
  session: RunSession, workdir: pathlib.Path, summaries: list[dict[str, Any]], wall: float
) -> dict[str, Any]:
  """A stacked run's summary over its seeds (mean ± std), written with results.md/.csv."""
  plan = session.plan
  row = report.seed_row(plan.method, summaries)
  top = {
    "seeds": list(plan.seeds),
    "mesh": dict(session.stack.mesh.shape),
    "results": dict(zip(report.SEED_COLUMNS, row)),
    "per_seed": {
      str(s): {k: sm[k] for k in ("avg_acc", "last_acc", "forgetting", "bwt")}
      for s, sm in zip(plan.seeds, summaries)
    },
    "wall_time_s": wall,
  }
  if session.is_writer:
    top["results_md"] = report.write_seed_results(workdir, plan.seeds, [row])
    write_json(workdir / "summary.json", top)
  return {**top, "summaries": summaries}


def run(
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  hooks: Sequence[TaskHook] | Mapping[int, Sequence[TaskHook]] = (),
) -> dict[str, Any]:
  """Trains and evaluates `config` in `workdir`, resuming from its checkpoint.

  One seed (`config.seed`): writes `metrics.jsonl` (train/eval/final lines), checkpoints and
  `summary.json` in `workdir`, and returns the summary. Stacked seeds (`config.seeds`): each seed
  writes what a single run writes in `workdir/seed_<s>/`; checkpoints are shared; `results.md`,
  `results.csv` (mean ± std over seeds) and a `summary.json` of the seeds go to `workdir`, whose
  dict is returned (its "summaries" hold the per-seed summaries). Only process 0 writes files.

  Args:
    hooks: called at init and after each task; a sequence watches the (first) seed, a mapping
      seed → hooks watches the seeds it names.
  """
  t_start = time.time()
  plan = plan_lib.resolve(config)
  check_inputs(plan)  # data and weights on disk, before anything is written
  workdir = pathlib.Path(workdir)
  check_workdir_config(workdir, config, jax.process_index() == 0)
  backend = sharding.backend_info(plan.platform)
  log.info(
    "backend %s: %d x %s (%d local), %d process(es), jax %s",
    *(backend[k] for k in ("backend", "device_count", "device_kind", "local_device_count")),
    backend["process_count"],
    backend["jax_version"],
  )
  seed_hooks = _seed_hooks(hooks, plan.seeds)
  # -- data: the seeds differ only in class order (same splits, tasks, sources) --------------------
  streams = build_streams(plan.data, plan.seeds)
  # -- mesh -------------------------------------------------------------------------------------
  stack = seed_stack(plan)
  if plan.stacked:
    log.info(
      "%d seeds %s stacked on a %s mesh", stack.size, list(plan.seeds), dict(stack.mesh.shape)
    )
  # -- method, parameters, compiled functions (one compilation serves every task) ------------------
  method = methods.build(plan)
  inits, frozen_backbone = _initial_params(plan, method, stack)
  programs = build_programs(plan, method, stack)
  # -- init or resume ---------------------------------------------------------------------------
  session = open_session(
    plan,
    method,
    stack,
    streams,
    programs,
    inits=inits,
    frozen_backbone=frozen_backbone,
    workdir=workdir,
    seed_hooks=seed_hooks,
    t_start=t_start,
  )
  progress = session.progress
  if progress.task == 0 and not progress.in_task and session.resumed is None:
    session.call_hooks(-1)
  # -- tasks ------------------------------------------------------------------------------------
  bar = ProgressBar(session.is_writer, plan.log_every_steps)
  train_loop_time = []
  for t in range(progress.task, plan.num_tasks):
    timing = run_task(session, t, bar)
    if timing is not None:
      train_loop_time.append(timing)
  # -- summary ----------------------------------------------------------------------------------
  wall = session.wall_time()
  summaries = _write_summaries(session, config, backend, train_loop_time, wall)
  if session.ckpts:
    session.ckpts.close()
  if not plan.stacked:
    return summaries[0]
  return _seeds_summary(session, workdir, summaries, wall)
