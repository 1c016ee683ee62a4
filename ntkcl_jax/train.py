"""The one trainer: class-incremental NTK-CL over a task stream (SPEC 2.4), and its baselines.

Reads top to bottom: config and workdir → data → mesh → model and optimiser → resume → tasks
(train, EMA, prototypes, evaluate, snapshot, checkpoint, hooks) → summary. Baselines are config
switches (`method`, loss weights, `model.name`, `train.use_ema`), not forks.

Why ~500 lines in one module: `run` is the SPEC 2.4 procedure written as one function that reads
in the order a task happens; its pieces with logic of their own already live elsewhere
(`prototypes`, `evaluate`, `train_step`, `data.prefetch`, `analytic_heads`, `workdir`,
`run_state`). Splitting the task loop further would hide that order behind callbacks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ntkcl_jax import analytic_heads, losses, metrics, prototypes, sharding
from ntkcl_jax import config as config_lib
from ntkcl_jax.baselines import (
  LINEAR_METHODS,
  init_linear_head,
  make_linear_predict,
  make_linear_train_step,
)
from ntkcl_jax.checkpoint import RunCheckpoints
from ntkcl_jax.data.prefetch import prefetch
from ntkcl_jax.data.sources import check_membership, membership
from ntkcl_jax.ema import ema_update
from ntkcl_jax.evaluate import batched_apply, evaluate_stage, make_predict_fn
from ntkcl_jax.hooks import TaskHook, TaskView
from ntkcl_jax.models.ntkcl import NTKCL
from ntkcl_jax.models.vit import VisionTransformer
from ntkcl_jax.optim import make_optimizer
from ntkcl_jax.run_state import accuracy_matrix, build_stream, initial_params
from ntkcl_jax.run_state import num_tasks as count_tasks
from ntkcl_jax.train_step import (
  Health,
  TaskInfo,
  TaskSchedule,
  TrainState,
  bad_term_names,
  init_proxy_head,
  make_eval_fn,
  make_feature_fn,
  make_loop_step,
  make_train_step,
  reg_targets,
  split_trainable,
  with_matmul_precision,
)
from ntkcl_jax.workdir import (
  ProgressBar,
  WorkdirMismatchError,  # noqa: F401  (part of this module's API: main.py, tests)
  check_workdir_config,
  write_json,
)

log = logging.getLogger("ntkcl_jax")


class NonFiniteLossError(RuntimeError):
  """A loss term became NaN/Inf; the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class _Run:
  """Mutable bookkeeping of a run, saved in each checkpoint's JSON meta."""

  task: int = 0
  epoch: int = 0
  step_in_epoch: int = 0
  in_task: bool = False  # True once the task's proxy head / optimiser state exist
  save_number: int = 0
  total_steps: int = 0
  wall_time_s: float = 0.0
  metrics_offset: int = 0
  stages: list = dataclasses.field(default_factory=list)


def run(
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  hooks: Sequence[TaskHook] = (),
) -> dict[str, Any]:
  """Trains and evaluates one seed of `config` in `workdir`, resuming from its checkpoint.

  Writes `metrics.jsonl` (train/eval/final lines), checkpoints, and `summary.json`; returns the
  summary. Only process 0 writes files.
  """
  t_start = time.time()
  quirks = config_lib.validate(config)
  workdir = pathlib.Path(workdir)
  is_writer = jax.process_index() == 0
  check_workdir_config(workdir, config, is_writer)
  backend = sharding.backend_info(config.train.platform)
  log.info(
    "backend %s: %d x %s (%d local), %d process(es), jax %s",
    *(backend[k] for k in ("backend", "device_count", "device_kind", "local_device_count")),
    backend["process_count"],
    backend["jax_version"],
  )

  # -- data -------------------------------------------------------------------------------------
  stream = build_stream(config)
  num_tasks = count_tasks(config, stream)
  # Shapes (prototype rows, head width) come from the whole sequence, so a run truncated by
  # `train.max_tasks` computes exactly what the full run does up to its last task.
  splits = stream.splits
  num_classes = splits[-1][0] + splits[-1][1]
  head_width = max(s for _, s in splits)
  batch_size, eval_batch = config.train.batch_size, config.eval.batch_size

  # -- mesh -------------------------------------------------------------------------------------
  mesh = sharding.make_mesh()
  sharding.check_batch_size(batch_size, "train.batch_size")
  sharding.check_batch_size(eval_batch, "eval.batch_size")

  # -- model and optimiser ------------------------------------------------------------------------
  linear = config.method in LINEAR_METHODS
  # ranpac/aper train like the linear baselines (first session), then classify their way
  first_session = config.method in analytic_heads.METHODS
  linear_step = linear or first_session
  spec = config_lib.model_spec(config, quirks)
  if linear_step:  # adapters + linear head on the current channel pass
    spec = dataclasses.replace(spec, model_name="channel")
  model = NTKCL(spec)
  weights = config_lib.loss_weights(config, quirks)
  root_key = jax.random.key(config.seed)
  if not config.backbone.checkpoint_path:
    log.warning("backbone.checkpoint_path is empty: using a randomly initialised backbone.")
  params = initial_params(config, spec)
  frozen_backbone = params["backbone"]
  head_key = jax.random.fold_in(root_key, 10_001)
  if linear_step:  # the baselines' linear head persists across tasks
    params["proxy_head"] = init_linear_head(head_key, spec.vit.width, num_classes)
  else:  # zeros of the right layout: each task draws its own head (tasks, below)
    head = functools.partial(init_proxy_head, feature_dim=spec.feature_dim, width=head_width)
    shapes = jax.eval_shape(head, root_key)
    params["proxy_head"] = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
  trainable, frozen = split_trainable(params)
  tx = make_optimizer(config.train.weight_decay, config.train.momentum)
  simplecil = config.method == "simplecil"
  ntkcl = config.method == "ntkcl"
  proto_dim = spec.vit.width if simplecil else spec.feature_dim
  proto_dim = {"aper": 2 * spec.vit.width, "ranpac": spec.vit.width}.get(config.method, proto_dim)
  state = {
    "train": TrainState(params=trainable, opt_state=tx.init(trainable), step=jnp.int32(0)),
    "ema": frozen["peft"]["ema"],
    "prototypes": jnp.zeros((num_classes, proto_dim), jnp.float32),
    "reg_snapshot": reg_targets(trainable),
  }
  ridge = None  # the closed-form head's statistics are run state (analytic_heads)
  if analytic_heads.uses_ridge(config):
    ridge_dim = spec.vit.width if config.method == "ranpac" else spec.feature_dim
    ridge_dim *= 3 if config.ridge.features == "cpm" and ntkcl else 1
    ridge = analytic_heads.RidgeHead(config, ridge_dim, num_classes)
    state.update(ridge.init_state())

  # -- resume -----------------------------------------------------------------------------------
  ckpts = RunCheckpoints(workdir) if is_writer or jax.process_count() > 1 else None
  progress = _Run()
  repl = sharding.replicated(mesh)
  latest = ckpts.latest() if ckpts else None
  if latest is not None:
    abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), state
    )
    state, meta = ckpts.restore(latest, abstract)
    check_membership(meta.get("data_membership"), membership(stream.train, stream.test), workdir)
    progress = _Run(**meta["progress"])
    log.info(
      "Resuming from checkpoint %d: task %d epoch %d step %d",
      latest,
      progress.task,
      progress.epoch,
      progress.step_in_epoch,
    )
  else:
    state = sharding.put_replicated(state, mesh)
  metrics_path = workdir / "metrics.jsonl"
  rerun = metrics_path.exists()
  if is_writer and rerun:
    with open(metrics_path, "r+b") as f:  # drop lines written after the checkpoint we resume from
      f.truncate(progress.metrics_offset)
  writer = metrics.MetricWriter(
    metrics_path,
    enabled=is_writer,
    tensorboard_dir=workdir / "tensorboard" if config.train.tensorboard else None,
    # the resumed run writes from step total_steps + 1; lines at total_steps are kept
    purge_step=progress.total_steps + 1 if rerun else None,
  )
  elapsed_before = progress.wall_time_s

  def save(finalize: bool = False):
    progress.save_number += 1
    progress.wall_time_s = elapsed_before + time.time() - t_start
    progress.metrics_offset = metrics_path.stat().st_size if metrics_path.exists() else 0
    meta = {
      "progress": dataclasses.asdict(progress),
      "config_hash": config_lib.config_hash(config),
      "class_order": stream.order.tolist(),
      "data_membership": membership(stream.train, stream.test),  # checked on resume (SPEC 6, 8)
      "quirks": dataclasses.asdict(quirks),
    }
    if ckpts:
      ckpts.save(progress.save_number, state, meta)
      if finalize:
        ckpts.wait()

  # -- compiled functions (one compilation serves every task) --------------------------------------
  step_fn = (
    make_linear_train_step(model, tx)
    if linear_step
    else make_train_step(model, weights, tx, batch_size)
  )
  precision = config.model.matmul_precision
  check_aux = quirks.nonfinite_aux == "mask_or_raise"
  train_step = jax.jit(
    with_matmul_precision(make_loop_step(step_fn, check_aux), precision), donate_argnums=(0, 1)
  )
  jit_p = lambda fn: jax.jit(with_matmul_precision(fn, precision))  # noqa: E731
  linear_predict = jit_p(make_linear_predict(model))
  if simplecil:  # prototypes of the plain pre-trained ViT's CLS feature, one logit section
    vit = VisionTransformer(spec.vit, dtype=spec.dtype)
    features = jit_p(lambda p, x: vit.apply({"params": p["backbone"]}, x))
    predict = jit_p(make_predict_fn(features, (1.0,)))
  elif first_session:  # APER's cosine over [frozen; adapted], RanPAC's adapted feature
    features = jit_p(analytic_heads.make_feature_fn(model, config.method))
    predict = jit_p(make_predict_fn(features, (1.0,)))
  else:
    features = jit_p(make_feature_fn(model))
    predict = jit_p(make_eval_fn(model, config_lib.section_weights(config)))
  ridge_features = features
  if ridge and ntkcl and config.ridge.features == "cpm":
    ridge_features = jit_p(analytic_heads.make_ridge_feature_fn(model, "cpm"))
  ridge_predict = ridge.make_predict(ridge_features) if ridge else None

  def eval_params(st, ema=None):
    return {
      "backbone": frozen_backbone,
      "peft": {
        "current": st["train"].params["peft"]["current"],
        "ema": st["ema"] if ema is None else ema,
      },
      "fusion": st["train"].params["fusion"],
    }

  def view(t: int) -> TaskView:
    R = accuracy_matrix(progress.stages, num_tasks)
    return TaskView(
      task=t,
      num_tasks=num_tasks,
      params=eval_params(state),
      prototypes=np.asarray(sharding.to_host(state["prototypes"])),
      num_seen=(splits[t][0] + splits[t][1]) if t >= 0 else 0,
      spec=spec,
      stream=stream,
      workdir=workdir,
      accuracy_matrix=R,
      is_writer=is_writer,
      features=features,
    )

  resumed_finished = latest is not None and progress.task >= num_tasks
  if progress.task == 0 and not progress.in_task and latest is None:
    for hook in hooks:
      hook.on_init(view(-1))

  def new_prototypes(t: int, params_eval, ema_before) -> np.ndarray:
    """Prototypes after task t (`prototypes.update_after_task`), from eval-mode features."""
    k_t, s_t = splits[t]

    def feats_of(params, indices):
      return batched_apply(
        lambda x: features(params, x), stream, indices, "train", eval_batch, mesh
      )

    def old_feats():  # the end-of-previous-task model: reg snapshot + the EMA bank before update
      snap = state["reg_snapshot"]
      old = {"backbone": frozen_backbone, "peft": {"current": snap["peft"], "ema": ema_before}}
      return feats_of({**old, "fusion": snap["fusion"]}, stream.train_indices(t))[0]

    def seen_feats():
      return feats_of(params_eval, np.concatenate([stream.train_indices(s) for s in range(t)]))

    new_feats, new_labels = feats_of(params_eval, stream.train_indices(t))
    return prototypes.update_after_task(
      np.asarray(sharding.to_host(state["prototypes"])),
      k_t,
      s_t,
      new_feats,
      new_labels,
      refresh=quirks.prototype_refresh if ntkcl else "never",
      old_feats=old_feats,
      seen_feats=seen_feats,
    )

  # -- tasks ------------------------------------------------------------------------------------
  bar = ProgressBar(is_writer, config.train.log_every_steps)
  train_loop_time: list[dict[str, Any]] = []
  epochs_all = 0 if simplecil else config.train.epochs
  n_adapt = analytic_heads.adapt_tasks(config, num_tasks)
  for t in range(progress.task, num_tasks):
    epochs = epochs_all if t < n_adapt else 0  # first-session methods stop training after n_adapt
    k_t, s_t = splits[t]
    task_key = jax.random.fold_in(root_key, t)
    steps = stream.steps_per_epoch(t, batch_size)
    if not progress.in_task:  # fresh proxy head and optimiser state (SPEC 2.4 step 1)
      params_t = dict(state["train"].params)
      if not linear_step:  # the baselines' linear head persists across tasks
        params_t["proxy_head"] = init_proxy_head(
          jax.random.fold_in(task_key, 0), spec.feature_dim, head_width
        )
      state["train"] = sharding.put_replicated(
        TrainState(params=params_t, opt_state=tx.init(params_t), step=jnp.int32(0)), mesh
      )
      progress.in_task, progress.epoch, progress.step_in_epoch = True, 0, 0
    n_old = losses.mi_old_rows(
      k_t + s_t, k_t, config.data.increment, known_only=quirks.mi_old_rows == "known_only"
    )
    protos_host = np.asarray(sharding.to_host(state["prototypes"]))
    if quirks.orth_loss == "signed_residual_sum":
      basis = losses.orthogonality_basis(protos_host[: k_t + s_t], config.loss.svd_k)
    else:
      basis = losses.old_subspace_basis(protos_host[: k_t + s_t], k_t, config.loss.svd_k)
    aux = sharding.put_replicated(
      {"task": TaskInfo.make(k_t, s_t, n_old, t > 0 or quirks.reg_at_task0), "orth_basis": basis},
      mesh,
    )
    aux = {**aux, "prototypes": state["prototypes"], "reg_snapshot": state["reg_snapshot"]}
    frozen_t = {"backbone": frozen_backbone, "peft": {"ema": state["ema"]}}

    bar.start(t, epochs * steps, progress.epoch * steps + progress.step_in_epoch)
    schedule = sharding.put_replicated(
      TaskSchedule.make(task_key, config.train.lr, max(epochs, 1), steps), mesh
    )
    health = sharding.put_replicated(Health.fresh(), mesh)

    def fetch(terms):
      """Terms of the last step to host floats, after the device-side non-finite check."""
      host_health, host_terms = jax.device_get((health, terms))
      if not host_health.ok:
        bad_step = int(host_health.bad_step)
        bad = bad_term_names(terms, int(host_health.bad_terms))
        if ckpts:  # finish the in-flight async save, or exiting loses the last good checkpoint
          ckpts.wait()
        raise NonFiniteLossError(
          f"Non-finite loss term(s) {bad} at task {t}, epoch {bad_step // steps}, step "
          f"{bad_step % steps}. The run stopped; the last good checkpoint is kept in the workdir. "
          "Lower train.lr in a new --workdir (this one is bound to its config), or fix the data "
          "and rerun the same command to resume."
        )
      return {k: float(v) for k, v in host_terms.items()}

    first_epoch, first_step = progress.epoch, progress.step_in_epoch

    def task_batches():
      """(epoch, step in epoch, placed batch) for the rest of the task, in the stream's order."""
      for epoch in range(first_epoch, epochs):
        start = first_step if epoch == first_epoch else 0
        host = stream.train_batches(
          t,
          epoch,
          batch_size,
          seed=config.seed,
          start_step=start,
          process_index=jax.process_index(),
          process_count=jax.process_count(),
        )
        for i, b in enumerate(host, start=start):
          yield epoch, i, {k: b[k] for k in ("image", "label", "mask")}

    put = lambda x: (x[0], x[1], sharding.put_batch(x[2], mesh))  # noqa: E731
    # steps after the first (compiling) one; checkpoint saves are timed apart, not in "seconds"
    timer = {"task": t, "steps": 0, "images": 0, "seconds": 0.0, "checkpoint_seconds": 0.0}
    with contextlib.closing(prefetch(task_batches(), put, config.train.prefetch_batches)) as it:
      for epoch, i, batch in it:
        # Dispatch only: lr, key and the non-finite check live on the device (make_loop_step).
        state["train"], health, terms = train_step(
          state["train"], health, frozen_t, aux, batch, schedule
        )
        if timer["seconds"] == 0.0:  # the first step compiles: time from its end
          jax.block_until_ready(terms)
          timer["seconds"] = -time.perf_counter()
        else:
          timer["steps"] += 1
        progress.step_in_epoch, progress.total_steps = i + 1, progress.total_steps + 1
        log_now = (i + 1) % config.train.log_every_steps == 0 or i + 1 == steps
        every = config.train.checkpoint_every_steps
        save_now = every > 0 and progress.total_steps % every == 0 and i + 1 < steps
        host_terms = None
        if log_now or save_now:
          host_terms = fetch(terms)  # also flushes the check: no checkpoint of a poisoned state
        bar.update(t, epoch * steps + i + 1, epochs * steps, host_terms)
        if log_now:
          lr = host_terms.pop("lr")
          writer.write(
            {"kind": "train", "task": t, "epoch": epoch, "step": epoch * steps + i + 1, "lr": lr}
            | host_terms,
            step=progress.total_steps,
          )
        if save_now:
          t_save = time.perf_counter()
          save()
          timer["checkpoint_seconds"] += time.perf_counter() - t_save
        if i + 1 == steps:
          progress.epoch, progress.step_in_epoch = epoch + 1, 0
    if timer["seconds"] < 0.0:  # the last step ended with the epoch's final fetch
      timer["seconds"] += time.perf_counter() - timer["checkpoint_seconds"]
      timer["images"] = timer["steps"] * batch_size
      train_loop_time.append(timer)
    bar.close()

    # -- end of task: EMA, prototypes, evaluation, snapshot (SPEC 2.4 steps 3-6) ---------------
    ema_before = state["ema"]
    last = t == stream.num_tasks - 1  # the sequence's last task, also when max_tasks truncates
    if ntkcl and config.train.use_ema and (not last or quirks.ema_after_last_task):
      state["ema"] = ema_update(state["ema"], state["train"].params["peft"]["current"], t)
    params_eval = eval_params(state)
    if linear:
      with_head = {**params_eval, "proxy_head": state["train"].params["proxy_head"]}
      predict_t = functools.partial(linear_predict, with_head, k_t + s_t)
    else:
      state["prototypes"] = sharding.put_replicated(
        new_prototypes(t, params_eval, ema_before), mesh
      )
      predict_t = functools.partial(predict, params_eval, state["prototypes"], k_t + s_t)
    if ridge is not None:  # closed-form ridge head (analytic_heads) replaces the cosine one
      feats, labels = batched_apply(
        lambda x: ridge_features(params_eval, x),
        stream,
        stream.train_indices(t),
        "train",
        eval_batch,
        mesh,
      )
      stats, w_out, ridge_info = ridge.end_of_task(state, feats, labels, k_t + s_t, t)
      state.update(sharding.put_replicated(stats, mesh))
      predict_t = functools.partial(ridge_predict, params_eval, jnp.asarray(w_out), k_t + s_t)
    stage = evaluate_stage(predict_t, stream, t, eval_batch, mesh)
    if ridge is not None:
      stage.update(ridge_info)
    progress.stages.append(stage)
    # TensorBoard step: the global step (the task index for methods that take no steps)
    writer.write(
      {"kind": "eval", "task": t, "step": progress.total_steps, **stage},
      step=progress.total_steps or t,
    )
    log.info("task %d: A_t %.2f, row %s", t, stage["A"], np.round(stage["R_row"], 2).tolist())
    state["reg_snapshot"] = reg_targets(state["train"].params)
    progress.task, progress.in_task = t + 1, False
    save(finalize=True)
    for hook in hooks:
      hook.on_task_end(view(t))

  # -- summary ----------------------------------------------------------------------------------
  R = accuracy_matrix(progress.stages, num_tasks)
  A = [s["A"] for s in progress.stages]
  final = metrics.final_metrics(R, A)
  wall = elapsed_before + time.time() - t_start
  writer.write({"kind": "final", **final}, step=progress.total_steps or num_tasks - 1)
  summary = {
    "accuracy_matrix": final["R"],
    **{k: final[k] for k in ("avg_acc", "last_acc", "forgetting", "bwt")},
    "stages": progress.stages,
    "method": config.method,
    "quirks": dataclasses.asdict(quirks),
    "config": config_lib.flat_config(config),
    "num_devices": jax.device_count(),
    "num_processes": jax.process_count(),
    "backend": backend,
    # train-loop throughput of this process, per task, compile step excluded (bench_loop.py)
    "train_loop_time": train_loop_time,
    "wall_time_s": wall,
  }
  for hook in hooks:
    summary.update(hook.summary())
  # A rerun of a finished run keeps the sections its first run wrote and this one did not (a hook
  # has nothing new to report when every task was already done, e.g. "ntk"). Only then: a run that
  # started over (no checkpoint) must not inherit another run's sections.
  summary_path = workdir / "summary.json"
  if resumed_finished and summary_path.exists():
    for key, value in json.loads(summary_path.read_text()).items():
      summary.setdefault(key, value)
  if is_writer:
    write_json(summary_path, summary)
  writer.close()
  if ckpts:
    ckpts.close()
  return summary
