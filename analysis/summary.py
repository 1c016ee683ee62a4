"""The `ntk` section of summary.json from a run's kernel measurements (SPEC 7.4-7.6) [PROJ].

`analyze(points, accuracy_matrix, ...)` is pure host algebra (float64, `analysis.cl_kernels`) on
named measurements {"init": Θ, "task_end_0": Θ, ...}; the training hook, the checkpoint runner
and the notebook all call it. These are this project's formulations on standard NTK continual-
learning theory, not the paper's theorems ([UNK], SPEC 9).

Keys of the returned dict:
  points: measurement names in order. final_point: the one `inter_intra_ratio` / `q` come from.
  inter_intra_ratio: (T, T) ρ at the final point. q: (T, T). mean_inter_ratio: {point: ρ̄(t)}.
  intra_retention: (T, T) [t, i] = ‖Θ_ii at task_end(t)‖_F / ‖Θ_ii at task_end(i)‖_F.
  output_drift: (T, T) [t, i] = ‖f_t(X_i) − f_i(X_i)‖_F / ‖f_i(X_i)‖_F on task i's probes (from
    the records; NaN when not recorded).
  predictor: mode, kernel_points, lambda_rel, accuracy R̂ (T, T) %, metrics of R̂ (avg_acc = Ā,
    last_acc = A_T, forgetting, bwt), drift_forgetting F̂ (T, T) (‖Δ_s^(t)‖_F² / n_te).
  forgetting: per task s < T-1, predicted (F̂ at the last task), predicted_accuracy_drop (from R̂)
    and measured (max_{l<T-1} R[l, s] - R[T-1, s]); correlations (Pearson / Spearman) of F̂ and of
    the R̂ drop with the measured drop, over the last row (`final`) and over all pairs t > s.
  accuracy_correlation: R̂ vs measured R on the lower triangle (diagonal included).
  gap_terms: I, Ī (T, T); task_specific G, fit_residual E, empirical_gap e, train/test MSE (T,).
  lambda_sweep, sample_size_sweep (and sample_size_sweep_tripled): one compact entry per value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from analysis import cl_kernels as ck

__all__ = ["analyze", "drop_matrix", "point_task"]


def point_task(name: str) -> int:
  """-1 for "init", t for "task_end_<t>"; other names (e.g. "checkpoint_5") raise ValueError."""
  if name == "init":
    return -1
  prefix = "task_end_"
  if name.startswith(prefix) and name[len(prefix) :].isdigit():
    return int(name[len(prefix) :])
  raise ValueError(f"point name {name!r} is neither 'init' nor 'task_end_<t>'.")


def drop_matrix(R: np.ndarray) -> np.ndarray:
  """(T, T) D[t, s] = max_{l ∈ [s, t-1]} R[l, s] - R[t, s] for s < t; NaN elsewhere.

  The last row is the per-task forgetting of SPEC 3 (max over previous stages minus final).
  """
  R = np.asarray(R, dtype=np.float64)
  out = np.full(R.shape, np.nan)
  for t in range(R.shape[0]):
    for s in range(t):
      prev = R[s:t, s]
      if np.all(np.isfinite(prev)) and np.isfinite(R[t, s]):
        out[t, s] = prev.max() - R[t, s]
  return out


def _last_row_only(m: np.ndarray, row: int) -> np.ndarray:
  out = np.full(m.shape, np.nan)
  out[row] = m[row]
  return out


def _corr(a: np.ndarray, b: np.ndarray, include_diagonal: bool) -> dict[str, float]:
  return ck.correlate(a, b, include_diagonal=include_diagonal)._asdict()


def _sweep_entry(point: ck.SweepPoint) -> dict[str, Any]:
  res, gaps = point.result, point.gaps
  last = res.layout.num_tasks - 1
  return {
    "value": point.value,
    "metrics": dict(res.metrics),
    "drift_forgetting_last": res.forgetting[last, :last],
    "interplay_last": gaps.interplay[last, :last],
    "interplay_bound_last": gaps.interplay_bound[last, :last],
    "task_specific": gaps.task_specific,
    "fit_residual": gaps.fit_residual,
    "empirical_gap": gaps.empirical_gap,
  }


def _predictor_kernels(points: Mapping[str, ck.BlockKernel], mode: str, num_tasks: int):
  """(kernel or kernels, names) for `sequential_kernel_predictor`: init (fixed), or per task the
  measurement at its start (init, task_end_0, ..., task_end_{T-2})."""
  names = list(points)
  if mode == "per_task":
    wanted = ["init"] + [f"task_end_{t}" for t in range(num_tasks - 1)]
    if all(w in points for w in wanted):
      return [points[w] for w in wanted], wanted, "per_task"
    mode = "fixed"  # not all start-of-task points exist (resumed or truncated run)
  name = "init" if "init" in points else names[0]
  return points[name], [name], mode


def analyze(
  points: Mapping[str, ck.BlockKernel],
  accuracy_matrix: np.ndarray | None = None,
  *,
  lambda_rel: float = 1e-2,
  mode: str = "fixed",
  tripled: ck.BlockKernel | None = None,
  records: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
  """The SPEC 7.4-7.6 summary of a run's measurements (see the module docstring for the keys).

  Args:
    points: ordered {name: BlockKernel}, names "init" / "task_end_<t>" (others are allowed for
      `fixed` mode: the first one is then the predictor's kernel); all with one row layout.
    accuracy_matrix: measured R (T, T) in %, NaN above the diagonal / for stages not run; None
      skips the measured-vs-predicted comparison.
    lambda_rel: relative ridge of the predictor and gap terms (SPEC 7.5).
    mode: "fixed" (the init kernel for every step) or "per_task" (falls back to fixed when a
      start-of-task point is missing; the returned `predictor.mode` says which ran).
    tripled: the 3N-row kernel of the predictor's point (SPEC 7.6 "tripled" sample-size sweep).
    records: the per-point `ntk.jsonl` records, for `mean_inter_ratio` by point.
  """
  if not points:
    raise ValueError("no NTK measurement to analyze; measure at least the init point.")
  names = list(points)
  first = points[names[0]]
  if not all(first.same_layout(k) for k in points.values()):
    raise ValueError("all measurements must share one probe layout (same probes, same order).")
  num_tasks = first.num_tasks
  task_of = {}
  for n in names:
    try:
      task_of[n] = point_task(n)
    except ValueError:
      task_of[n] = None
  task_end = {task_of[n]: points[n] for n in names if task_of[n] is not None and task_of[n] >= 0}
  final_name = names[-1]
  blocks = points[final_name].blocks("all")
  kernel, kernel_points, used_mode = _predictor_kernels(points, mode, num_tasks)
  result = ck.sequential_kernel_predictor(kernel, lambda_rel=lambda_rel, mode=used_mode)
  gaps = ck.gap_terms(result)
  out: dict[str, Any] = {
    "points": names,
    "final_point": final_name,
    "num_rows": int(first.theta.shape[0]),
    "inter_intra_ratio": ck.block_ratio_rho(blocks),
    "q": ck.normalized_ratio_q(blocks),
    "mean_inter_ratio": {
      n: (records[n].get("mean_inter_ratio") if records and n in records else None) for n in names
    },
    "intra_retention": _retention(task_end, num_tasks),
    "output_drift": _output_drift(records or {}, names, num_tasks),
    "predictor": {
      "mode": used_mode,
      "kernel_points": kernel_points,
      "lambda_rel": float(lambda_rel),
      "accuracy": result.accuracy,
      "metrics": dict(result.metrics),
      "drift_forgetting": result.forgetting,
    },
    "gap_terms": {
      "interplay": gaps.interplay,
      "interplay_bound": gaps.interplay_bound,
      "task_specific": gaps.task_specific,
      "fit_residual": gaps.fit_residual,
      "empirical_gap": gaps.empirical_gap,
      "train_mse": gaps.train_mse,
      "test_mse": gaps.test_mse,
    },
  }
  out.update(_forgetting(result, accuracy_matrix, num_tasks))
  out.update(_sweeps(kernel, first, used_mode, lambda_rel, tripled))
  return out


def _retention(task_end: Mapping[int, ck.BlockKernel], num_tasks: int) -> np.ndarray:
  """(T, T) intra-task retention of task i's block at the end of task t ≥ i; NaN elsewhere."""
  retention = np.full((num_tasks, num_tasks), np.nan)
  for t, kern in task_end.items():
    for i in range(t + 1):
      if i in task_end:
        retention[t, i] = ck.intra_retention(
          kern.block(i, i, "all", "all"), task_end[i].block(i, i, "all", "all")
        )
  return retention


def _output_drift(
  records: Mapping[str, Mapping[str, Any]], names: Sequence[str], num_tasks: int
) -> np.ndarray:
  """(T, T) [t, i]: task i's probe outputs' relative move from task_end(i) to task_end(t)
  (`measure.output_drift`, recorded at fused_feature points); NaN where not recorded."""
  drift = np.full((num_tasks, num_tasks), np.nan)
  for n in names:
    if n.startswith("task_end_") and "output_drift" in records.get(n, {}):
      t = point_task(n)
      drift[t, : t + 1] = records[n]["output_drift"]
  return drift


def _forgetting(
  result: ck.PredictorResult, accuracy_matrix: np.ndarray | None, num_tasks: int
) -> dict[str, Any]:
  """{"accuracy_correlation" (with a measured R), "forgetting"}: predicted vs measured drops."""
  last = num_tasks - 1
  out: dict[str, Any] = {}
  pred_drop = drop_matrix(result.accuracy)
  forgetting: dict[str, Any] = {
    "predicted": result.forgetting[last, :last],
    "predicted_accuracy_drop": pred_drop[last, :last],
  }
  if accuracy_matrix is not None:
    R = np.asarray(accuracy_matrix, dtype=np.float64)
    if R.shape != (num_tasks, num_tasks):
      raise ValueError(f"accuracy_matrix is {R.shape}; the probes cover {num_tasks} tasks.")
    meas_drop = drop_matrix(R)
    forgetting["measured"] = meas_drop[last, :last]
    forgetting["correlation_final"] = _corr(
      _last_row_only(result.forgetting, last), _last_row_only(meas_drop, last), False
    )
    forgetting["correlation_pairs"] = _corr(result.forgetting, meas_drop, False)
    forgetting["accuracy_drop_correlation_final"] = _corr(
      _last_row_only(pred_drop, last), _last_row_only(meas_drop, last), False
    )
    forgetting["accuracy_drop_correlation_pairs"] = _corr(pred_drop, meas_drop, False)
    out["accuracy_correlation"] = _corr(result.accuracy, R, True)
  out["forgetting"] = forgetting
  return out


def _sweeps(
  kernel: ck.BlockKernel,
  first: ck.BlockKernel,
  mode: str,
  lambda_rel: float,
  tripled: ck.BlockKernel | None,
) -> dict[str, Any]:
  """The λ and sample-size sweeps of the predictor (and of the tripled kernel, if measured)."""
  out: dict[str, Any] = {
    "lambda_sweep": [
      _sweep_entry(p) for p in ck.lambda_sweep(kernel, ck.LAMBDA_REL_GRID, mode=mode)
    ]
  }
  n_train = min(first.rows(t, "tr").size for t in range(first.num_tasks))
  sizes = _sizes(n_train)
  out["sample_size_sweep"] = [
    _sweep_entry(p) for p in ck.sample_size_sweep(kernel, sizes, lambda_rel=lambda_rel, mode=mode)
  ]
  if tripled is not None:
    entries = ck.sample_size_sweep(tripled, [3 * n for n in sizes], lambda_rel=lambda_rel)
    out["sample_size_sweep_tripled"] = [
      {**_sweep_entry(p), "value": p.value / 3, "rows_per_task": p.value} for p in entries
    ]
  return out


def _sizes(n_train: int) -> list[int]:
  """SPEC 7.6 nested sizes {16, 32, 64} that fit, plus n_train itself; at least 2 rows each."""
  sizes = sorted({n for n in ck.SAMPLE_SIZES if n <= n_train} | {n_train})
  return [n for n in sizes if n >= 2] or [n_train]


def sweep_table(entries: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(values, per-value mean of `key` over tasks) of a stored sweep, NaN-aware (plots)."""
  values = np.array([e["value"] for e in entries], dtype=np.float64)
  means = []
  for e in entries:
    arr = np.array([math.nan if v is None else v for v in np.ravel(e[key])], dtype=np.float64)
    means.append(np.nanmean(arr) if np.any(np.isfinite(arr)) else math.nan)
  return values, np.array(means)
