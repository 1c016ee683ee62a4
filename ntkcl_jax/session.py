"""One process's live run: state, seeds, streams, compiled functions, writers and checkpoints.

`train.run` opens a `RunSession` (`open_session`: initial state or the resumed checkpoint, the
per-seed metric writers) and hands it to the task loop (`task_loop`); the session saves
checkpoints, builds the evaluation parameters and the hooks' read-only views. It names no
method: the method's parts of the state come from `Method.init_state` / `init_proxy_head`.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntkcl_jax import metrics
from ntkcl_jax.checkpoint import RunCheckpoints
from ntkcl_jax.data import TaskStream
from ntkcl_jax.data.sources import check_membership, membership
from ntkcl_jax.evaluate import batched_apply_seeds
from ntkcl_jax.hooks import TaskHook, TaskView
from ntkcl_jax.methods import Method
from ntkcl_jax.plan import RunPlan
from ntkcl_jax.run_progress import RunProgress, SeedLog, progress_from_meta, progress_meta
from ntkcl_jax.run_state import accuracy_matrix
from ntkcl_jax.seed_stack import SeedStack
from ntkcl_jax.steps import Programs
from ntkcl_jax.train_step import TrainState, reg_targets, split_trainable

__all__ = ["RunSession", "eval_params", "initial_run_state", "initial_state", "open_session"]

log = logging.getLogger("ntkcl_jax")


def initial_state(
  method: Method, programs: Programs, params: dict[str, Any], root_key: jax.Array
) -> dict[str, Any]:
  """One seed's run state at init (the backbone is kept apart: it is never trained)."""
  params = {**params, "proxy_head": method.init_proxy_head(root_key)}
  trainable, frozen = split_trainable(params)
  return {
    "train": TrainState(params=trainable, opt_state=programs.tx.init(trainable), step=jnp.int32(0)),
    "ema": frozen["peft"]["ema"],
    "prototypes": jnp.zeros((method.plan.num_classes, method.feature_dim), jnp.float32),
    "reg_snapshot": reg_targets(trainable),
    **method.init_state(),
  }


def initial_run_state(
  method: Method, programs: Programs, stack: SeedStack, inits: Sequence[dict[str, Any]]
) -> dict[str, Any]:
  """The run state at init, stacked over seeds when the run is, not yet placed on the mesh.

  Pure (no data, weights or devices): `ntkcl_jax.preflight` evaluates it with `jax.eval_shape`.
  """
  keys = [jax.random.key(s) for s in stack.seeds]
  return stack.stack([initial_state(method, programs, p, k) for p, k in zip(inits, keys)])


def eval_params(state: dict[str, Any], frozen_backbone: Any) -> dict[str, Any]:
  """{backbone, peft: {current, ema}, fusion} of a run state (stacked when seeds are)."""
  params = state["train"].params
  return {
    "backbone": frozen_backbone,
    "peft": {"current": params["peft"]["current"], "ema": state["ema"]},
    "fusion": params["fusion"],
  }


@dataclasses.dataclass
class RunSession:
  """What the task loop reads and updates (one process; K seeds).

  Attributes:
    state: the run state {"train", "ema", "prototypes", "reg_snapshot", method keys}, on the mesh.
    frozen_backbone: the backbone as the compiled functions take it (shared or stacked).
    progress, logs: the run's and each seed's bookkeeping (`run_progress`).
    writers, metrics_paths, out_dirs: per seed, its metric writer, metrics.jsonl and directory.
    ckpts: the checkpoint manager (None on processes that do not save).
    seed_hooks: per seed, the hooks watching it. resumed: the checkpoint number resumed from.
  """

  plan: RunPlan
  method: Method
  stack: SeedStack
  streams: list[TaskStream]
  programs: Programs
  frozen_backbone: Any
  state: dict[str, Any]
  progress: RunProgress
  logs: list[SeedLog]
  writers: list[metrics.MetricWriter]
  metrics_paths: list[pathlib.Path]
  out_dirs: list[pathlib.Path]
  ckpts: RunCheckpoints | None
  seed_hooks: list[list[TaskHook]]
  resumed: int | None
  is_writer: bool
  t_start: float
  elapsed_before: float

  def wall_time(self) -> float:
    """Seconds of this run so far, over all its processes' lifetimes (resumes included)."""
    return self.elapsed_before + time.time() - self.t_start

  def save(self, finalize: bool = False) -> None:
    """Checkpoints the state and the bookkeeping; `finalize` waits for the write to finish."""
    progress, plan = self.progress, self.plan
    progress.save_number += 1
    progress.wall_time_s = self.wall_time()
    for seed_log, path in zip(self.logs, self.metrics_paths):
      seed_log.metrics_offset = path.stat().st_size if path.exists() else 0
    stream = self.streams[0]
    meta = {
      "progress": progress_meta(progress, self.logs, plan.stacked),
      "config_hash": plan.config_hash,
      "class_order": stream.order.tolist(),
      "data_membership": membership(stream.train, stream.test),  # checked on resume (SPEC 6, 8)
      "quirks": dataclasses.asdict(plan.quirks),
    }
    if plan.stacked:
      meta["class_orders"] = {str(s): st.order.tolist() for s, st in zip(plan.seeds, self.streams)}
    if self.ckpts:
      self.ckpts.save(progress.save_number, self.state, meta)
      if finalize:
        self.ckpts.wait()

  def eval_params(self) -> dict[str, Any]:
    """{backbone, peft: {current, ema}, fusion} of the current state (stacked when seeds are)."""
    return eval_params(self.state, self.frozen_backbone)

  def apply_seeds(
    self, fn: Callable[..., Any], params: Any, indices: list[np.ndarray]
  ) -> list[tuple[Any, np.ndarray]]:
    """Per seed: fn(params, images) over its `indices` of the train split, eval transform."""
    return batched_apply_seeds(
      lambda x: fn(params, x), self.streams, indices, "train", self.plan.eval_batch_size, self.stack
    )

  def _hook_params(self) -> list[Any]:
    """Per seed, host-side eval parameters a hook may place on its own mesh."""
    params, stack = self.eval_params(), self.stack
    if not self.plan.stacked:
      return [params]
    if self.plan.shared_backbone:  # host copies of each seed's slice
      backbone_host = stack.fetch(self.frozen_backbone)
      per_seed = stack.host({k: v for k, v in params.items() if k != "backbone"})
      return [{**p, "backbone": backbone_host} for p in per_seed]
    return stack.host(params)

  def views(self, t: int) -> list[TaskView | None]:
    """Per seed, what its hooks may read (None for seeds without hooks)."""
    if not any(self.seed_hooks):
      return [None] * self.stack.size
    params, protos = self._hook_params(), self.stack.host(self.state["prototypes"])
    splits, num_tasks = self.plan.data.splits, self.plan.num_tasks
    return [
      TaskView(
        task=t,
        num_tasks=num_tasks,
        params=params[i],
        prototypes=np.asarray(protos[i]),
        num_seen=(splits[t][0] + splits[t][1]) if t >= 0 else 0,
        spec=self.method.spec,
        stream=self.streams[i],
        workdir=self.out_dirs[i],
        accuracy_matrix=accuracy_matrix(self.logs[i].stages, num_tasks),
        is_writer=self.is_writer,
        features=self.programs.seed_features,
      )
      if self.seed_hooks[i]
      else None
      for i in range(self.stack.size)
    ]

  def call_hooks(self, t: int) -> None:
    """`on_init` (t = -1) or `on_task_end` of every hook, with its seed's view."""
    for view, hooks in zip(self.views(t), self.seed_hooks):
      for hook in hooks:
        if t < 0:
          hook.on_init(view)
        else:
          hook.on_task_end(view)


def _open_writers(
  plan: RunPlan, out_dirs: list[pathlib.Path], logs: list[SeedLog], is_writer: bool
) -> tuple[list[metrics.MetricWriter], list[pathlib.Path]]:
  """Per seed, its metric writer and metrics.jsonl, truncated to the resumed checkpoint's size."""
  writers, paths = [], []
  for out_dir, seed_log in zip(out_dirs, logs):
    metrics_path = out_dir / "metrics.jsonl"
    rerun = metrics_path.exists()
    if is_writer:
      out_dir.mkdir(parents=True, exist_ok=True)
      if rerun:
        with open(metrics_path, "r+b") as f:  # drop lines written after the checkpoint resumed
          f.truncate(seed_log.metrics_offset)
    writers.append(
      metrics.MetricWriter(
        metrics_path,
        enabled=is_writer,
        tensorboard_dir=out_dir / "tensorboard" if plan.tensorboard else None,
        # the resumed run writes from step total_steps + 1; lines at total_steps are kept
        purge_step=seed_log.total_steps + 1 if rerun else None,
      )
    )
    paths.append(metrics_path)
  return writers, paths


def open_session(
  plan: RunPlan,
  method: Method,
  stack: SeedStack,
  streams: list[TaskStream],
  programs: Programs,
  *,
  inits: Sequence[dict[str, Any]],
  frozen_backbone: Any,
  workdir: pathlib.Path,
  seed_hooks: list[list[TaskHook]],
  t_start: float,
) -> RunSession:
  """The session at init, or at the workdir's latest checkpoint (resume).

  Args:
    inits: per seed, its initial parameters (`models.ntkcl.init_params`).
  """
  is_writer = jax.process_index() == 0
  state = initial_run_state(method, programs, stack, inits)
  ckpts = RunCheckpoints(workdir) if is_writer or jax.process_count() > 1 else None
  progress, logs = RunProgress(), [SeedLog(s) for s in plan.seeds]
  latest = ckpts.latest() if ckpts else None
  if latest is not None:
    abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=stack.sharding), state
    )
    state, meta = ckpts.restore(latest, abstract)
    stream = streams[0]
    check_membership(meta.get("data_membership"), membership(stream.train, stream.test), workdir)
    progress, logs = progress_from_meta(meta["progress"], plan.seeds, plan.stacked)
    log.info(
      "Resuming from checkpoint %d: task %d epoch %d step %d",
      latest,
      progress.task,
      progress.epoch,
      progress.step_in_epoch,
    )
  else:
    state = stack.put(state)
  out_dirs = [workdir / f"seed_{s}" for s in plan.seeds] if plan.stacked else [workdir]
  writers, metrics_paths = _open_writers(plan, out_dirs, logs, is_writer)
  return RunSession(
    plan=plan,
    method=method,
    stack=stack,
    streams=streams,
    programs=programs,
    frozen_backbone=frozen_backbone,
    state=state,
    progress=progress,
    logs=logs,
    writers=writers,
    metrics_paths=metrics_paths,
    out_dirs=out_dirs,
    ckpts=ckpts,
    seed_hooks=seed_hooks,
    resumed=latest,
    is_writer=is_writer,
    t_start=t_start,
    elapsed_before=progress.wall_time_s,
  )
