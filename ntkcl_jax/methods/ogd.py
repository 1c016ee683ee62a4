"""NTK-CL with its PEFT update kept off old tasks' tangent features (`method=ntkcl_ogd`).

The paper asks a PEFT continual learner to keep each task's intra-task NTK and attenuate the
inter-task one. To first order, training task t changes the output f of an old task's input x by
J_old(x) Δθ, and the inter-task NTK block is J_old J_tᵀ. This method constrains every update Δθ of
the shared trainable parameters to the orthogonal complement of a stored orthonormal basis B of
old tasks' tangent features (Orthogonal Gradient Descent, Farajtabar et al. 2020, with the
basis built like Gradient Projection Memory, Saha et al. 2021, on the PEFT Jacobian):

  Δθ ← Δθ − B Bᵀ Δθ                         (every step, after momentum and weight decay)

so J_old Δθ = 0 for every tangent feature in span(B), and the projected inter-task block
J_old (I − B Bᵀ) J_tᵀ vanishes on it. Rehearsal-free: only B is stored, never images.

What is constrained: θ = {peft/current, fusion} (`train_step.reg_targets`), P parameters, flattened
in `jax.flatten_util.ravel_pytree` order; the per-task proxy head is not (no old task reads it).
The EMA bank is not blended (`train.use_ema=False` is required): a blend moves old tasks' outputs
outside the gradient, where no projection reaches.

Which output: the feature the method classifies with, in eval mode: m (the prototypes' feature),
or [c; p; m] under `eval.head=ridge` with `ridge.features=cpm`. At the end of task t (not the
last), `ogd.samples` of its training images are drawn (fixed per seed and task); each image's D
outputs are read along q = `ogd.directions` random Gaussian directions (a sketch of all D
outputs' tangent features; 0: the D outputs themselves), giving n·q tangent-feature rows
J_t (n·q, P). GPM then adds the leading directions of J_t's residual (I − B Bᵀ) until B holds
`ogd.energy` of ‖J_t‖²_F, at most `ogd.max_rank` columns in all.

Memory: B is P x `ogd.max_rank` float32 per seed, in the run state, in every step's inputs and
in the checkpoints; the end-of-task pass also holds J_t, (n·q) x P. At ViT-B/16 the PEFT bank has
346,512 parameters and the fusion is (2·768)² + 2·768 = 2,360,832 for the corrected value-only
fusion (3 x that for the reference's dead q/k), so P = 2,707,344 (corrected): 10.3 MiB per basis
column or tangent-feature row, i.e. 4·P·R bytes = 2.6 GiB at R = 256, 10.3 GiB at the default
R = 1,024 (and J_t another 10.3 GiB at n = 64, q = 16). On a 16 GB chip use e.g. `ogd.samples=32
ogd.directions=8 ogd.max_rank=256`. Demo (tiny ViT, corrected): P = 27,576, 108 KiB per column.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ntkcl_jax.evaluate import batched_apply_seeds
from ntkcl_jax.methods.base import Features, ProgramParts, TaskEnd, TaskResult
from ntkcl_jax.methods.ntkcl import NTKCLMethod, make_cpm_feature_fn
from ntkcl_jax.models.ntkcl import NTKCL, init_params
from ntkcl_jax.train_step import make_feature_fn, make_train_step, reg_targets

Params = dict[str, Any]

# Residual directions with an eigenvalue below this share of ‖J_t‖²_F are rounding noise.
_NOISE_FLOOR = 1e-7


def with_constrained(tree: Params, constrained: Params) -> Params:
  """`tree` with its {peft/current, fusion} replaced by `constrained` (`reg_targets` layout)."""
  return {
    **tree,
    "peft": {**tree["peft"], "current": constrained["peft"]},
    "fusion": constrained["fusion"],
  }


def project_off(updates: Params, basis: jax.Array) -> Params:
  """`updates` with its {peft/current, fusion} part u replaced by u − B (Bᵀ u).

  Args:
    updates: a tree with "peft"/"current" and "fusion" (e.g. the step's update direction; other
      entries, such as the proxy head, pass through).
    basis: B (P, R) with orthonormal columns (zero columns are unused slots).
  """
  flat, unravel = ravel_pytree(reg_targets(updates))
  flat = flat - basis @ (basis.T @ flat)
  return with_constrained(updates, unravel(flat))


def tangent_features(
  features: Features, params: Params, directions: jax.Array, images: jax.Array
) -> jax.Array:
  """Rows of J: ∂(f(x_i) · u_ij)/∂θ for θ = {peft/current, fusion}, images i, directions j.

  Args:
    features: (params, images (b, H, W, C)) → (b, D), eval mode.
    params: the eval tree {backbone, peft: {current, ema}, fusion}.
    directions: (b, D, q) output directions u_ij of each image.
    images: (b, H, W, C).
  Returns:
    (b, q, P) float32; columns in `ravel_pytree(reg_targets(params))` order.
  """
  flat, unravel = ravel_pytree(reg_targets(params))

  def output(theta: jax.Array, u: jax.Array, image: jax.Array) -> jax.Array:  # (q,)
    return features(with_constrained(params, unravel(theta)), image[None])[0] @ u

  return jax.vmap(jax.jacrev(output), in_axes=(None, 0, 0))(flat, directions, images)


def extend_basis(
  basis: jax.Array, rank: jax.Array, rows: jax.Array, energy: float
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """One GPM step: adds the leading directions of the rows' residual off span(B) to B.

  Directions are the residual R = J (I − B Bᵀ)'s right singular vectors (from the eigenpairs of
  R Rᵀ), added by decreasing singular value until ‖J B'‖²_F ≥ `energy` ‖J‖²_F, at most the free
  columns of B, never below a noise floor; then orthogonalised again against B and each other
  (Cholesky QR), so B stays orthonormal to float32 rounding.

  Args:
    basis: B (P, R), orthonormal columns [0, rank), zeros after.
    rank: () int32, columns in use.
    rows: J (m, P) tangent-feature rows of the new task.
    energy: threshold ε in (0, 1].
  Returns:
    (B', rank', {"energy_before": ‖J B‖²/‖J‖², "energy_after": ‖J B'‖²/‖J‖², "added"}).
  """
  num_cols, m = basis.shape[1], rows.shape[0]
  inside = rows @ basis
  total = jnp.maximum(jnp.sum(rows**2), jnp.finfo(rows.dtype).tiny)
  kept = jnp.sum(inside**2)
  resid = rows - inside @ basis.T
  lam, vecs = jnp.linalg.eigh(resid @ resid.T)
  lam, vecs = jnp.maximum(lam[::-1], 0.0), vecs[:, ::-1]  # descending
  cum = jnp.cumsum(lam)
  need = energy * total - kept
  k = jnp.where(need > 0, jnp.sum(cum < need) + 1, 0)
  k = jnp.minimum(k, jnp.sum(lam > _NOISE_FLOOR * total))
  k = jnp.minimum(k, num_cols - rank).astype(jnp.int32)
  take = jnp.arange(m) < k
  new = resid.T @ (vecs * jnp.where(take, jax.lax.rsqrt(jnp.where(take, lam, 1.0)), 0.0))
  new = new - basis @ (basis.T @ new)
  chol = jnp.linalg.cholesky(new.T @ new + jnp.diag(jnp.where(take, 0.0, 1.0)))
  new = jax.scipy.linalg.solve_triangular(chol, new.T, lower=True).T * take
  cols = jnp.where(take, rank + jnp.arange(m), num_cols)  # unused columns: out of range, dropped
  basis = basis.at[:, cols].set(new, mode="drop")
  stats = {
    "energy_before": kept / total,
    "energy_after": (kept + jnp.sum(jnp.where(take, lam, 0.0))) / total,
    "added": k,
  }
  return basis, rank + k, stats


def output_directions(num_images: int, dim: int, q: int, seed: int, task: int) -> np.ndarray:
  """(n, D, q') output directions per image: q iid N(0, 1/q) vectors each (fixed by seed and
  task), or all D outputs (the identity, q' = D) for q = 0 or q ≥ D.

  Random directions sketch every output's tangent features: E Σ_j (J_i u_ij)(J_i u_ij)ᵀ = J_iᵀJ_i
  summed over the D outputs, so the basis follows where the Jacobian has energy, not where the
  features have variance (a frozen section of the features has variance and no Jacobian).
  """
  if q == 0 or q >= dim:
    return np.broadcast_to(np.eye(dim, dtype=np.float32), (num_images, dim, dim))
  rng = np.random.default_rng([seed, task, 7_014])
  return (rng.standard_normal((num_images, dim, q)) / np.sqrt(q)).astype(np.float32)


def sample_indices(train_indices: np.ndarray, seed: int, task: int, n: int) -> np.ndarray:
  """The task's images whose tangent features enter the basis: n drawn without replacement,
  fixed by (seed, task), in stream order."""
  rng = np.random.default_rng([seed, task, 7_013])
  take = min(n, len(train_indices))
  return np.sort(rng.choice(train_indices, take, replace=False))


def num_constrained(spec: Any) -> int:
  """P: the number of constrained parameters ({peft/current, fusion}) of the model `spec`."""
  shapes = jax.eval_shape(lambda k: init_params(spec, k), jax.random.key(0))
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(reg_targets(shapes)))


class NTKCLOGD(NTKCLMethod):
  """NTK-CL whose every update is projected off old tasks' tangent features (module docstring)."""

  @classmethod
  def check_plan(cls, plan) -> None:
    super().check_plan(plan)
    o = plan.ogd
    if plan.use_ema:
      raise ValueError(
        "method=ntkcl_ogd keeps the EMA bank fixed (an EMA blend would move old tasks' outputs "
        "outside the projected gradient); add --config.train.use_ema=False."
      )
    if o.samples < 1 or o.directions < 0 or not 0.0 < o.energy <= 1.0 or o.max_rank < 1:
      raise ValueError(
        f"ogd.samples={o.samples} (>= 1), ogd.directions={o.directions} (>= 0; 0 = all), "
        f"ogd.energy={o.energy} (in (0, 1]), ogd.max_rank={o.max_rank} (>= 1): out of range."
      )

  def init_state(self) -> dict[str, jax.Array]:
    width = num_constrained(self.spec)
    basis = jnp.zeros((width, self.plan.ogd.max_rank), jnp.float32)
    return {**super().init_state(), "ogd_basis": basis, "ogd_rank": jnp.int32(0)}

  @property
  def step_state(self) -> tuple[str, ...]:
    return ("ogd_basis",)

  def train_step(self, model: NTKCL, tx) -> Callable[..., Any]:
    return make_train_step(
      model,
      self.plan.loss_weights,
      tx,
      self.plan.batch_size,
      constrain=lambda updates, aux: project_off(updates, aux["ogd_basis"]),
    )

  def output_fn(self, model: NTKCL) -> Features:
    """The classified feature whose tangent features enter the basis: (b, D) or (b, 3D)."""
    return make_cpm_feature_fn(model) if self.classifies_cpm else make_feature_fn(model)

  def programs(self, parts: ProgramParts) -> dict[str, Callable[..., Any]]:
    output = self.output_fn(parts.model)
    energy = self.plan.ogd.energy

    def tangents(params, directions, images):
      return tangent_features(output, params, directions, images)

    return {
      **super().programs(parts),
      "ogd_tangents": parts.jit(parts.stack.vmap(tangents, (parts.param_axes, 0, 0))),
      "ogd_extend": parts.jit(
        parts.stack.vmap(lambda b, r, j: extend_basis(b, r, j, energy), (0, 0, 0))
      ),
    }

  def ema_after_task(self, ema: Any, current: Any, task: int, last: bool) -> Any:
    return ema

  def end_of_task(self, end: TaskEnd) -> TaskResult:
    result = super().end_of_task(end)
    state, stack = end.state, end.stack
    if end.last:  # no later task reads the basis
      ranks = stack.host(state["ogd_rank"])
      info = [{"ogd_rank": int(r)} for r in ranks]
      return TaskResult(result.state, result.predict, _merge(result.stage_info, info))
    o, extra = self.plan.ogd, end.programs.extra
    samples = [
      sample_indices(st.train_indices(end.task), seed, end.task, o.samples)
      for st, seed in zip(end.streams, self.plan.seeds)
    ]
    dim = self.classified_width
    directions = [
      output_directions(len(idx), dim, o.directions, seed, end.task)
      for idx, seed in zip(samples, self.plan.seeds)
    ]
    q = directions[0].shape[-1]
    data = stack.mesh.shape["data"]
    chunk = max(data, self.plan.eval_batch_size // q // data * data)
    rows = []
    for start in range(0, max(map(len, samples)), chunk):  # images (and their directions) in chunks
      part = [idx[start : start + chunk] for idx in samples]
      dirs = stack.put(stack.stack([_padded(d[start : start + chunk], chunk) for d in directions]))
      rows.append(
        batched_apply_seeds(
          lambda x, dirs=dirs: extra["ogd_tangents"](end.params, dirs, x),
          end.streams,
          part,
          "train",
          chunk,
          stack,
        )
      )
    width = state["ogd_basis"].shape[-2]  # P
    per_seed = [
      np.concatenate([r[i][0] for r in rows]).reshape(-1, width) for i in range(stack.size)
    ]
    rows = stack.put(stack.stack(per_seed))  # (n·q, P) per seed
    basis, rank, stats = extra["ogd_extend"](state["ogd_basis"], state["ogd_rank"], rows)
    info = [
      {
        "ogd_rank": int(r),
        "ogd_added": int(s["added"]),
        "ogd_energy_before": float(s["energy_before"]),
        "ogd_energy_after": float(s["energy_after"]),
      }
      for r, s in zip(stack.host(rank), stack.host(stats))
    ]
    return TaskResult(
      {**result.state, "ogd_basis": basis, "ogd_rank": rank},
      result.predict,
      _merge(result.stage_info, info),
    )


def _merge(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[dict[str, Any]]:
  return [{**x, **y} for x, y in zip(a, b)]


def _padded(directions: np.ndarray, rows: int) -> np.ndarray:
  """`directions` (b, D, q) padded with zeros to `rows` images (the padded batch's rows)."""
  pad = rows - directions.shape[0]
  return np.concatenate([directions, np.zeros((pad, *directions.shape[1:]), directions.dtype)])
