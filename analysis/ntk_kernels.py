"""Axes, shapes and the two native kernel implementations of `analysis.ntk` (SPEC 7.1, 7.2).

Internal to `analysis.ntk.empirical_ntk_fn` (conventions in its module docstring): canonical
trace/diagonal axes and the einsum labels of the output layout, then implementation 1 (Jacobian
contraction) and 2 (NTK-vector products), both traceable and called inside `jax.jit`.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
ApplyFn = Callable[..., jax.Array]
Axes = int | Sequence[int]
VMapAxes = None | int | tuple[Any, Any, Mapping[str, Any]]
NtkFn = Callable[..., jax.Array]

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# Axes and shapes
# ----------------------------------------------------------------------------------------------


def _axes_tuple(axes: Axes, name: str) -> tuple[int, ...]:
  if isinstance(axes, (int, np.integer)):
    return (int(axes),)
  try:
    return tuple(int(a) for a in axes)
  except TypeError as e:
    raise ValueError(f"{name} must be an int or a sequence of ints; got {axes!r}.") from e


def _check_axes_disjoint(trace_axes: Axes, diagonal_axes: Axes) -> None:
  """Early check of literally equal axes; overlaps like (-1,) vs (1,) are caught at call time."""
  trace, diag = _axes_tuple(trace_axes, "trace_axes"), _axes_tuple(diagonal_axes, "diagonal_axes")
  if set(trace) & set(diag):
    raise ValueError(f"trace_axes {trace} and diagonal_axes {diag} overlap.")


def _canonical(axes: Axes, ndim: int, name: str) -> tuple[int, ...]:
  out = []
  for a in _axes_tuple(axes, name):
    if not -ndim <= a < ndim:
      raise ValueError(f"{name} contains axis {a}, out of range for an output with {ndim} dims.")
    out.append(a % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"{name} {tuple(axes)} names an axis twice (output has {ndim} dims).")
  return tuple(sorted(out))


def _canonical_trace_diag(
  trace_axes: Axes, diagonal_axes: Axes, fx1_shape: tuple, fx2_shape: tuple
) -> tuple[tuple[int, ...], tuple[int, ...]]:
  if len(fx1_shape) != len(fx2_shape):
    raise ValueError(
      f"f(x1) and f(x2) must have the same number of dims; got {fx1_shape} and {fx2_shape}."
    )
  ndim = len(fx1_shape)
  trace = _canonical(trace_axes, ndim, "trace_axes")
  diag = _canonical(diagonal_axes, ndim, "diagonal_axes")
  if set(trace) & set(diag):
    raise ValueError(f"trace_axes {trace} and diagonal_axes {diag} overlap (output dims {ndim}).")
  for i in trace + diag:
    if fx1_shape[i] != fx2_shape[i]:
      raise ValueError(
        f"f(x1) {fx1_shape} and f(x2) {fx2_shape} differ on axis {i}, which is traced or "
        "diagonal; those axes must have equal sizes."
      )
  return trace, diag


def _kernel_labels(
  ndim: int, trace: tuple[int, ...], diag: tuple[int, ...]
) -> tuple[list[int], list[int], list[int]]:
  """einsum labels of f(x1) axes, f(x2) axes and the kernel (neural-tangents order)."""
  labels1, labels2, out = list(range(ndim)), list(range(ndim, 2 * ndim)), []
  for i in range(ndim):
    if i in trace:
      labels2[i] = labels1[i]
    elif i in diag:
      labels2[i] = labels1[i]
      out.append(labels1[i])
    else:
      out += [labels1[i], labels2[i]]
  return labels1, labels2, out


def _pair_swap_perm(ndim: int, trace: tuple[int, ...], diag: tuple[int, ...]) -> list[int]:
  """Axis permutation mapping Θ(a, b) to Θ(b, a): swaps each (x1, x2) axis pair."""
  labels1, labels2, out = _kernel_labels(ndim, trace, diag)
  perm = list(range(len(out)))
  for i in range(ndim):
    if i not in trace and i not in diag:
      p1, p2 = out.index(labels1[i]), out.index(labels2[i])
      perm[p1], perm[p2] = p2, p1
  return perm


def _vmap_triple(vmap_axes: VMapAxes) -> tuple[Any, int, dict[str, int]] | None:
  if vmap_axes is None:
    return None
  if isinstance(vmap_axes, tuple) and len(vmap_axes) == 3:
    in_axes, out_axes, kw_axes = vmap_axes
  else:
    in_axes, out_axes, kw_axes = vmap_axes, vmap_axes, {}
  kw_axes = dict(kw_axes or {})
  if in_axes is None and not kw_axes:
    return None
  if not isinstance(out_axes, (int, np.integer)) or isinstance(out_axes, bool):
    raise ValueError(
      f"vmap_axes: the output axis must be an int (f returns one array); got {out_axes!r}."
    )
  return in_axes, int(out_axes), kw_axes


# ----------------------------------------------------------------------------------------------
# Kernel implementations (traceable; called inside jax.jit)
# ----------------------------------------------------------------------------------------------


def _split_pair_kwargs(kwargs: Mapping[str, Any]) -> tuple[dict, dict]:
  kw1, kw2 = {}, {}
  for k, v in kwargs.items():
    if isinstance(v, tuple) and len(v) == 2:
      kw1[k], kw2[k] = v
    else:
      kw1[k] = kw2[k] = v
  return kw1, kw2


def _promote_params(params: PyTree) -> PyTree:
  def promote(path, leaf):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f"Parameter leaf {jax.tree_util.keystr(path)} has dtype {dtype}; every differentiated "
        "leaf must be floating. Close non-trainable state over in f, or select the trainable "
        "sub-tree with restrict_to_subtree."
      )
    return jnp.asarray(leaf, jnp.float32) if jnp.finfo(dtype).bits < 32 else leaf

  return jax.tree_util.tree_map_with_path(promote, params)


def _output_struct(f: ApplyFn, params: PyTree, x: PyTree, kwargs: Mapping[str, Any], which: str):
  out = jax.eval_shape(lambda p, xx: f(p, xx, **kwargs), params, x)
  if not isinstance(out, jax.ShapeDtypeStruct):
    n = len(jax.tree.leaves(out))
    raise TypeError(
      f"f({which}) returned a pytree with {n} leaves; the native backend needs a single array. "
      "Concatenate the outputs inside f, or compute one kernel per output."
    )
  return out


def _expand(x: PyTree, in_axes: Any) -> PyTree:
  """Re-inserts the size-1 batch axis that jax.vmap removed (so f sees a batch of one)."""
  if in_axes is None:
    return x
  if isinstance(in_axes, (int, np.integer)):
    return jax.tree.map(lambda leaf: jnp.expand_dims(leaf, int(in_axes) % (leaf.ndim + 1)), x)
  return jax.tree.map(
    lambda a, leaf: leaf if a is None else jnp.expand_dims(leaf, int(a) % (leaf.ndim + 1)),
    in_axes,
    x,
    is_leaf=lambda a: a is None,
  )


def _per_example(f, triple, out_axis, kw_static):
  """Returns g(params, x_i, kw_batched_i): f on one example, batch axis squeezed out."""
  in_axes, _, kw_axes = triple

  def g(params, x_i, kw_batched):
    kw = dict(kw_static)
    kw.update({k: _expand(v, kw_axes[k]) for k, v in kw_batched.items()})
    out = f(params, _expand(x_i, in_axes), **kw)
    if out.ndim <= out_axis or out.shape[out_axis] != 1:
      raise ValueError(
        f"vmap_axes: f on a single example returned shape {out.shape}, expected size 1 on output "
        f"axis {out_axis}. Examples interact, or a per-example keyword argument is missing from "
        "kwargs_axes (vmap_axes=(in_axes, out_axes, {name: axis})); otherwise use vmap_axes=None."
      )
    return jnp.squeeze(out, out_axis)

  return g


def _split_batched(kwargs: Mapping[str, Any], kw_axes: Mapping[str, Any]) -> tuple[dict, dict]:
  batched = {k: v for k, v in kwargs.items() if k in kw_axes and kw_axes[k] is not None}
  static = {k: v for k, v in kwargs.items() if k not in batched}
  return batched, static


def _prepare(f, trace_axes, diagonal_axes, triple, x1, x2, params, kwargs):
  params = _promote_params(params)
  kw1, kw2 = _split_pair_kwargs(kwargs)
  if x2 is None:
    kw2 = kw1
  fx1 = _output_struct(f, params, x1, kw1, "x1")
  fx2 = fx1 if x2 is None else _output_struct(f, params, x2, kw2, "x2")
  trace, diag = _canonical_trace_diag(trace_axes, diagonal_axes, fx1.shape, fx2.shape)
  out_axis = None if triple is None else triple[1] % len(fx1.shape)
  size = math.prod(fx1.shape[i] for i in trace)
  return params, kw1, kw2, fx1, fx2, trace, diag, out_axis, size


def _jacobian_contraction(f, trace_axes, diagonal_axes, triple, x1, x2, params, **kwargs):
  """Implementation 1: Θ = Σ_leaves J(x1) J(x2)ᵀ from reverse-mode Jacobians."""
  params, kw1, kw2, fx1, _, trace, diag, out_axis, size = _prepare(
    f, trace_axes, diagonal_axes, triple, x1, x2, params, kwargs
  )
  ndim = len(fx1.shape)

  def jacobian(x, kw):
    if triple is None:
      return jax.jacrev(lambda p: f(p, x, **kw))(params)
    in_axes, _, kw_axes = triple
    batched, static = _split_batched(kw, kw_axes)
    g = _per_example(f, triple, out_axis, static)
    j_one = lambda x_i, kw_i: jax.jacrev(g)(params, x_i, kw_i)  # noqa: E731
    kw_in = {k: kw_axes[k] for k in batched}
    return jax.vmap(j_one, in_axes=(in_axes, kw_in), out_axes=out_axis)(x, batched)

  j1 = jacobian(x1, kw1)
  j2 = j1 if x2 is None else jacobian(x2, kw2)
  labels1, labels2, out = _kernel_labels(ndim, trace, diag)

  def contract(a, b):
    p = list(range(2 * ndim, 2 * ndim + a.ndim - ndim))
    return jnp.einsum(a, labels1 + p, b, labels2 + p, out, precision=_HIGHEST)

  terms = jax.tree.leaves(jax.tree.map(contract, j1, j2))
  if not terms:
    raise ValueError("params has no leaves: there is nothing to differentiate.")
  return functools.reduce(operator.add, terms) / size


def _ntvp_full(f1, f2, params, fx1_shape, fx2_shape, dtype):
  """Full Θ of shape fx1_shape + fx2_shape: VJP at x2, vmapped JVP at x1 per basis vector."""
  _, vjp2 = jax.vjp(f2, params)
  n2 = math.prod(fx2_shape)
  basis = jnp.eye(n2, dtype=dtype).reshape((n2, *fx2_shape))

  def column(cotangent):
    (tangent,) = vjp2(cotangent)
    return jax.jvp(f1, (params,), (tangent,))[1]

  cols = jax.vmap(column)(basis).reshape(tuple(fx2_shape) + tuple(fx1_shape))
  nd1, nd2 = len(fx1_shape), len(fx2_shape)
  return jnp.transpose(cols, list(range(nd2, nd2 + nd1)) + list(range(nd2)))


def _ntk_vector_products(f, trace_axes, diagonal_axes, triple, x1, x2, params, **kwargs):
  """Implementation 2: columns Θ·e_j from a VJP at x2 and a JVP at x1; then trace/diagonal."""
  params, kw1, kw2, fx1, fx2, trace, diag, out_axis, size = _prepare(
    f, trace_axes, diagonal_axes, triple, x1, x2, params, kwargs
  )
  ndim = len(fx1.shape)
  if triple is None:
    f1 = lambda p: f(p, x1, **kw1)  # noqa: E731
    f2 = f1 if x2 is None else (lambda p: f(p, x2, **kw2))
    full = _ntvp_full(f1, f2, params, fx1.shape, fx2.shape, fx2.dtype)
  else:
    in_axes, _, kw_axes = triple
    batched1, static1 = _split_batched(kw1, kw_axes)
    batched2, static2 = _split_batched(kw2, kw_axes)
    g1 = _per_example(f, triple, out_axis, static1)
    g2 = _per_example(f, triple, out_axis, static2)
    ex_shape = tuple(s for i, s in enumerate(fx1.shape) if i != out_axis)
    ex_shape2 = tuple(s for i, s in enumerate(fx2.shape) if i != out_axis)

    def pair(x1_i, x2_j, kw1_i, kw2_j):
      return _ntvp_full(
        lambda p: g1(p, x1_i, kw1_i),
        lambda p: g2(p, x2_j, kw2_j),
        params,
        ex_shape,
        ex_shape2,
        fx2.dtype,
      )

    kw_in1 = {k: kw_axes[k] for k in batched1}
    kw_in2 = {k: kw_axes[k] for k in batched2}
    inner = jax.vmap(pair, in_axes=(in_axes, None, kw_in1, None), out_axes=out_axis)
    outer = jax.vmap(inner, in_axes=(None, in_axes, None, kw_in2), out_axes=out_axis + ndim)
    full = outer(x1, x1 if x2 is None else x2, batched1, batched2)
  labels1, labels2, out = _kernel_labels(ndim, trace, diag)
  return jnp.einsum(full, labels1 + labels2, out) / size
