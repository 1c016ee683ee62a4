"""How `analysis.ntk.empirical_ntk_fn` runs a kernel: jit, AUTO, blocking, neural-tangents.

Internal to `analysis.ntk`: `jax.jit` with static non-array keyword values, implementation 0 (AUTO:
fewest XLA flops per input signature), `batch_size` blocking of the kernel, and the
`backend="neural_tangents"` path through `analysis.nt_compat`.
"""

from __future__ import annotations

import functools
import operator
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from analysis.ntk_kernels import (
  NtkFn,
  PyTree,
  _canonical_trace_diag,
  _output_struct,
  _pair_swap_perm,
  _split_pair_kwargs,
)

# ----------------------------------------------------------------------------------------------
# jit with static keyword values, AUTO selection, blocking
# ----------------------------------------------------------------------------------------------


class _Dynamic:
  """Marks an array leaf of the keyword arguments (passed to jit as a runtime argument)."""

  def __repr__(self) -> str:
    return "<array>"


_DYNAMIC = _Dynamic()


def _is_array(x: Any) -> bool:
  """An array argument (a `jax.ShapeDtypeStruct` too: `lower` on abstract inputs)."""
  return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def _partition_kwargs(kwargs: Mapping[str, Any]) -> tuple[list, tuple]:
  leaves, treedef = jax.tree_util.tree_flatten(dict(kwargs), is_leaf=lambda v: v is None)
  dynamic, static = [], []
  for leaf in leaves:
    if _is_array(leaf):
      dynamic.append(leaf)
      static.append(_DYNAMIC)
    else:
      try:
        hash(leaf)
      except TypeError as e:
        raise TypeError(
          f"Keyword argument value {leaf!r} of type {type(leaf).__name__} is neither an array nor "
          "hashable; ntk_fn passes non-array keyword values to f as static (compile-time) values."
        ) from e
      static.append(leaf)
  return dynamic, (treedef, tuple(static))


def _merge_kwargs(dynamic: Sequence, static_spec: tuple) -> dict:
  treedef, static = static_spec
  it = iter(dynamic)
  leaves = [next(it) if s is _DYNAMIC else s for s in static]
  return jax.tree_util.tree_unflatten(treedef, leaves)


class _JittedKernel:
  """`fn(x1, x2, params, **kwargs)` under jax.jit, array keyword leaves dynamic, others static."""

  def __init__(self, fn: Callable[..., jax.Array]):
    self._fn = fn
    self._jitted = jax.jit(self._call, static_argnums=(4,))

  def _call(self, x1, x2, params, dynamic, static_spec):
    with jax.default_matmul_precision("highest"):  # float32 Jacobians, also on TF32-capable GPUs
      return self._fn(x1, x2, params, **_merge_kwargs(dynamic, static_spec))

  def __call__(self, x1, x2, params, **kwargs):
    dynamic, static_spec = _partition_kwargs(kwargs)
    return self._jitted(x1, x2, params, dynamic, static_spec)

  def lower(self, x1, x2, params, **kwargs) -> jax.stages.Lowered:
    """The kernel lowered for these inputs (arrays or `jax.ShapeDtypeStruct`s, which may carry a
    sharding on devices this process does not have: `ntkcl_jax.preflight`)."""
    dynamic, static_spec = _partition_kwargs(kwargs)
    return self._jitted.lower(x1, x2, params, dynamic, static_spec)

  def flops(self, x1, x2, params, **kwargs) -> float | None:
    """XLA's flop count for these input shapes (None when the backend reports none)."""
    dynamic, static_spec = _partition_kwargs(kwargs)
    abstract = _abstract((x1, x2, params, dynamic))
    compiled = self._jitted.lower(*abstract, static_spec).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per computation
      analysis = analysis[0] if analysis else None
    flops = None if analysis is None else analysis.get("flops")
    return None if flops is None or flops < 0 else float(flops)


def _jit_with_static_kwargs(fn: Callable[..., jax.Array]) -> _JittedKernel:
  return _JittedKernel(fn)


def _abstract(tree: PyTree) -> PyTree:
  return jax.tree.map(
    lambda leaf: jax.ShapeDtypeStruct(jnp.shape(leaf), jnp.result_type(leaf)), tree
  )


def _signature(x1, x2, params, kwargs) -> Hashable:
  dynamic, static_spec = _partition_kwargs(kwargs)
  abstract = _abstract((x1, x2, params, dynamic))
  leaves, treedef = jax.tree_util.tree_flatten(abstract)
  return treedef, tuple((s.shape, str(s.dtype)) for s in leaves), static_spec


class _AutoSelector:
  """Implementation 0: per input signature, the candidate with the fewest XLA flops."""

  def __init__(self, candidates: Mapping[int, Any]):
    self._candidates = dict(candidates)
    self._choice: dict[Hashable, int] = {}
    self.flops: dict[Hashable, dict[int, float | None]] = {}

  def select(self, x1, x2, params, **kwargs) -> int:
    """The implementation AUTO uses for these inputs (compiles each candidate once)."""
    key = _signature(x1, x2, params, kwargs)
    if key not in self._choice:
      flops: dict[int, float | None] = {}
      errors = {}
      for impl, candidate in self._candidates.items():
        try:
          flops[impl] = candidate.flops(x1, x2, params, **kwargs)
        except Exception as e:  # a candidate that cannot compile here is skipped
          errors[impl] = e
      usable = {i: v for i, v in flops.items() if v is not None}
      if usable:
        choice = min(sorted(usable), key=lambda i: usable[i])
      elif flops:
        choice = min(flops)
        warnings.warn(
          f"XLA reported no flop counts; AUTO falls back to implementation {choice}.",
          stacklevel=3,
        )
      else:
        raise RuntimeError(
          f"AUTO: no implementation compiled for these inputs: {errors}."
        ) from next(iter(errors.values()))
      self._choice[key] = choice
      self.flops[key] = flops
    return self._choice[key]

  def __call__(self, x1, x2, params, **kwargs):
    impl = self.select(x1, x2, params, **kwargs)
    return self._candidates[impl](x1, x2, params, **kwargs)


def _named(fn: Callable, name: str) -> Callable:
  def ntk_fn(x1: PyTree, x2: PyTree | None, params: PyTree, **kwargs) -> jax.Array:
    return fn(x1, x2, params, **kwargs)

  ntk_fn.__name__ = ntk_fn.__qualname__ = name
  ntk_fn.__doc__ = (
    "Empirical NTK Θ(x1, x2) of f w.r.t. params; x2=None means x1. Shapes and conventions: "
    "see analysis.ntk.empirical_ntk_fn."
  )
  return ntk_fn


def _leading_size(x: PyTree, name: str) -> int:
  sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(x)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(
      f"batch_size blocks axis 0 of every leaf of {name}; its leaves have leading sizes "
      f"{sorted(sizes, key=str)}. They must all share one leading (example) axis."
    )
  return int(next(iter(sizes)))


def _blocked(block_fn, f, batch_size, trace_axes, diagonal_axes) -> NtkFn:
  def ntk_fn(x1: PyTree, x2: PyTree | None, params: PyTree, **kwargs) -> jax.Array:
    n1 = _leading_size(x1, "x1")
    n2 = n1 if x2 is None else _leading_size(x2, "x2")
    kw1, kw2 = _split_pair_kwargs(kwargs)
    fx1 = _output_struct(f, params, x1, kw1, "x1")
    fx2 = fx1 if x2 is None else _output_struct(f, params, x2, kw2, "x2")
    trace, diag = _canonical_trace_diag(trace_axes, diagonal_axes, fx1.shape, fx2.shape)
    if fx1.shape[0] != n1 or fx2.shape[0] != n2:
      raise ValueError(
        f"batch_size assumes output axis 0 of f is the example axis of x; f(x1) is {fx1.shape} "
        f"for {n1} examples and f(x2) is {fx2.shape} for {n2}."
      )
    per_example = {
      k
      for k, v in kwargs.items()
      if isinstance(v, tuple)
      and len(v) == 2
      and all(_is_array(u) and jnp.ndim(u) > 0 for u in v)
      and jnp.shape(v[0])[0] == n1
      and jnp.shape(v[1])[0] == n2
    }
    x2_src = x1 if x2 is None else x2
    side2 = 0 if x2 is None else 1  # with x2=None, f(x2) uses the x1 keyword values
    bounds1 = [(s, min(s + batch_size, n1)) for s in range(0, n1, batch_size)]
    bounds2 = [(s, min(s + batch_size, n2)) for s in range(0, n2, batch_size)]

    def take(tree, bounds):
      s, e = bounds
      return jax.tree.map(lambda leaf: leaf[s:e], tree)

    def block(i: int, j: int) -> jax.Array:
      xa = take(x1, bounds1[i])
      same = x2 is None and i == j
      xb = None if same else take(x2_src, bounds2[j])
      kw = {
        k: (take(v[0], bounds1[i]), take(v[side2], bounds2[j])) if k in per_example else v
        for k, v in kwargs.items()
      }
      return block_fn(xa, xb, params, **kw)

    ndim = len(fx1.shape)
    if 0 in diag or 0 in trace:
      diagonal_blocks = [block(i, i) for i in range(len(bounds1))]
      if 0 in diag:
        return jnp.concatenate(diagonal_blocks, axis=0)
      weights = [(e - s) / n1 for s, e in bounds1]
      return functools.reduce(operator.add, [w * b for w, b in zip(weights, diagonal_blocks)])
    perm = _pair_swap_perm(ndim, trace, diag)
    grid: dict[tuple[int, int], jax.Array] = {}
    for i in range(len(bounds1)):
      for j in range(len(bounds2)):
        if x2 is None and j < i:
          grid[i, j] = jnp.transpose(grid[j, i], perm)
        else:
          grid[i, j] = block(i, j)
    rows = [
      jnp.concatenate([grid[i, j] for j in range(len(bounds2))], axis=1)
      for i in range(len(bounds1))
    ]
    return jnp.concatenate(rows, axis=0)

  return ntk_fn


# ----------------------------------------------------------------------------------------------
# neural-tangents backend
# ----------------------------------------------------------------------------------------------


def _nt_ntk_fn(f, trace_axes, diagonal_axes, vmap_axes, impl, batch_size) -> NtkFn:
  from analysis import nt_compat

  nt = nt_compat.install()

  def make(i: int):
    nt_fn = nt.empirical_ntk_fn(
      f,
      trace_axes=trace_axes,
      diagonal_axes=diagonal_axes,
      vmap_axes=vmap_axes,
      implementation=nt.NtkImplementation(i),
    )

    def call(x1, x2, params, **kwargs):
      # Implementation 3 calls jnp.dtype(leaf), which NumPy 2 refuses for np.ndarray leaves.
      return nt_fn(x1, x2, jax.tree.map(jnp.asarray, params), **kwargs)

    return call

  selector = None
  if impl == 0:
    impls = (1, 2, 3) if nt_compat.structured_derivatives_supported() else (1, 2)
    selector = _AutoSelector({i: _jit_with_static_kwargs(make(i)) for i in impls})
    fn = selector
  else:
    if impl == 3 and not nt_compat.structured_derivatives_supported():
      raise NotImplementedError(
        f"neural-tangents' implementation 3 does not work on jax {jax.__version__} (only on "
        "0.9.x through analysis.nt_compat); use implementation 1 or 2."
      )
    fn = make(impl)
  if batch_size is not None:
    batched = nt.batch(fn, batch_size=batch_size, device_count=0)

    def fn_blocked(x1, x2, params, **kwargs):
      n1 = _leading_size(x1, "x1")
      n2 = n1 if x2 is None else _leading_size(x2, "x2")
      if n1 % batch_size or n2 % batch_size:
        raise ValueError(
          f"backend='neural_tangents' needs the example counts ({n1}, {n2}) divisible by "
          f"batch_size={batch_size} (neural_tangents.batch); the native backend handles remainders."
        )
      return batched(x1, x2, params, **kwargs)

    fn = fn_blocked

  ntk_fn = _named(fn, "ntk_fn")
  if selector is not None:
    ntk_fn.select_implementation = selector.select
  return ntk_fn
