"""One task of a run (SPEC 2.4): its training steps, then its end (method update, evaluation).

`run_task(session, t, bar)` is what `train.run` calls per task: `start_task` (fresh head and
optimiser state), `train_steps` (the jitted step over prefetched batches, logging, mid-task
checkpoints, the non-finite check), and `end_task` (the method's EMA and end-of-task update,
evaluation, snapshot, checkpoint, hooks). The method is only reached through its protocol.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntkcl_jax.data.prefetch import prefetch
from ntkcl_jax.evaluate import evaluate_stages
from ntkcl_jax.methods import Method, TaskEnd
from ntkcl_jax.plan import RunPlan
from ntkcl_jax.seed_stack import SeedStack
from ntkcl_jax.session import RunSession
from ntkcl_jax.train_step import Health, TaskSchedule, TrainState, bad_term_names, reg_targets
from ntkcl_jax.workdir import ProgressBar

__all__ = [
  "TRAIN_BATCH_KEYS",
  "NonFiniteLossError",
  "frozen_and_aux",
  "run_task",
  "task_step_trees",
  "task_train_state",
]

log = logging.getLogger("ntkcl_jax")


class NonFiniteLossError(RuntimeError):
  """A loss term became NaN/Inf; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class _TaskSteps:
  """Task t's step plan: its epochs, each seed's steps per epoch (the loop runs the longest)."""

  task: int
  epochs: int
  seed_steps: list[int]
  task_keys: list[jax.Array]

  @property
  def steps(self) -> int:
    return max(self.seed_steps)


# The train step's batch: these keys of a `TaskStream.train_batches` batch.
TRAIN_BATCH_KEYS = ("image", "label", "mask")


def task_train_state(
  method: Method, tx: optax.GradientTransformation, stack: SeedStack, params: Any, task_keys: Any
) -> TrainState:
  """The train state task t starts from, not yet placed: a fresh proxy head (unless the method
  keeps one) and optimiser state (SPEC 2.4 step 1). Pure: `preflight` evaluates its shapes."""
  params_t = dict(params)
  heads = [method.task_proxy_head(k) for k in task_keys]
  if heads[0] is not None:
    params_t["proxy_head"] = stack.stack(heads)
  return TrainState(
    params=params_t, opt_state=tx.init(params_t), step=stack.stack([jnp.int32(0)] * stack.size)
  )


def task_step_trees(
  plan: RunPlan,
  method: Method,
  stack: SeedStack,
  task: int,
  task_keys: Any,
  seed_steps: list[int],
  epochs: int,
  host_prototypes: list[np.ndarray],
) -> tuple[Any, Any, Any]:
  """(the method's task aux, schedule, health) of task t's steps, stacked, not yet placed.

  `host_prototypes`: per seed, its (C, D) prototypes before the task (host NumPy).
  """
  k_t, s_t = plan.data.splits[task]
  aux = stack.stack([method.task_aux(protos, task, k_t, s_t) for protos in host_prototypes])
  schedule = stack.stack(
    [TaskSchedule.make(k, plan.lr, max(epochs, 1), n) for k, n in zip(task_keys, seed_steps)]
  )
  return aux, schedule, stack.stack([Health.fresh()] * stack.size)


def frozen_and_aux(
  state: dict[str, Any], frozen_backbone: Any, task_aux: Any, method: Method
) -> tuple[Any, Any]:
  """The train step's (frozen, aux) arguments from the run state and the task's aux; aux also
  carries the run-state entries the method's step reads (`Method.step_state`)."""
  aux = {**task_aux, "prototypes": state["prototypes"], "reg_snapshot": state["reg_snapshot"]}
  aux.update({k: state[k] for k in method.step_state})
  return {"backbone": frozen_backbone, "peft": {"ema": state["ema"]}}, aux


def start_task(session: RunSession, steps: _TaskSteps) -> None:
  """Fresh proxy head (unless the method keeps one) and optimiser state (SPEC 2.4 step 1)."""
  state, stack = session.state, session.stack
  state["train"] = stack.put(
    task_train_state(
      session.method, session.programs.tx, stack, state["train"].params, steps.task_keys
    )
  )
  progress = session.progress
  progress.in_task, progress.epoch, progress.step_in_epoch = True, 0, 0


def _step_inputs(session: RunSession, steps: _TaskSteps) -> tuple[Any, Any, Any, Any]:
  """(frozen, aux, schedule, health) of task t's steps, on the mesh."""
  state, stack = session.state, session.stack
  task_aux, schedule, health = stack.put(
    task_step_trees(
      session.plan,
      session.method,
      stack,
      steps.task,
      steps.task_keys,
      steps.seed_steps,
      steps.epochs,
      stack.host(state["prototypes"]),
    )
  )
  frozen, aux = frozen_and_aux(state, session.frozen_backbone, task_aux, session.method)
  return frozen, aux, schedule, health


def _fetch_terms(session: RunSession, health, terms, steps: _TaskSteps) -> list[dict[str, float]]:
  """Per seed, the terms of the last step as host floats, after the non-finite check."""
  stack, plan = session.stack, session.plan
  host_health, host_terms = stack.fetch((health, terms))
  for seed, h in zip(plan.seeds, stack.split(host_health)):
    if not h.ok:
      bad_step = int(h.bad_step)
      bad = bad_term_names([k for k in terms if k != "active"], int(h.bad_terms))
      if (
        session.ckpts
      ):  # finish the in-flight async save, or exiting loses the last good checkpoint
        session.ckpts.wait()
      raise NonFiniteLossError(
        f"Non-finite loss term(s) {bad}{f' of seed {seed}' if plan.stacked else ''} at task "
        f"{steps.task}, epoch {bad_step // steps.steps}, step {bad_step % steps.steps}. The run "
        "stopped; the last good checkpoint is kept in the workdir. Lower train.lr in a new "
        "--workdir (this one is bound to its config), or fix the data and rerun the same command "
        "to resume."
      )
  return [
    {k: float(v) for k, v in seed_terms.items() if k != "active"}
    for seed_terms in stack.split(host_terms)
  ]


def _task_batches(
  session: RunSession, steps: _TaskSteps, first_epoch: int, first_step: int
) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
  """(epoch, step in epoch, host batch) for the rest of the task, in the streams' order."""
  streams, seeds, t = session.streams, session.plan.seeds, steps.task
  batch_size = session.plan.batch_size
  for epoch in range(first_epoch, steps.epochs):
    start = first_step if epoch == first_epoch else 0

    def make(i, process_index, process_count, epoch=epoch, start=start):
      return streams[i].train_batches(
        t,
        epoch,
        batch_size,
        seed=seeds[i],
        start_step=min(start, steps.seed_steps[i]),
        process_index=process_index,
        process_count=process_count,
      )

    batches = session.stack.batches(make, batch_size, steps.steps - start)
    for i, b in enumerate(batches, start=start):
      yield epoch, i, {k: b[k] for k in TRAIN_BATCH_KEYS}


def _log_step(
  session: RunSession, steps: _TaskSteps, epoch: int, i: int, host_terms, log_seeds: list[int]
) -> None:
  """Writes the train line of each seed in `log_seeds` (those at a log step of their epoch)."""
  for s_i in log_seeds:
    seed_terms = dict(host_terms[s_i])
    lr = seed_terms.pop("lr")
    step_in_task = epoch * steps.seed_steps[s_i] + i + 1
    session.writers[s_i].write(
      {"kind": "train", "task": steps.task, "epoch": epoch, "step": step_in_task, "lr": lr}
      | seed_terms,
      step=session.logs[s_i].total_steps,
    )


def train_steps(session: RunSession, steps: _TaskSteps, bar: ProgressBar) -> dict[str, Any] | None:
  """Runs the rest of task t's steps; returns its loop timing (None if no step was timed)."""
  plan, progress, state = session.plan, session.progress, session.state
  t, total = steps.task, steps.epochs * steps.steps
  frozen, aux, schedule, health = _step_inputs(session, steps)
  bar.start(t, total, progress.epoch * steps.steps + progress.step_in_epoch)
  batches = _task_batches(session, steps, progress.epoch, progress.step_in_epoch)
  put = lambda x: (x[0], x[1], session.stack.put_batch(x[2], plan.batch_size))  # noqa: E731
  # steps after the first (compiling) one; checkpoint saves are timed apart, not in "seconds"
  timer = {"task": t, "steps": 0, "images": 0, "seconds": 0.0, "checkpoint_seconds": 0.0}
  with contextlib.closing(prefetch(batches, put, plan.prefetch_batches)) as it:
    for epoch, i, batch in it:
      # Dispatch only: lr, key and the non-finite check live on the device (make_loop_step).
      state["train"], health, terms = session.programs.train_step(
        state["train"], health, frozen, aux, batch, schedule
      )
      if timer["seconds"] == 0.0:  # the first step compiles: time from its end
        jax.block_until_ready(terms)
        timer["seconds"] = -time.perf_counter()
      else:
        timer["steps"] += 1
      progress.step_in_epoch, progress.total_steps = i + 1, progress.total_steps + 1
      log_seeds = []
      for s_i, seed_log in enumerate(session.logs):
        if i < steps.seed_steps[s_i]:  # the seed took this step
          seed_log.total_steps += 1
          if (i + 1) % plan.log_every_steps == 0 or i + 1 == steps.seed_steps[s_i]:
            log_seeds.append(s_i)
      every = plan.checkpoint_every_steps
      save_now = every > 0 and progress.total_steps % every == 0 and i + 1 < steps.steps
      host_terms = None
      if log_seeds or save_now:  # also flushes the check: no checkpoint of a poisoned state
        host_terms = _fetch_terms(session, health, terms, steps)
      shown = host_terms[log_seeds[0] if log_seeds else 0] if host_terms else None
      bar.update(t, epoch * steps.steps + i + 1, total, shown)
      _log_step(session, steps, epoch, i, host_terms, log_seeds)
      if save_now:
        t_save = time.perf_counter()
        session.save()
        timer["checkpoint_seconds"] += time.perf_counter() - t_save
      if i + 1 == steps.steps:
        progress.epoch, progress.step_in_epoch = epoch + 1, 0
  timing = None
  if timer["seconds"] < 0.0:  # the last step ended with the epoch's final fetch
    timer["seconds"] += time.perf_counter() - timer["checkpoint_seconds"]
    timer["images"] = timer["steps"] * plan.batch_size * session.stack.size  # all seeds' images
    timing = timer
  bar.close()
  return timing


def end_task(session: RunSession, t: int) -> None:
  """The method's end of task t (EMA, prototypes, ...), evaluation, snapshot, checkpoint, hooks."""
  plan, state, method = session.plan, session.state, session.method
  k_t, s_t = plan.data.splits[t]
  last = t == plan.total_tasks - 1  # the sequence's last task, also when max_tasks truncates
  ema_before = state["ema"]
  state["ema"] = method.ema_after_task(
    state["ema"], state["train"].params["peft"]["current"], t, last
  )
  end = TaskEnd(
    task=t,
    last=last,
    task_start=k_t,
    num_new=s_t,
    params=session.eval_params(),
    state=dict(state),
    ema_before=ema_before,
    frozen_backbone=session.frozen_backbone,
    programs=session.programs,
    streams=session.streams,
    stack=session.stack,
    apply_seeds=session.apply_seeds,
  )
  result = method.end_of_task(end)
  state.update(result.state)
  stages = evaluate_stages(
    result.predict, session.streams, t, plan.eval_batch_size, session.stack, plan.data.top5
  )
  for seed, seed_log, writer, stage, info in zip(
    plan.seeds, session.logs, session.writers, stages, result.stage_info
  ):
    stage.update(info)
    seed_log.stages.append(stage)
    # TensorBoard step: the global step (the task index for methods that take no steps)
    writer.write(
      {"kind": "eval", "task": t, "step": seed_log.total_steps, **stage},
      step=seed_log.total_steps or t,
    )
    log.info(
      "%stask %d: A_t %.2f, row %s",
      f"seed {seed} " if plan.stacked else "",
      t,
      stage["A"],
      np.round(stage["R_row"], 2).tolist(),
    )
  state["reg_snapshot"] = reg_targets(state["train"].params)
  session.progress.task, session.progress.in_task = t + 1, False
  session.save(finalize=True)
  session.call_hooks(t)


def run_task(session: RunSession, t: int, bar: ProgressBar) -> dict[str, Any] | None:
  """Task t from where the session stands (fresh, or mid-task after a resume); its timing."""
  plan, method = session.plan, session.method
  steps = _TaskSteps(
    task=t,
    epochs=method.epochs(t, plan.num_tasks),
    seed_steps=[st.steps_per_epoch(t, plan.batch_size) for st in session.streams],
    task_keys=[jax.random.fold_in(jax.random.key(s), t) for s in plan.seeds],
  )
  if not session.progress.in_task:
    start_task(session, steps)
  timer = train_steps(session, steps, bar)
  end_task(session, t)
  return timer
