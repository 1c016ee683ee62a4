"""The one trainer: class-incremental NTK-CL over a task stream (SPEC 2.4), and its baselines.

Reads top to bottom: config and workdir → data → mesh → model and optimiser → resume → tasks
(train, EMA, prototypes, evaluate, snapshot, checkpoint, hooks) → summary. Baselines are config
switches (`method`, loss weights, `model.name`, `train.use_ema`), not forks. `config.seeds`
trains several seeds in lockstep: the same code over a `SeedStack` (one plain run, or K stacked
runs whose step is vmapped over seeds), with host bookkeeping as one loop over seeds.

Why ~700 lines in one module: `run` is the SPEC 2.4 procedure written as one function that reads
in the order a task happens; its pieces with logic of their own already live elsewhere
(`prototypes`, `evaluate`, `train_step`, `data.prefetch`, `analytic_heads`, `workdir`,
`run_state`, `seed_stack`). Splitting the task loop further would hide that order behind
callbacks. The per-seed loops (logging, stages, summaries) are what stacked seeds added.
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
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ntkcl_jax import analytic_heads, losses, metrics, prototypes, report, sharding
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
from ntkcl_jax.evaluate import (
  NO_TOP5_DATASETS,
  batched_apply_seeds,
  evaluate_stages,
  make_predict_fn,
)
from ntkcl_jax.hooks import TaskHook, TaskView
from ntkcl_jax.models.ntkcl import NTKCL
from ntkcl_jax.models.vit import VisionTransformer, load_augreg
from ntkcl_jax.optim import make_optimizer
from ntkcl_jax.run_state import accuracy_matrix, build_streams, check_inputs, initial_params
from ntkcl_jax.run_state import num_tasks as count_tasks
from ntkcl_jax.seed_stack import SeedStack
from ntkcl_jax.seeds import skip_empty_batches
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
  """Mutable bookkeeping shared by the seeds of a run, saved in each checkpoint's JSON meta."""

  task: int = 0
  epoch: int = 0
  step_in_epoch: int = 0  # steps of the longest seed's epoch
  in_task: bool = False  # True once the task's proxy head / optimiser state exist
  save_number: int = 0
  total_steps: int = 0  # steps dispatched
  wall_time_s: float = 0.0


@dataclasses.dataclass
class _SeedLog:
  """What each seed writes: its steps taken (metrics' step), metrics.jsonl size, stage rows."""

  seed: int
  total_steps: int = 0
  metrics_offset: int = 0
  stages: list = dataclasses.field(default_factory=list)


def _progress_meta(progress: _Run, logs: list[_SeedLog], stacked: bool) -> dict[str, Any]:
  """The checkpoint's "progress": a single run's fields flat (as always); per seed when stacked."""
  meta = dataclasses.asdict(progress)
  if stacked:
    meta["seeds"] = [dataclasses.asdict(log_) for log_ in logs]
  else:
    meta.update(metrics_offset=logs[0].metrics_offset, stages=logs[0].stages)
  return meta


def _progress_from_meta(
  meta: dict[str, Any], seeds: tuple[int, ...], stacked: bool
) -> tuple[_Run, list[_SeedLog]]:
  progress = _Run(**{f.name: meta[f.name] for f in dataclasses.fields(_Run)})
  if not stacked:
    return progress, [
      _SeedLog(seeds[0], meta["total_steps"], meta["metrics_offset"], meta["stages"])
    ]
  logs = [_SeedLog(**entry) for entry in meta["seeds"]]
  if (
    tuple(log_.seed for log_ in logs) != seeds
  ):  # the config hash binds the workdir; belt and braces
    raise ValueError(f"checkpoint holds seeds {[g.seed for g in logs]}, the config {list(seeds)}.")
  return progress, logs


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
  quirks = config_lib.validate(config)
  check_inputs(config)  # data and weights on disk, before anything is written
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
  seeds = config_lib.run_seeds(config)
  stacked = bool(config.seeds)
  K = len(seeds)
  out_dirs = [workdir / f"seed_{s}" for s in seeds] if stacked else [workdir]
  if not isinstance(hooks, Mapping):
    hooks = {seeds[0]: hooks}
  unknown = sorted(set(hooks) - set(seeds))
  if unknown:
    raise ValueError(f"hooks for seeds {unknown}, which this run ({list(seeds)}) does not train.")
  seed_hooks = [list(hooks.get(s, ())) for s in seeds]

  # -- data -------------------------------------------------------------------------------------
  streams = build_streams(config, seeds)
  stream = streams[0]  # the seeds differ only in class order: same splits, tasks, sources
  num_tasks = count_tasks(config, stream)
  # Shapes (prototype rows, head width) come from the whole sequence, so a run truncated by
  # `train.max_tasks` computes exactly what the full run does up to its last task.
  splits = stream.splits
  num_classes = splits[-1][0] + splits[-1][1]
  head_width = max(s for _, s in splits)
  batch_size, eval_batch = config.train.batch_size, config.eval.batch_size

  # -- mesh -------------------------------------------------------------------------------------
  stack = SeedStack.make(
    seeds,
    stacked,
    {"train.batch_size": batch_size, "eval.batch_size": eval_batch},
    config.train.seed_axis_size,
  )
  mesh = stack.mesh
  if stacked:
    log.info("%d seeds %s stacked on a %s mesh", K, list(seeds), dict(mesh.shape))

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
  root_keys = [jax.random.key(s) for s in seeds]
  shared_backbone = bool(config.backbone.checkpoint_path)  # else each seed's random backbone
  if shared_backbone:
    backbone = load_augreg(config.backbone.checkpoint_path, spec.vit)
  else:
    backbone = None
    log.warning("backbone.checkpoint_path is empty: using a randomly initialised backbone.")
  inits = [initial_params(config, spec, seed=s, backbone=backbone) for s in seeds]
  if not stacked:
    frozen_backbone = inits[0]["backbone"]
  elif shared_backbone:
    frozen_backbone = stack.replicate(backbone)
  else:
    frozen_backbone = stack.put(stack.stack([p["backbone"] for p in inits]))
  tx = make_optimizer(config.train.weight_decay, config.train.momentum)
  simplecil = config.method == "simplecil"
  ntkcl = config.method == "ntkcl"
  proto_dim = {"simplecil": spec.vit.width, "aper": 2 * spec.vit.width, "ranpac": spec.vit.width}
  proto_dim = proto_dim.get(config.method, spec.feature_dim)

  def initial_state(params: dict[str, Any], root_key: jax.Array) -> dict[str, Any]:
    """One seed's run state at init (the backbone is kept apart: it is never trained)."""
    head_key = jax.random.fold_in(root_key, 10_001)
    if linear_step:  # the baselines' linear head persists across tasks
      params["proxy_head"] = init_linear_head(head_key, spec.vit.width, num_classes)
    else:  # zeros of the right layout: each task draws its own head (tasks, below)
      head = functools.partial(init_proxy_head, feature_dim=spec.feature_dim, width=head_width)
      shapes = jax.eval_shape(head, root_key)
      params["proxy_head"] = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    trainable, frozen = split_trainable(params)
    return {
      "train": TrainState(params=trainable, opt_state=tx.init(trainable), step=jnp.int32(0)),
      "ema": frozen["peft"]["ema"],
      "prototypes": jnp.zeros((num_classes, proto_dim), jnp.float32),
      "reg_snapshot": reg_targets(trainable),
    }

  state = stack.stack([initial_state(dict(p), k) for p, k in zip(inits, root_keys)])
  ridge = None  # the closed-form head's statistics are run state (analytic_heads; one seed)
  if analytic_heads.uses_ridge(config):
    ridge_dim = spec.vit.width if config.method == "ranpac" else spec.feature_dim
    ridge_dim *= 3 if config.ridge.features == "cpm" and ntkcl else 1
    ridge = analytic_heads.RidgeHead(config, ridge_dim, num_classes)
    state.update(ridge.init_state())

  # -- resume -----------------------------------------------------------------------------------
  ckpts = RunCheckpoints(workdir) if is_writer or jax.process_count() > 1 else None
  progress, logs = _Run(), [_SeedLog(s) for s in seeds]
  latest = ckpts.latest() if ckpts else None
  if latest is not None:
    abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=stack.sharding), state
    )
    state, meta = ckpts.restore(latest, abstract)
    check_membership(meta.get("data_membership"), membership(stream.train, stream.test), workdir)
    progress, logs = _progress_from_meta(meta["progress"], seeds, stacked)
    log.info(
      "Resuming from checkpoint %d: task %d epoch %d step %d",
      latest,
      progress.task,
      progress.epoch,
      progress.step_in_epoch,
    )
  else:
    state = stack.put(state)
  writers, metrics_paths = [], []
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
        tensorboard_dir=out_dir / "tensorboard" if config.train.tensorboard else None,
        # the resumed run writes from step total_steps + 1; lines at total_steps are kept
        purge_step=seed_log.total_steps + 1 if rerun else None,
      )
    )
    metrics_paths.append(metrics_path)
  elapsed_before = progress.wall_time_s

  def save(finalize: bool = False):
    progress.save_number += 1
    progress.wall_time_s = elapsed_before + time.time() - t_start
    for seed_log, path in zip(logs, metrics_paths):
      seed_log.metrics_offset = path.stat().st_size if path.exists() else 0
    meta = {
      "progress": _progress_meta(progress, logs, stacked),
      "config_hash": config_lib.config_hash(config),
      "class_order": stream.order.tolist(),
      "data_membership": membership(stream.train, stream.test),  # checked on resume (SPEC 6, 8)
      "quirks": dataclasses.asdict(quirks),
    }
    if stacked:
      meta["class_orders"] = {str(s): st.order.tolist() for s, st in zip(seeds, streams)}
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
  loop_step = make_loop_step(step_fn, check_aux)
  backbone_axis = None if shared_backbone else 0  # in_axes of the backbone in a stacked run
  if stacked:  # (state, health, frozen, aux, batch, schedule): all per seed but a shared backbone
    loop_step = stack.vmap(
      skip_empty_batches(loop_step, batch_argnum=4, num_carried=2),
      (0, 0, {"backbone": backbone_axis, "peft": 0}, 0, 0, 0),
    )
  train_step = jax.jit(with_matmul_precision(loop_step, precision), donate_argnums=(0, 1))
  jit_p = lambda fn: jax.jit(with_matmul_precision(fn, precision))  # noqa: E731
  param_axes = {"backbone": backbone_axis, "peft": 0, "fusion": 0}
  linear_predict = jit_p(
    stack.vmap(make_linear_predict(model), ({**param_axes, "proxy_head": 0}, None, 0))
  )
  if simplecil:  # prototypes of the plain pre-trained ViT's CLS feature, one logit section
    vit = VisionTransformer(spec.vit, dtype=spec.dtype)
    feature_fn = lambda p, x: vit.apply({"params": p["backbone"]}, x)  # noqa: E731
    predict_fn = make_predict_fn(feature_fn, (1.0,))
  elif first_session:  # APER's cosine over [frozen; adapted], RanPAC's adapted feature
    feature_fn = analytic_heads.make_feature_fn(model, config.method)
    predict_fn = make_predict_fn(feature_fn, (1.0,))
  else:
    feature_fn = make_feature_fn(model)
    predict_fn = make_eval_fn(model, config_lib.section_weights(config))
  seed_features = jit_p(feature_fn)  # one seed's model (hooks)
  features = jit_p(stack.vmap(feature_fn, (param_axes, 0)))
  predict = jit_p(stack.vmap(predict_fn, (param_axes, 0, None, 0)))
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

  def views(t: int) -> list[TaskView | None]:
    """Per seed, what its hooks may read (None for seeds without hooks)."""
    if not any(seed_hooks):
      return [None] * K
    params, protos = eval_params(state), stack.host(state["prototypes"])
    if not stacked:
      params = [params]
    elif shared_backbone:  # host copies of each seed's slice: a hook places them on its own mesh
      backbone_host = stack.fetch(frozen_backbone)
      per_seed = stack.host({k: v for k, v in params.items() if k != "backbone"})
      params = [{**p, "backbone": backbone_host} for p in per_seed]
    else:
      params = stack.host(params)
    return [
      TaskView(
        task=t,
        num_tasks=num_tasks,
        params=params[i],
        prototypes=np.asarray(protos[i]),
        num_seen=(splits[t][0] + splits[t][1]) if t >= 0 else 0,
        spec=spec,
        stream=streams[i],
        workdir=out_dirs[i],
        accuracy_matrix=accuracy_matrix(logs[i].stages, num_tasks),
        is_writer=is_writer,
        features=seed_features,
      )
      if seed_hooks[i]
      else None
      for i in range(K)
    ]

  def call_hooks(t: int) -> None:
    for view, hooks_i in zip(views(t), seed_hooks):
      for hook in hooks_i:
        if t < 0:
          hook.on_init(view)
        else:
          hook.on_task_end(view)

  resumed_finished = latest is not None and progress.task >= num_tasks
  if progress.task == 0 and not progress.in_task and latest is None:
    call_hooks(-1)

  def apply_seeds(fn, params, indices: list[np.ndarray]) -> list[tuple[Any, np.ndarray]]:
    """Per seed: fn(params, images) over its `indices` of the train split, eval transform."""
    return batched_apply_seeds(
      lambda x: fn(params, x), streams, indices, "train", eval_batch, stack
    )

  def new_prototypes(t: int, params_eval, ema_before, new) -> list[np.ndarray]:
    """Per seed, the prototypes after task t (`prototypes.update_after_task`), eval features.

    `new`: per seed, (features, labels) of task t's training images under `params_eval`.
    """
    k_t, s_t = splits[t]
    task_indices = [st.train_indices(t) for st in streams]

    @functools.cache
    def old_feats():  # the end-of-previous-task model: reg snapshot + the EMA bank before update
      snap = state["reg_snapshot"]
      old = {"backbone": frozen_backbone, "peft": {"current": snap["peft"], "ema": ema_before}}
      return apply_seeds(features, {**old, "fusion": snap["fusion"]}, task_indices)

    @functools.cache
    def seen_feats():
      seen = [np.concatenate([st.train_indices(s) for s in range(t)]) for st in streams]
      return apply_seeds(features, params_eval, seen)

    return [
      prototypes.update_after_task(
        protos,
        k_t,
        s_t,
        *new[i],
        refresh=quirks.prototype_refresh if ntkcl else "never",
        old_feats=lambda i=i: old_feats()[i][0],
        seen_feats=lambda i=i: seen_feats()[i],
      )
      for i, protos in enumerate(stack.host(state["prototypes"]))
    ]

  # -- tasks ------------------------------------------------------------------------------------
  bar = ProgressBar(is_writer, config.train.log_every_steps)
  train_loop_time: list[dict[str, Any]] = []
  epochs_all = 0 if simplecil else config.train.epochs
  n_adapt = analytic_heads.adapt_tasks(config, num_tasks)
  for t in range(progress.task, num_tasks):
    epochs = epochs_all if t < n_adapt else 0  # first-session methods stop training after n_adapt
    k_t, s_t = splits[t]
    task_keys = [jax.random.fold_in(k, t) for k in root_keys]
    # seed i takes seed_steps[i] steps per epoch (its n_t); the loop runs the longest, and a seed
    # that has finished its epoch gets padding batches, which leave its state unchanged
    seed_steps = [st.steps_per_epoch(t, batch_size) for st in streams]
    steps = max(seed_steps)
    if not progress.in_task:  # fresh proxy head and optimiser state (SPEC 2.4 step 1)
      params_t = dict(state["train"].params)
      if not linear_step:  # the baselines' linear head persists across tasks
        params_t["proxy_head"] = stack.stack(
          [
            init_proxy_head(jax.random.fold_in(k, 0), spec.feature_dim, head_width)
            for k in task_keys
          ]
        )
      state["train"] = stack.put(
        TrainState(
          params=params_t, opt_state=tx.init(params_t), step=stack.stack([jnp.int32(0)] * K)
        )
      )
      progress.in_task, progress.epoch, progress.step_in_epoch = True, 0, 0
    n_old = losses.mi_old_rows(
      k_t + s_t, k_t, config.data.increment, known_only=quirks.mi_old_rows == "known_only"
    )
    task_info = TaskInfo.make(k_t, s_t, n_old, t > 0 or quirks.reg_at_task0)
    bases = []
    for protos_host in stack.host(state["prototypes"]):
      if quirks.orth_loss == "signed_residual_sum":
        bases.append(losses.orthogonality_basis(protos_host[: k_t + s_t], config.loss.svd_k))
      else:
        bases.append(losses.old_subspace_basis(protos_host[: k_t + s_t], k_t, config.loss.svd_k))
    aux = stack.put(stack.stack([{"task": task_info, "orth_basis": b} for b in bases]))
    aux = {**aux, "prototypes": state["prototypes"], "reg_snapshot": state["reg_snapshot"]}
    frozen_t = {"backbone": frozen_backbone, "peft": {"ema": state["ema"]}}

    bar.start(t, epochs * steps, progress.epoch * steps + progress.step_in_epoch)
    schedule = stack.put(
      stack.stack(
        [
          TaskSchedule.make(k, config.train.lr, max(epochs, 1), n)
          for k, n in zip(task_keys, seed_steps)
        ]
      )
    )
    health = stack.put(stack.stack([Health.fresh()] * K))

    def fetch(terms) -> list[dict[str, float]]:
      """Per seed, the terms of the last step as host floats, after the non-finite check."""
      host_health, host_terms = stack.fetch((health, terms))
      for seed, h in zip(seeds, stack.split(host_health)):
        if not h.ok:
          bad_step = int(h.bad_step)
          bad = bad_term_names([k for k in terms if k != "active"], int(h.bad_terms))
          if ckpts:  # finish the in-flight async save, or exiting loses the last good checkpoint
            ckpts.wait()
          raise NonFiniteLossError(
            f"Non-finite loss term(s) {bad}{f' of seed {seed}' if stacked else ''} at task {t}, "
            f"epoch {bad_step // steps}, step {bad_step % steps}. The run stopped; the last good "
            "checkpoint is kept in the workdir. Lower train.lr in a new --workdir (this one is "
            "bound to its config), or fix the data and rerun the same command to resume."
          )
      return [
        {k: float(v) for k, v in seed_terms.items() if k != "active"}
        for seed_terms in stack.split(host_terms)
      ]

    first_epoch, first_step = progress.epoch, progress.step_in_epoch

    def task_batches():
      """(epoch, step in epoch, host batch) for the rest of the task, in the streams' order."""
      for epoch in range(first_epoch, epochs):
        start = first_step if epoch == first_epoch else 0

        def make(i, process_index, process_count, epoch=epoch, start=start):
          return streams[i].train_batches(
            t,
            epoch,
            batch_size,
            seed=seeds[i],
            start_step=min(start, seed_steps[i]),
            process_index=process_index,
            process_count=process_count,
          )

        for i, b in enumerate(stack.batches(make, batch_size, steps - start), start=start):
          yield epoch, i, {k: b[k] for k in ("image", "label", "mask")}

    put = lambda x: (x[0], x[1], stack.put_batch(x[2], batch_size))  # noqa: E731
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
        log_seeds = []
        for s_i, seed_log in enumerate(logs):
          if i < seed_steps[s_i]:  # the seed took this step
            seed_log.total_steps += 1
            n = seed_steps[s_i]
            if (i + 1) % config.train.log_every_steps == 0 or i + 1 == n:
              log_seeds.append(s_i)
        every = config.train.checkpoint_every_steps
        save_now = every > 0 and progress.total_steps % every == 0 and i + 1 < steps
        host_terms = None
        if log_seeds or save_now:
          host_terms = fetch(terms)  # also flushes the check: no checkpoint of a poisoned state
        shown = host_terms[log_seeds[0] if log_seeds else 0] if host_terms else None
        bar.update(t, epoch * steps + i + 1, epochs * steps, shown)
        for s_i in log_seeds:
          seed_terms = dict(host_terms[s_i])
          lr = seed_terms.pop("lr")
          step_in_task = epoch * seed_steps[s_i] + i + 1
          writers[s_i].write(
            {"kind": "train", "task": t, "epoch": epoch, "step": step_in_task, "lr": lr}
            | seed_terms,
            step=logs[s_i].total_steps,
          )
        if save_now:
          t_save = time.perf_counter()
          save()
          timer["checkpoint_seconds"] += time.perf_counter() - t_save
        if i + 1 == steps:
          progress.epoch, progress.step_in_epoch = epoch + 1, 0
    if timer["seconds"] < 0.0:  # the last step ended with the epoch's final fetch
      timer["seconds"] += time.perf_counter() - timer["checkpoint_seconds"]
      timer["images"] = timer["steps"] * batch_size * K  # all seeds' images
      train_loop_time.append(timer)
    bar.close()

    # -- end of task: EMA, prototypes, evaluation, snapshot (SPEC 2.4 steps 3-6) ---------------
    ema_before = state["ema"]
    last = t == stream.num_tasks - 1  # the sequence's last task, also when max_tasks truncates
    if ntkcl and config.train.use_ema and (not last or quirks.ema_after_last_task):
      # leaf-wise blend with scalar rates: the same update for a stacked bank
      state["ema"] = ema_update(state["ema"], state["train"].params["peft"]["current"], t)
    params_eval = eval_params(state)
    if linear:
      with_head = {**params_eval, "proxy_head": state["train"].params["proxy_head"]}
      predict_t = functools.partial(linear_predict, with_head, k_t + s_t)
    else:
      task_feats = apply_seeds(features, params_eval, [st.train_indices(t) for st in streams])
      protos = new_prototypes(t, params_eval, ema_before, task_feats)
      state["prototypes"] = stack.put(stack.stack(protos))
      predict_t = functools.partial(predict, params_eval, state["prototypes"], k_t + s_t)
    if ridge is not None:  # closed-form ridge head (analytic_heads) replaces the cosine one
      if ridge_features is not features:  # [c; p; m]; else the prototypes' features serve
        task_feats = apply_seeds(ridge_features, params_eval, [stream.train_indices(t)])
      ((feats, labels),) = task_feats
      stats, w_out, ridge_info = ridge.end_of_task(state, feats, labels, k_t + s_t, t)
      state.update(stack.put(stats))
      predict_t = functools.partial(ridge_predict, params_eval, jnp.asarray(w_out), k_t + s_t)
    top5 = config.data.name not in NO_TOP5_DATASETS
    stages = evaluate_stages(predict_t, streams, t, eval_batch, stack, top5)
    for seed, seed_log, writer, stage in zip(seeds, logs, writers, stages):
      if ridge is not None:
        stage.update(ridge_info)
      seed_log.stages.append(stage)
      # TensorBoard step: the global step (the task index for methods that take no steps)
      writer.write(
        {"kind": "eval", "task": t, "step": seed_log.total_steps, **stage},
        step=seed_log.total_steps or t,
      )
      log.info(
        "%stask %d: A_t %.2f, row %s",
        f"seed {seed} " if stacked else "",
        t,
        stage["A"],
        np.round(stage["R_row"], 2).tolist(),
      )
    state["reg_snapshot"] = reg_targets(state["train"].params)
    progress.task, progress.in_task = t + 1, False
    save(finalize=True)
    call_hooks(t)

  # -- summary ----------------------------------------------------------------------------------
  wall = elapsed_before + time.time() - t_start
  summaries = []
  for i, (seed, seed_log, writer) in enumerate(zip(seeds, logs, writers)):
    R = accuracy_matrix(seed_log.stages, num_tasks)
    A = [s["A"] for s in seed_log.stages]
    final = metrics.final_metrics(R, A)
    writer.write({"kind": "final", **final}, step=seed_log.total_steps or num_tasks - 1)
    summary = {
      "accuracy_matrix": final["R"],
      **{k: final[k] for k in ("avg_acc", "last_acc", "forgetting", "bwt")},
      "stages": seed_log.stages,
      "method": config.method,
      "quirks": dataclasses.asdict(quirks),
      # a stacked seed's summary carries the config of the single run it equals
      "config": config_lib.flat_config(config_lib.seed_config(config, seed) if stacked else config),
      "num_devices": jax.device_count(),
      "num_processes": jax.process_count(),
      "backend": backend,
      # train-loop throughput of this process, per task, compile step excluded (bench_loop.py);
      # a stacked run's images are those of all its seeds
      "train_loop_time": train_loop_time,
      "wall_time_s": wall,
    }
    if stacked:
      summary["stacked_seeds"] = list(seeds)
    for hook in seed_hooks[i]:
      summary.update(hook.summary())
    # A rerun of a finished run keeps the sections its first run wrote and this one did not (a
    # hook has nothing new to report when every task was already done, e.g. "ntk"). Only then: a
    # run that started over (no checkpoint) must not inherit another run's sections.
    summary_path = out_dirs[i] / "summary.json"
    if resumed_finished and summary_path.exists():
      for key, value in json.loads(summary_path.read_text()).items():
        summary.setdefault(key, value)
    if is_writer:
      write_json(summary_path, summary)
    writer.close()
    summaries.append(summary)
  if ckpts:
    ckpts.close()
  if not stacked:
    return summaries[0]
  row = report.seed_row(config.method, summaries)
  top = {
    "seeds": list(seeds),
    "mesh": dict(mesh.shape),
    "results": dict(zip(report.SEED_COLUMNS, row)),
    "per_seed": {
      str(s): {k: sm[k] for k in ("avg_acc", "last_acc", "forgetting", "bwt")}
      for s, sm in zip(seeds, summaries)
    },
    "wall_time_s": wall,
  }
  if is_writer:
    top["results_md"] = report.write_seed_results(workdir, seeds, [row])
    write_json(workdir / "summary.json", top)
  return {**top, "summaries": summaries}
