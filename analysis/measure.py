"""One NTK measurement of an NTK-CL model, and the scalars logged per point (SPEC 7.1, 7.3-7.8).

Everything here is this project's formulation ([PROJ], SPEC 7); the paper's theorems are [UNK].

The differentiated function (SPEC 7.1) is

  f(θ_A, x) = S · m(θ_A, x)      (b, k)   `fused_feature`, gaussian projection (default)
            = m(θ_A, x)[:, chunk]          `fused_feature`, exact (all D outputs, chunked)
            = Σ_j ω_j cos(m^(j), μ^(j))    `prototype_logits` (b, C_seen)

of θ_A = `params["peft"]["current"]` (`which="peft"`), plus the fusion value projection with
`which="peft+fusion"`, with the model in eval mode (deterministic, float32) and everything else
(backbone, EMA bank, the rest of the fusion, S, prototypes) passed at call time as keyword
arguments, never baked into the compiled program as constants. m is the test feature of the
model (`m`; `c` / `p` under the `channel` / `patch` ablations). S (k, D) has iid N(0, 1/D) entries
from one fixed key per run, so the output-averaged kernel of S·m is an unbiased PSD estimate of
the D-averaged kernel of m. The kernel is `empirical_ntk_fn(f, trace_axes=(-1,), vmap_axes=0)`:
averaged over the k (or C_seen) outputs, not summed.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from analysis import cl_kernels as ck
from analysis.ntk import empirical_ntk_fn
from analysis.probes import ProbeSet

__all__ = [
  "EXACT_CHUNK",
  "KernelMeter",
  "make_output_fn",
  "merge_params",
  "output_drift",
  "point_record",
  "projection_matrix",
  "split_params",
]

PARAM_SETS = ("peft", "peft+fusion")
OUTPUTS = ("fused_feature", "prototype_logits")
EXACT_CHUNK = 128  # outputs per Jacobian chunk for projection="exact"
_PROJECTION_TAG = 7_001  # fold_in tag of the projection key (fixed per analysis.seed)

Params = dict[str, Any]


def split_params(params: Params, which: str = "peft") -> tuple[Params, Params]:
  """(θ_A, rest) of the eval parameter tree {"backbone", "peft": {"current", "ema"}, "fusion"}.

  Args:
    params: the full eval tree (no proxy head).
    which: "peft" (θ_A = {"current": peft/current}) or "peft+fusion" (adds
      {"fusion_value": fusion/value}; query/key have a zero Jacobian, Q1).
  Returns:
    θ_A and the rest of the tree with those leaves removed; `merge_params` undoes it.
  """
  if which not in PARAM_SETS:
    raise ValueError(
      f"analysis.params={which!r}; the hook supports {PARAM_SETS}. 'all_trainable' needs the "
      "proxy head, which TaskView does not carry (it is discarded after each task)."
    )
  theta = {"current": params["peft"]["current"]}
  rest = {k: v for k, v in params.items() if k not in ("peft", "proxy_head")}
  rest["peft"] = {k: v for k, v in params["peft"].items() if k != "current"}
  if which == "peft+fusion":
    theta["fusion_value"] = params["fusion"]["value"]
    rest["fusion"] = {k: v for k, v in params["fusion"].items() if k != "value"}
  return theta, rest


def merge_params(theta: Params, rest: Params) -> Params:
  """The full eval tree from `split_params`' two halves."""
  params = {**rest, "peft": {**rest["peft"], "current": theta["current"]}}
  if "fusion_value" in theta:
    params["fusion"] = {**rest["fusion"], "value": theta["fusion_value"]}
  return params


def projection_matrix(seed: int, k: int, dim: int) -> np.ndarray:
  """S (k, D) float32 with iid N(0, 1/D) entries from `fold_in(key(seed), 7001)` (SPEC 7.1)."""
  key = jax.random.fold_in(jax.random.key(seed), _PROJECTION_TAG)
  return np.asarray(jax.random.normal(key, (k, dim), jnp.float32) / math.sqrt(dim))


def exact_chunks(dim: int, chunk: int = EXACT_CHUNK) -> list[np.ndarray]:
  """Rows of the D x D identity in chunks: `projection="exact"` as a sum of chunk kernels."""
  eye = np.eye(dim, dtype=np.float32)
  return [eye[s : s + chunk] for s in range(0, dim, chunk)]


def make_output_fn(
  spec,
  *,
  output: str = "fused_feature",
  section_weights: tuple[float, ...] = (0.3, 0.1),
  tripled: bool = False,
) -> Callable[..., jax.Array]:
  """f(θ_A, x, *, rest, projection=None, prototypes=None) of an NTK-CL model (SPEC 7.1).

  Args:
    spec: `ntkcl_jax.models.ntkcl.ModelSpec`; run in float32 whatever its compute dtype.
    output: "fused_feature" or "prototype_logits".
    section_weights: ω of the test logits (`prototype_logits` only).
    tripled: return (b, 3, k): S·c, S·p, S·m (`fused_feature` with model_name="both"; SPEC 7.6).
  Returns:
    f with x (b, H, W, C) images and keyword arguments `rest` (the tree from `split_params`),
    `projection` (k, D) for `fused_feature`, `prototypes` (C_seen, D) for `prototype_logits`.
    Output (b, k), (b, 3, k) or (b, C_seen); example i depends only on x[i] (vmap_axes=0 holds).
  """
  from ntkcl_jax.models.heads import section_weighted_logits
  from ntkcl_jax.models.ntkcl import NTKCL, test_feature_key

  if output not in OUTPUTS:
    raise ValueError(
      f"analysis.output={output!r}; the hook supports {OUTPUTS}. 'proxy_logits' needs the proxy "
      "head, which TaskView does not carry."
    )
  if tripled and (output != "fused_feature" or spec.model_name != "both"):
    raise ValueError("the tripled kernel needs output='fused_feature' and model_name='both'.")
  model = NTKCL(dataclasses.replace(spec, dtype=jnp.float32))
  key = test_feature_key(spec.model_name)

  def f(theta, x, *, rest, projection=None, prototypes=None):
    feats = model.apply({"params": merge_params(theta, rest)}, x, train=False)
    if output == "prototype_logits":
      return section_weighted_logits(feats[key], prototypes, section_weights)
    if tripled:
      return jnp.stack([feats[v] for v in ("c", "p", "m")], axis=1) @ projection.T
    return feats[key] @ projection.T

  return f


class KernelMeter:
  """Gram Θ over a probe set, one compiled kernel function reused for every point.

  Args:
    f: f(θ_A, x, **kwargs) -> (b, K) or (b, V, K) per-example outputs.
    implementation, backend, batch_size: as in `analysis.ntk.empirical_ntk_fn` (0 = no blocking).
  """

  def __init__(self, f, *, implementation: int = 1, backend: str = "native", batch_size: int = 0):
    fn = empirical_ntk_fn(
      f,
      trace_axes=(-1,),
      vmap_axes=0,
      implementation=implementation,
      backend=backend,
      batch_size=batch_size or None,
    )
    # neural-tangents' ntk_fn is not jitted (and its batching calls it eagerly per block).
    self._fn = jax.jit(fn) if backend == "neural_tangents" and not batch_size else fn

  def lower_block(self, theta: Params, x1: Any, x2: Any, **kwargs) -> jax.stages.Lowered:
    """One kernel call Θ(x1, x2) of `gram`, lowered: with `batch_size` blocking, x1 and x2 are two
    blocks of probes (b, H, W, C), the unit whose memory decides the largest block that fits a
    device (`ntkcl_jax.preflight`; inputs may be `jax.ShapeDtypeStruct`s with a sharding).

    Raises:
      NotImplementedError: implementation 0 (AUTO picks by compiling both) or the
        neural-tangents backend: only the native implementations 1 and 2 lower as one program.
    """
    block = getattr(self._fn, "block_kernel", None)
    if not hasattr(block, "lower"):
      raise NotImplementedError(
        "analysis.implementation=1 or 2 with analysis.backend='native' lower as one program; "
        "AUTO (0) and the neural-tangents backend do not."
      )
    return block.lower(x1, x2, theta, **kwargs)

  def gram(self, theta: Params, images: np.ndarray, **kwargs) -> np.ndarray:
    """(N, N) float64 Θ(x, x') (or (N, N, V, V) for a (b, V, K) output); x2 = x1."""
    out = self._fn(jnp.asarray(images), None, theta, **kwargs)
    return np.asarray(jax.device_get(out), dtype=np.float64)

  def gram_projected(
    self, theta: Params, images: np.ndarray, projections: list[np.ndarray], **kwargs
  ) -> np.ndarray:
    """Σ_c (k_c / Σk) Θ_c over projection chunks: the average over all their output rows."""
    total = sum(p.shape[0] for p in projections)
    out = 0.0
    for p in projections:
      out = out + (p.shape[0] / total) * self.gram(
        theta, images, projection=jnp.asarray(p), **kwargs
      )
    return out


def output_drift(
  now: np.ndarray, then: Mapping[int, np.ndarray], task_of_row: np.ndarray, task: int
) -> list[float]:
  """How far each seen task's probe outputs moved since that task ended (function space).

  Args:
    now: (N, k) outputs f(θ_now, x) over every probe row. then: {i: (N, k) outputs at
      task_end(i)}. task_of_row: (N,) task of each row. task: t, the current point's task.
  Returns:
    For i ≤ t: ‖f_now(X_i) − f_end(i)(X_i)‖_F / ‖f_end(i)(X_i)‖_F over task i's rows (NaN when
    task_end(i) was not measured). To first order the numerator is J_i Δθ, the change the
    inter-task NTK block J_i J_sᵀ of the later tasks s drives.
  """
  drift = []
  for i in range(task + 1):
    if i not in then:
      drift.append(math.nan)
      continue
    rows = task_of_row == i
    ref = then[i][rows]
    drift.append(float(np.linalg.norm(now[rows] - ref) / max(np.linalg.norm(ref), 1e-30)))
  return drift


def untriple(theta4: np.ndarray) -> np.ndarray:
  """(N, N, 3, 3) kernel of (b, 3, k) outputs -> (3N, 3N), row v·N + r (view-major, SPEC 7.6)."""
  n = theta4.shape[0]
  return np.transpose(theta4, (2, 0, 3, 1)).reshape(3 * n, 3 * n)


def point_record(
  kernel: ck.BlockKernel,
  *,
  task: int,
  task_end_kernels: Mapping[int, ck.BlockKernel],
  previous: ck.BlockKernel | None = None,
  num_steps: int | None = None,
) -> dict[str, Any]:
  """The scalars of one measurement for a `ntk.jsonl` line (SPEC 7.4, 7.7).

  Args:
    kernel: this point's Θ over all tasks' probe rows.
    task: -1 at init, t at task_end(t).
    task_end_kernels: Θ at task_end(i) for the tasks measured so far (this point included).
    previous: the previous point's Θ (dynamics); num_steps: SGD steps since it.
  Returns:
    rho, q (T, T) over all rows; mean_inter_ratio ρ̄(t) over seen tasks (NaN for t < 1) and over
    all T; intra_retention[i] = ‖Θ_ii now‖_F / ‖Θ_ii at task_end(i)‖_F for i ≤ t; overlap
    σ_max (T, T) on train rows; dynamics (spectrum, velocity, kernel distance, label alignment).
  """
  blocks = kernel.blocks("all")
  rho = ck.block_ratio_rho(blocks)
  num_tasks = kernel.num_tasks
  rec: dict[str, Any] = {
    "rho": rho,
    "q": ck.normalized_ratio_q(blocks),
    "mean_inter_ratio": ck.mean_inter_ratio(rho, task) if task >= 1 else math.nan,
    "mean_inter_ratio_all": ck.mean_inter_ratio(rho, num_tasks - 1),
    "intra_retention": [
      ck.intra_retention(
        kernel.block(i, i, "all", "all"), task_end_kernels[i].block(i, i, "all", "all")
      )
      if i in task_end_kernels
      else math.nan
      for i in range(task + 1)
    ],
  }
  try:
    rec["overlap_sigma_max"], rec["overlap_frobenius"] = ck.task_overlap_matrix(kernel, split="tr")
  except ValueError:  # a zero-trace block (e.g. a Jacobian that is exactly 0)
    rec["overlap_sigma_max"] = rec["overlap_frobenius"] = None
  dyn = ck.kernel_dynamics(
    kernel.theta,
    previous=None if previous is None else previous.theta,
    num_steps=num_steps if num_steps else None,
    targets=ck.task_targets(kernel.labels, kernel.num_classes),
  )
  rec["dynamics"] = dyn
  return rec


@dataclasses.dataclass
class Point:
  """One measurement: name ("init", "task_end_3", ...), task (-1 at init) and Θ."""

  name: str
  task: int
  kernel: ck.BlockKernel
  tripled: ck.BlockKernel | None = None
  seconds: float = 0.0


def measure_point(
  meter: KernelMeter,
  probes: ProbeSet,
  params: Params,
  *,
  which: str,
  output: str,
  projections: list[np.ndarray] | None,
  prototypes: np.ndarray | None = None,
  tripled_meter: KernelMeter | None = None,
) -> tuple[ck.BlockKernel, ck.BlockKernel | None, float]:
  """Θ over `probes` for the eval tree `params`; with `tripled_meter`, also the 3N-row Θ.

  Returns:
    (kernel, tripled kernel or None, seconds). With the tripled meter, the m rows of the tripled
    Gram are the kernel (one Jacobian serves both).
  """
  start = time.perf_counter()
  theta, rest = split_params(params, which)
  images = probes.images
  tripled = None
  if output == "prototype_logits":
    theta_nn = meter.gram(theta, images, rest=rest, prototypes=jnp.asarray(prototypes))
  elif tripled_meter is not None:
    (proj,) = projections
    big = tripled_meter.gram(theta, images, rest=rest, projection=jnp.asarray(proj))
    theta_nn = big[:, :, 2, 2]
    base = probes.kernel(theta_nn)
    tripled = ck.tripled_block_kernel(untriple(big), base)
  else:
    theta_nn = meter.gram_projected(theta, images, projections, rest=rest)
  return probes.kernel(theta_nn), tripled, time.perf_counter() - start
