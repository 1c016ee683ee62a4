"""NTK-CL training objective (SPEC 2.1): arrays and plain values in, scalars out.

  L = CE(head(c)) + CE(head(p)) + CE(head(m)) + s_MI·λ_MI·L_MI + λ_orth·L_orth + λ_reg·L_reg

All terms respect a validity mask over the (static-shape, padded) batch, and are defined on the
global batch: data parallelism never changes their value.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ntkcl_jax.models.heads import l2_normalize

# L_reg acts on "weight" tensors only (biases and LN β excluded), SPEC 2.1.
REG_WEIGHT_PATTERN = re.compile(
  r"(^|/)((adapter_\d+/(down|up))|(prompt_\d+/mix))/kernel$|(^|/)prompt_\d+/norm/scale$"
  r"|(^|/)fusion/(query|key|value)/kernel$"
)
_NEG_INF_SAFE = -1e30  # finite stand-in for -inf inside log-sum-exp (keeps gradients finite)


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Weights and switches of the objective (SPEC 2.1, 2.6, quirks Q3, Q4, Q7).

  Attributes:
    mi: λ_MI (`nce_temp`: 0.03 for CIFAR-100, 0.2 elsewhere).
    mi_sign: s_MI, -1 as released (Q3: the contrastive loss is maximised) or +1.
    orth: λ_orth = 1e-4.
    reg: λ_reg = 1e-3.
    tau: temperature of L_MI, 0.1.
    orth_loss: "signed_residual_sum" (Q4 reference) or "old_subspace_projection".
    zero_nonfinite_aux: Q7 reference: non-finite L_MI / L_orth / L_reg become 0 silently.
    use_ce: which cross-entropies enter ("c", "p", "m" for model_name="both").
  """

  mi: float = 0.2
  mi_sign: int = -1
  orth: float = 1e-4
  reg: float = 1e-3
  tau: float = 0.1
  orth_loss: str = "signed_residual_sum"
  zero_nonfinite_aux: bool = True
  use_ce: tuple[str, ...] = ("c", "p", "m")


def masked_cross_entropy(
  logits: jax.Array,
  labels: jax.Array,
  mask: jax.Array,
  num_classes: jax.Array | int | None = None,
) -> jax.Array:
  """Mean softmax cross-entropy over valid rows (and, optionally, the first classes only).

  Args:
    logits: (B, K). labels: (B,) ints in [0, K). mask: (B,) bool, False on padding rows.
    num_classes: if given, only columns < num_classes take part in the softmax (a head padded to
      a static width K ≥ s_t, so one compiled step serves tasks of different sizes).
  Returns:
    Scalar: Σ_valid CE / max(n_valid, 1).
  """
  chex.assert_rank(logits, 2)
  chex.assert_shape([labels, mask], (logits.shape[0],))
  logits = logits.astype(jnp.float32)
  if num_classes is not None:
    logits = jnp.where(jnp.arange(logits.shape[1]) < num_classes, logits, _NEG_INF_SAFE)
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=1)[:, 0]
  mask = mask.astype(jnp.float32)
  return jnp.sum(nll * mask) / jnp.maximum(mask.sum(), 1.0)


def mi_old_rows(num_seen: int, task_start: int, increment: int, *, known_only: bool) -> int:
  """n_old, the prototype rows L_MI may sample (SPEC 2.1, Q11).

  Reference: all rows but the last `increment` (at Oxford Pets task 0 that includes 2 zero rows of
  current classes); `known_only`: rows < k_t, the classes of earlier tasks.
  """
  return task_start if known_only else max(num_seen - increment, 0)


def select_mi_prototypes(
  key: jax.Array, prototypes: jax.Array, n_old: jax.Array | int, max_rows: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A uniformly random subset of min(max_rows, n_old) of the first n_old prototype rows.

  Equivalent to the reference's `randperm(n_old)[:min(B, n_old)]`, written with static shapes so
  that one compiled step serves every task: rows past the subset are returned with valid=False.

  Args:
    key: PRNG key for this step. prototypes: (C, D), rows ≥ C_seen zero.
    n_old: rows eligible (traced or static int). max_rows: static M_max = min(B, C).
  Returns:
    (M_max, D) rows, their (M_max,) global labels and a (M_max,) validity mask.
  """
  c = prototypes.shape[0]
  order = jnp.where(jnp.arange(c) < n_old, jax.random.uniform(key, (c,)), 2.0)
  idx = jnp.argsort(order)[:max_rows].astype(jnp.int32)
  valid = jnp.arange(max_rows) < jnp.minimum(max_rows, n_old)
  return prototypes[idx], idx, valid


def fixed_mi_prototypes(
  prototypes: jax.Array, rows: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A given set of old prototype rows for L_MI, instead of `select_mi_prototypes`' draw.

  For verifiers that must reproduce another implementation's draw (the official step's
  `torch.randperm(n_old)[:B]`, `experiments/parity`) or hold the subset fixed across a run.

  Args:
    prototypes: (C, D). rows: (M,) int row indices (= global labels); negative entries are unused.
  Returns:
    (M, D) rows (unused ones zero), their (M,) labels, (M,) validity mask.
  """
  rows = jnp.asarray(rows, jnp.int32)
  valid = rows >= 0
  idx = jnp.where(valid, rows, 0)
  return jnp.where(valid[:, None], prototypes[idx], 0.0), idx, valid


def mi_loss(
  features: jax.Array,
  labels: jax.Array,
  mask: jax.Array,
  proto_rows: jax.Array,
  proto_labels: jax.Array,
  proto_mask: jax.Array,
  tau: float,
) -> tuple[jax.Array, jax.Array]:
  """Contrastive term L_MI with old prototypes (SPEC 2.1), as released.

  Z = row-normalise([m_1..m_b; μ_1..μ_M]) with labels [y; k], N = b + M, S = ZZᵀ/τ,
  Pos = {(i, j): i ≠ j, same label}:
    L_MI = −log Σ_{(i,j)∈Pos} exp(S_ij) + (1/N) Σ_i log Σ_{j≠i} exp(S_ij).
  The positive part is one global log-sum-exp; negatives include positives. Padding rows (mask
  False) take no part.

  Args:
    features: (B, D) fused features m. labels: (B,) global labels. mask: (B,) bool.
    proto_rows: (M, D) old prototypes (constants). proto_labels: (M,) their labels.
    proto_mask: (M,) bool, False on unused rows. tau: temperature.
  Returns:
    (L_MI, has_positive). With an empty Pos the released value is +∞; here L_MI is returned as an
    exact 0 and `has_positive` False, computed without any inf/NaN so gradients stay finite.
  """
  chex.assert_rank([features, proto_rows], 2)
  z = l2_normalize(
    jnp.concatenate([features.astype(jnp.float32), jax.lax.stop_gradient(proto_rows)], 0)
  )
  lab = jnp.concatenate([labels.astype(jnp.int32), proto_labels.astype(jnp.int32)])
  valid = jnp.concatenate([mask, proto_mask])
  n = z.shape[0]
  sim = (z @ z.T) / tau
  pair = valid[:, None] & valid[None, :] & ~jnp.eye(n, dtype=bool)
  pos = pair & (lab[:, None] == lab[None, :])
  has_pos = jnp.any(pos)
  pos_lse = jax.nn.logsumexp(jnp.where(pos, sim, _NEG_INF_SAFE))
  row_lse = jax.nn.logsumexp(jnp.where(pair, sim, _NEG_INF_SAFE), axis=1)
  n_valid = jnp.maximum(valid.sum(), 1)
  neg = jnp.sum(jnp.where(valid, row_lse, 0.0)) / n_valid
  return jnp.where(has_pos, neg - pos_lse, 0.0), has_pos


def orthogonality_basis(prototypes: np.ndarray, k: int = 40) -> np.ndarray:
  """U_k for the released L_orth (Q4 reference): first k left singular vectors of the
  column-normalised Wᵀ (D, C_seen), W = the whole prototype matrix incl. current zero rows.

  Below rank k the full SVD's completion vectors are arbitrary (SPEC 2.1). Computed once per task
  on the host (the prototypes are constant within a task), float64.

  Returns:
    (D, k) float32.
  """
  w = np.asarray(prototypes, np.float64)
  norms = np.sqrt(np.maximum((w * w).sum(1, keepdims=True), 1e-24))
  u, _, _ = np.linalg.svd((w / norms).T, full_matrices=True)
  return u[:, :k].astype(np.float32)


def old_subspace_basis(prototypes: np.ndarray, task_start: int, k: int = 40) -> np.ndarray:
  """U_r for `orth_loss='old_subspace_projection'` (Q4 corrected), zero-padded to (D, k).

  Left singular vectors of the normalised old prototypes (rows < k_t) with σ > 1e-6·σ_max, r ≤ k.
  All zeros at task 0 (so the term is 0).
  """
  w = np.asarray(prototypes, np.float64)[:task_start]
  basis = np.zeros((np.shape(prototypes)[1], k), np.float32)
  if task_start == 0:
    return basis
  w = w / np.sqrt(np.maximum((w * w).sum(1, keepdims=True), 1e-24))
  u, s, _ = np.linalg.svd(w.T, full_matrices=False)
  r = min(k, int((s > 1e-6 * s.max()).sum())) if s.size and s.max() > 0 else 0
  basis[:, :r] = u[:, :r]
  return basis


def orth_loss(features: list[jax.Array], mask: jax.Array, basis: jax.Array, kind: str) -> jax.Array:
  """L_orth over the branches in `features` (c and p, not m), valid rows only (SPEC 2.1, Q4).

  Args:
    features: list of (B, D) arrays. mask: (B,) bool. basis: (D, k), a constant.
    kind: "signed_residual_sum": Σ_{i,d} [x̂_i − x̂_i U Uᵀ]_d (a signed, linear sum, as released);
      "old_subspace_projection": (1/b) Σ_i ‖x̂_i U Uᵀ‖² (U zero-padded, so padding adds 0).
  """
  basis = jax.lax.stop_gradient(basis.astype(jnp.float32))
  m = mask.astype(jnp.float32)[:, None]
  total = jnp.zeros((), jnp.float32)
  for x in features:
    xh = l2_normalize(x.astype(jnp.float32))
    proj = (xh @ basis) @ basis.T
    if kind == "signed_residual_sum":
      total = total + jnp.sum((xh - proj) * m)
    elif kind == "old_subspace_projection":
      total = total + jnp.sum(jnp.square(proj) * m) / jnp.maximum(m.sum(), 1.0)
    else:
      raise ValueError(f"orth_loss={kind!r}; valid: signed_residual_sum, old_subspace_projection.")
  return total


def _flat_items(tree: Mapping[str, Any], prefix: str = ""):
  for k, v in tree.items():
    path = f"{prefix}/{k}" if prefix else k
    if isinstance(v, Mapping):
      yield from _flat_items(v, path)
    else:
      yield path, v


def reg_loss(params: Mapping[str, Any], snapshot: Mapping[str, Any]) -> jax.Array:
  """L_reg = Σ‖θ − θ_snap‖² over weight tensors (SPEC 2.1).

  Args:
    params, snapshot: trees with the same layout, e.g. {"peft": current bank, "fusion": ...};
      leaves are selected by `REG_WEIGHT_PATTERN` on their `/`-joined paths.
  """
  snap = dict(_flat_items(snapshot))
  total = jnp.zeros((), jnp.float32)
  for path, value in _flat_items(params):
    if REG_WEIGHT_PATTERN.search(path):
      total = total + jnp.sum(jnp.square(value - jax.lax.stop_gradient(snap[path])))
  return total


def combine(terms: dict[str, jax.Array], weights: LossWeights) -> jax.Array:
  """Total loss from named terms: Σ CE + s_MI·λ_MI·L_MI + λ_orth·L_orth + λ_reg·L_reg.

  With `zero_nonfinite_aux` (Q7 reference) a non-finite auxiliary term counts as 0, silently; the
  caller inspects `terms` to raise otherwise (the CE terms are never masked).
  """
  aux = {"mi": weights.mi_sign * weights.mi, "orth": weights.orth, "reg": weights.reg}
  total = sum(terms[f"ce_{b}"] for b in weights.use_ce)
  for name, w in aux.items():
    if name not in terms or w == 0:
      continue
    value = terms[name]
    if weights.zero_nonfinite_aux:
      value = jnp.where(jnp.isfinite(value), value, 0.0)
    total = total + w * value
  return total
