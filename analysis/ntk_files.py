"""The files of one NTK measurement point (SPEC 7.8): `ntk_<point>.npz` and `ntk.jsonl`.

  ntk_<point>.npz   theta (N, N) float64 Gram over all probe rows; index (N,) into each row's split
                    source (-1 if unknown); labels (N,); task_of_row (N,); split_of_row (N,)
                    "tr"/"te"; class_ranges (T, 2); point; task (-1 at init); config_hash;
                    optionally theta_tripled (3N, 3N), sample-major (row 3r + v, v = c, p, m).
  ntk.jsonl         one JSON object per point (written by `ntkcl_jax.metrics.MetricWriter`, so
                    NaN is null): "point", "task" and the scalars of `analysis.measure.point_record`.

Loading never unpickles (`allow_pickle=False`); `analysis.plots` reads only these files.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from analysis import cl_kernels as ck
from analysis.summary import point_task

__all__ = [
  "ANALYSIS_DIR",
  "JSONL",
  "load_point",
  "load_points",
  "read_records",
  "save_point",
  "tripled_from_stored",
]

ANALYSIS_DIR = "analysis"
JSONL = "ntk.jsonl"


def save_point(
  out_dir: str | pathlib.Path,
  name: str,
  kernel: ck.BlockKernel,
  *,
  probes_index: np.ndarray | None = None,
  task: int | None = None,
  config_hash: str = "",
  record: Mapping[str, Any] | None = None,
  tripled: ck.BlockKernel | None = None,
  outputs: np.ndarray | None = None,
) -> pathlib.Path:
  """Writes `ntk_<name>.npz` (and, with `record`, appends one `ntk.jsonl` line) in `out_dir`.

  `outputs`: the differentiated function's (N, k) values on the probes, stored as "outputs".
  """
  from ntkcl_jax.metrics import MetricWriter

  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  task = point_task(name) if task is None else task
  n = kernel.theta.shape[0]
  arrays = {
    "theta": kernel.theta.astype(np.float64),
    "index": np.full(n, -1, np.int64) if probes_index is None else np.asarray(probes_index),
    "labels": kernel.labels,
    "task_of_row": kernel.task_of_row,
    "split_of_row": kernel.split_of_row.astype("U2"),
    "class_ranges": np.asarray(kernel.class_ranges, dtype=np.int64).reshape(-1, 2),
    "point": np.array(name),
    "task": np.array(task),
    "config_hash": np.array(config_hash),
  }
  if tripled is not None:
    arrays["theta_tripled"] = tripled.theta
  if outputs is not None:
    arrays["outputs"] = np.asarray(outputs, np.float64)
  path = out_dir / f"ntk_{name}.npz"
  tmp = out_dir / f".ntk_{name}.tmp.npz"
  np.savez(tmp, **arrays)
  tmp.replace(path)
  if record is not None:
    writer = MetricWriter(out_dir / JSONL)
    writer.write({"point": name, "task": task, **record})
    writer.close()
  return path


def load_point(path: str | pathlib.Path) -> tuple[str, ck.BlockKernel, dict[str, Any]]:
  """(name, kernel, the other arrays) of one `ntk_<point>.npz` (no pickle)."""
  with np.load(path, allow_pickle=False) as z:
    data = {k: z[k] for k in z.files}
  kernel = ck.BlockKernel(
    data["theta"],
    data["task_of_row"],
    data["split_of_row"],
    data["labels"],
    tuple(map(tuple, data["class_ranges"])),
  )
  return str(data["point"]), kernel, data


def load_points(
  out_dir: str | pathlib.Path, config_hash: str | None = None
) -> dict[str, ck.BlockKernel]:
  """{name: kernel} of the `ntk_*.npz` in `out_dir`, ordered init, task_end_0, 1, ..., others.

  With `config_hash`, files from another config are skipped.
  """
  found = {}
  for path in sorted(pathlib.Path(out_dir).glob("ntk_*.npz")):
    name, kernel, data = load_point(path)
    if config_hash is not None and str(data["config_hash"]) != config_hash:
      continue
    found[name] = kernel

  def order(name):
    try:
      return (0, point_task(name), name)
    except ValueError:
      return (1, 0, name)

  return {n: found[n] for n in sorted(found, key=order)}


def read_records(out_dir: str | pathlib.Path) -> dict[str, dict[str, Any]]:
  """{point: its last `ntk.jsonl` record} (a resumed run may have appended a point twice)."""
  path = pathlib.Path(out_dir) / JSONL
  if not path.exists():
    return {}
  out = {}
  for line in path.read_text().splitlines():
    if line.strip():
      rec = json.loads(line)
      out[rec["point"]] = rec
  return out


def tripled_from_stored(theta_3n: np.ndarray, base: ck.BlockKernel) -> ck.BlockKernel:
  """The tripled kernel from its stored (sample-major, row 3r + v) Gram and the base layout."""
  rep = np.repeat
  return ck.BlockKernel(
    theta_3n,
    rep(base.task_of_row, 3),
    rep(base.split_of_row, 3),
    rep(base.labels, 3),
    base.class_ranges,
  )
