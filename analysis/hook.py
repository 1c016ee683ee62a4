"""NTK diagnostics during training (`NTKHook`) and standalone (SPEC 7.3, 7.8) [PROJ].

`NTKHook(config)` implements `ntkcl_jax.hooks.TaskHook`. At `on_init` (model at init) and at every
`on_task_end(t)` (after EMA and prototypes: the evaluated model) it computes the Gram Θ of the
SPEC 7.1 function (see `analysis.measure`) over the probe rows of **all** T tasks, seen and unseen,
train and test (SPEC 7.3), and writes (process 0 only)

  WORKDIR/analysis/ntk_<point>.npz   theta (N, N) float64, index, labels, task_of_row, split_of_row,
                                     class_ranges (T, 2), point, task, config_hash [, theta_tripled]
                                     [, outputs (N, k): f on the probes, fused_feature]
  WORKDIR/analysis/ntk.jsonl         one line per point: ρ, q, ρ̄, intra retention, overlap,
                                     spectrum / dynamics vs the previous point, measure_s, and
                                     at task ends output_drift (`measure.output_drift`)

Points are named "init" and "task_end_<t>". `summary()` returns {"ntk": analysis.summary.analyze
(...)} plus `overhead_s` (all time spent in the hook) and per-point `measure_s`.

Standalone use (Colab, CPU):

* any model: `ntk_from_params(f, params, probes)` with `f(params, x) -> (b, K)` per-example outputs
  and a `ProbeSet` gives a `BlockKernel`; `analyze({"init": k0, "task_end_0": k1, ...}, R)` the
  summary; `save_point(dir, name, kernel)` + `analysis.plots.write_all(dir)` the figures.
* a training run: `measure_checkpoint(config, workdir)` restores the latest orbax checkpoint of
  `workdir` and measures the init and checkpoint models the same way.

These are this project's diagnostics, not the paper's theorems ([UNK], SPEC 9).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from analysis import cl_kernels as ck
from analysis import measure
from analysis.ntk_files import (
  ANALYSIS_DIR,
  load_point,
  load_points,
  read_records,
  save_point,
  tripled_from_stored,
)
from analysis.probes import ProbeSet, build_probes
from analysis.summary import analyze, point_task

if TYPE_CHECKING:
  from ntkcl_jax.hooks import TaskView

__all__ = [
  "NTKHook",
  "NTKSettings",
  "kernel_meters",
  "load_points",
  "measure_checkpoint",
  "ntk_from_params",
  "save_point",
]

log = logging.getLogger("ntkcl_jax.analysis")


@dataclasses.dataclass(frozen=True)
class NTKSettings:
  """Plain values of `config.analysis` (+ what the hook needs from the rest of the config)."""

  seed: int = 0
  n_train: int = 64
  n_test: int = 32
  output: str = "fused_feature"
  projection: str = "gaussian"
  projection_dim: int = 16
  params: str = "peft"
  implementation: int = 1
  backend: str = "native"
  batch_size: int = 0
  lambda_rel: float = 1e-2
  kernel: str = "fixed"
  tripled: bool = False
  section_weights: tuple[float, ...] = (0.3, 0.1)
  eval_batch_size: int = 256
  epochs: int = 1
  train_batch_size: int = 16
  config_hash: str = ""

  @classmethod
  def from_config(cls, config) -> NTKSettings:
    """`config.analysis`, plus the run facts the hook needs from the config's run plan."""
    from ntkcl_jax import methods
    from ntkcl_jax import plan as plan_lib

    plan = plan_lib.resolve(config)
    a = config.analysis
    settings = cls(
      seed=int(a.seed),
      n_train=int(a.n_train),
      n_test=int(a.n_test),
      output=a.output,
      projection=a.projection,
      projection_dim=int(a.projection_dim),
      params=a.params,
      implementation=int(a.implementation),
      backend=a.backend,
      batch_size=int(a.batch_size),
      lambda_rel=float(a.lambda_rel),
      kernel=a.kernel,
      tripled=bool(a.get("tripled", False)),
      section_weights=tuple(plan.section_weights),
      eval_batch_size=int(plan.eval_batch_size),
      epochs=int(plan.epochs) if methods.build(plan).takes_steps else 0,
      train_batch_size=int(plan.batch_size),
      config_hash=plan.config_hash,
    )
    settings.check()
    return settings

  def check(self) -> None:
    if self.output not in measure.OUTPUTS:
      raise ValueError(
        f"analysis.output={self.output!r} is not measured by the hook; use one of "
        f"{measure.OUTPUTS} ('proxy_logits' needs the per-task proxy head, which hooks never see)."
      )
    if self.params not in measure.PARAM_SETS:
      raise ValueError(
        f"analysis.params={self.params!r} is not measured by the hook; use one of "
        f"{measure.PARAM_SETS} ('all_trainable' adds the proxy head, which hooks never see)."
      )
    if self.n_train < 2 or self.n_test < 1:
      raise ValueError(
        f"analysis.n_train={self.n_train}, n_test={self.n_test}: need >= 2 train and >= 1 test "
        "probes per task."
      )
    if self.projection == "gaussian" and self.projection_dim < 1:
      raise ValueError(f"analysis.projection_dim={self.projection_dim} must be >= 1.")


# ------------------------------------------------------------------------------------------------
# Standalone, any model.


def ntk_from_params(
  f: Callable[..., Any],
  params: Any,
  probes: ProbeSet,
  *,
  implementation: int = 1,
  backend: str = "native",
  batch_size: int = 0,
  **f_kwargs,
) -> ck.BlockKernel:
  """Θ of `f(params, x, **f_kwargs)` over `probes.images`, as a `BlockKernel` (SPEC 7.2, 7.3).

  Args:
    f: per-example function, (b, ...) inputs -> (b, K) outputs (example i depends on x[i] only,
      so `vmap_axes=0` holds); averaged over the K outputs (`trace_axes=(-1,)`). Differentiated
      with respect to all of `params` (restrict it with `analysis.ntk.restrict_to_subtree` or a
      closure); array keyword arguments are passed at call time.
    params: the differentiated pytree. probes: a `ProbeSet` (`ProbeSet.from_arrays` for your own
      data). implementation, backend, batch_size: see `analysis.ntk.empirical_ntk_fn`.
  Example (Colab)::

    probes = ProbeSet.from_arrays(x, y, task_of_row, split_of_row, [(0, 2), (2, 2)])
    k0 = ntk_from_params(f, params_at_init, probes)
    k1 = ntk_from_params(f, params_after_task0, probes)
    summary = analyze({"init": k0, "task_end_0": k1}, accuracy_matrix=None)
  """
  meter = measure.KernelMeter(
    f, implementation=implementation, backend=backend, batch_size=batch_size
  )
  theta = meter.gram(params, probes.images, **f_kwargs)
  if theta.ndim != 2:
    raise ValueError(f"f must return (b, K) outputs; its kernel has shape {theta.shape}.")
  return probes.kernel(theta)


# ------------------------------------------------------------------------------------------------
# The session shared by the hook and the checkpoint runner.


def kernel_meters(
  settings: NTKSettings, spec
) -> tuple[measure.KernelMeter, measure.KernelMeter | None]:
  """(meter, tripled meter or None): the kernel functions the hook measures with (the tripled
  one, when on, computes the kernel of every point; `measure.measure_point`)."""
  s = settings
  f = measure.make_output_fn(spec, output=s.output, section_weights=s.section_weights)
  kw = dict(implementation=s.implementation, backend=s.backend, batch_size=s.batch_size)
  tripled = None
  if s.tripled and s.output == "fused_feature" and spec.model_name == "both":
    if s.projection != "gaussian":
      raise ValueError("analysis.tripled needs analysis.projection='gaussian'.")
    f3 = measure.make_output_fn(spec, output=s.output, tripled=True)
    tripled = measure.KernelMeter(f3, **kw)
  return measure.KernelMeter(f, **kw), tripled


class _Session:
  """Probes, the compiled kernel function and the measured points of one run."""

  def __init__(self, settings: NTKSettings, spec, probes: ProbeSet, out_dir, is_writer: bool):
    s = self.settings = settings
    self.spec, self.probes, self.out_dir, self.is_writer = spec, probes, out_dir, is_writer
    f = measure.make_output_fn(spec, output=s.output, section_weights=s.section_weights)
    self.meter, self.tripled_meter = kernel_meters(s, spec)
    dim = spec.feature_dim
    self.projections = (
      [measure.projection_matrix(s.seed, s.projection_dim, dim)]
      if s.projection == "gaussian"
      else measure.exact_chunks(dim)
    )
    self.points: dict[str, ck.BlockKernel] = {}
    self.records: dict[str, dict[str, Any]] = {}
    self.tripled: ck.BlockKernel | None = None
    # f on the probes at each task end (fused_feature), for the output drift of old tasks
    self.outputs: dict[int, np.ndarray] = {}
    self.output_fn = jax.jit(f) if s.output == "fused_feature" else None

  def measure(self, name: str, task: int, params, prototypes, num_seen: int, num_steps=None):
    s = self.settings
    if s.output == "prototype_logits" and num_seen == 0:
      log.warning("analysis: no prototypes yet at %s; prototype_logits point skipped.", name)
      return None
    use_tripled = self.tripled_meter is not None and not self.points
    kernel, tripled, seconds = measure.measure_point(
      self.meter,
      self.probes,
      params,
      which=s.params,
      output=s.output,
      projections=self.projections,
      prototypes=None if prototypes is None else np.asarray(prototypes)[:num_seen],
      tripled_meter=self.tripled_meter if use_tripled else None,
    )
    if tripled is not None:
      self.tripled = tripled
    task_end = {point_task(n): k for n, k in self.points.items() if n.startswith("task_end_")}
    if name.startswith("task_end_"):
      task_end[task] = kernel
    previous = self.points[list(self.points)[-1]] if self.points else None
    record = measure.point_record(
      kernel, task=task, task_end_kernels=task_end, previous=previous, num_steps=num_steps
    )
    outputs = self.probe_outputs(params)
    if outputs is not None and name.startswith("task_end_"):
      self.outputs[task] = outputs
      record["output_drift"] = measure.output_drift(outputs, self.outputs, kernel.task_of_row, task)
    record["measure_s"] = seconds
    record["num_rows"] = int(kernel.theta.shape[0])
    self.points[name], self.records[name] = kernel, record
    if self.is_writer:
      save_point(
        self.out_dir,
        name,
        kernel,
        probes_index=self.probes.index,
        task=task,
        config_hash=s.config_hash,
        record=record,
        tripled=tripled,
        outputs=outputs,
      )
    log.info(
      "analysis %s: Θ (%d rows) in %.1f s, ρ̄(all) %.3f",
      name,
      kernel.theta.shape[0],
      seconds,
      record["mean_inter_ratio_all"],
    )
    return record

  def probe_outputs(self, params) -> np.ndarray | None:
    """(N, k) f(θ_A, x) on the probes with the kernel's projection rows (fused_feature only)."""
    if self.output_fn is None:
      return None
    theta, rest = measure.split_params(params, self.settings.params)
    projection = jnp.asarray(np.concatenate(self.projections))
    images, size = self.probes.images, self.settings.eval_batch_size
    chunks = [
      self.output_fn(theta, jnp.asarray(images[i : i + size]), rest=rest, projection=projection)
      for i in range(0, len(images), size)
    ]
    return np.concatenate([np.asarray(c, np.float64) for c in chunks])

  def resume_from_disk(self) -> None:
    """Reloads points a resumed run measured before its restart (same config hash)."""
    if not self.out_dir.exists():
      return
    for name, kernel in load_points(self.out_dir, self.settings.config_hash).items():
      if kernel.theta.shape[0] == self.probes.num_rows and name not in self.points:
        self.points[name] = kernel
        _, _, data = load_point(self.out_dir / f"ntk_{name}.npz")
        if "outputs" in data and name.startswith("task_end_"):
          self.outputs[point_task(name)] = data["outputs"]
    self.records.update({k: v for k, v in read_records(self.out_dir).items() if k in self.points})
    if "init" in self.points and self.tripled_meter is not None:
      _, base, data = load_point(self.out_dir / "ntk_init.npz")
      if "theta_tripled" in data:
        self.tripled = tripled_from_stored(data["theta_tripled"], base)

  def summary(self, accuracy_matrix) -> dict[str, Any]:
    if not self.points:
      return {}
    return analyze(
      self.points,
      accuracy_matrix,
      lambda_rel=self.settings.lambda_rel,
      mode=self.settings.kernel,
      tripled=self.tripled,
      records=self.records,
    )


# ------------------------------------------------------------------------------------------------
# The training hook.


class NTKHook:
  """`TaskHook` measuring Θ at init and at every task end (SPEC 7.3); see the module docstring.

  Args:
    config: the run's validated `ml_collections.ConfigDict` (reads `analysis.*`, `eval`,
      `train.epochs`, `train.batch_size`; converted to `NTKSettings` at construction).
  """

  def __init__(self, config):
    self.settings = NTKSettings.from_config(config)
    self._session: _Session | None = None
    self._overhead = 0.0
    self._accuracy: np.ndarray | None = None
    self._stream = None

  def _ensure(self, view: TaskView) -> _Session:
    if self._session is None:
      s = self.settings
      probes = build_probes(
        view.stream, view.num_tasks, s.n_train, s.n_test, s.seed, s.eval_batch_size
      )
      out_dir = pathlib.Path(view.workdir) / ANALYSIS_DIR
      self._session = _Session(s, view.spec, probes, out_dir, view.is_writer)
      self._stream = view.stream
      if view.task >= 0:  # resumed run: on_init never ran in this process
        self._session.resume_from_disk()
    return self._session

  def _steps(self, t: int) -> int | None:
    steps = self.settings.epochs * self._stream.steps_per_epoch(t, self.settings.train_batch_size)
    return steps or None

  def on_init(self, view: TaskView) -> None:
    start = time.perf_counter()
    session = self._ensure(view)
    session.measure("init", -1, view.params, view.prototypes, view.num_seen)
    self._overhead += time.perf_counter() - start

  def on_task_end(self, view: TaskView) -> None:
    start = time.perf_counter()
    session = self._ensure(view)
    t = view.task
    session.measure(
      f"task_end_{t}", t, view.params, view.prototypes, view.num_seen, num_steps=self._steps(t)
    )
    self._accuracy = np.asarray(view.accuracy_matrix, dtype=np.float64)
    self._overhead += time.perf_counter() - start

  def summary(self) -> dict[str, Any]:
    """{"ntk": analyze(...) + overhead_s, measure_s}; {} if nothing was measured."""
    start = time.perf_counter()
    if self._session is None or not self._session.points:
      return {}
    out = self._session.summary(self._accuracy)
    out["measure_s"] = {n: r.get("measure_s") for n, r in self._session.records.items()}
    out["settings"] = dataclasses.asdict(self.settings)
    out["overhead_s"] = self._overhead + time.perf_counter() - start
    return {"ntk": out}


# ------------------------------------------------------------------------------------------------
# Standalone, from a run's checkpoint.


def measure_checkpoint(
  config,
  workdir: str | pathlib.Path,
  *,
  number: int | None = None,
  out_dir=None,
  seed: int | None = None,
) -> dict[str, Any]:
  """Measures a run's init model and its checkpoint `number` (default: latest) (SPEC 7.8).

  Rebuilds the run with `ntkcl_jax.load_run` (the trainer's stream, init key and backbone; the
  checkpoint's evaluation parameters and prototypes) and measures the init and checkpoint models on
  the probes of `config.analysis`. Files go to `out_dir` (default `workdir/analysis_ckpt`) as points
  "init" and "task_end_<t>" (t = the last finished task; a mid-task checkpoint is named
  "checkpoint_<number>" and uses the prototypes of the tasks finished before it), so
  `analysis.plots.write_all(out_dir)` works. A stacked run's workdir (`config.seeds`) is measured
  for `seed` (default: its first seed; default `out_dir` then `workdir/seed_<s>/analysis_ckpt`).

  Returns:
    `analyze(...)` of the two points, with the measured R of the checkpoint's finished tasks.
  """
  import jax

  from ntkcl_jax import load_run

  settings = NTKSettings.from_config(config)
  workdir = pathlib.Path(workdir)
  run = load_run(config, workdir, number, seed=seed)
  last = run.tasks_done - 1
  name = f"task_end_{last}" if not run.in_task and last >= 0 else f"checkpoint_{run.number}"
  probes = build_probes(
    run.stream,
    run.num_tasks,
    settings.n_train,
    settings.n_test,
    settings.seed,
    settings.eval_batch_size,
  )
  run_dir = workdir / f"seed_{run.config.seed}" if config.seeds else workdir
  out = pathlib.Path(out_dir) if out_dir is not None else run_dir / "analysis_ckpt"
  session = _Session(settings, run.spec, probes, out, jax.process_index() == 0)
  session.measure("init", -1, run.init, np.zeros_like(run.prototypes), 0)
  session.measure(name, last, run.params, run.prototypes, run.num_seen)
  return session.summary(run.accuracy_matrix)
