"""Empirical neural tangent kernel of a function of a parameter pytree (SPEC §7.1, §7.2).

`empirical_ntk_fn(f, ...)` returns `ntk_fn(x1, x2, params, **kwargs)` computing

  Θ(x1, x2) = Σ_leaves ∂f(params, x1)/∂θ · ∂f(params, x2)/∂θᵀ,

with the argument names, defaults and output layout of `neural_tangents.empirical_ntk_fn`
(neural-tangents 0.6.5). The default `native` backend is pure JAX (public APIs only) and runs on
any JAX >= 0.9; `backend="neural_tangents"` calls neural-tangents itself through
`analysis.nt_compat`, and the tests check that the two agree (rtol 1e-4).

Example (f: (N, K) logits of a per-example model, so `vmap_axes=0` holds)::

  ntk_fn = empirical_ntk_fn(f, trace_axes=(-1,), vmap_axes=0, implementation=1)
  k_train_train = ntk_fn(x_train, None, params)    # (N_tr, N_tr), averaged over the K logits
  k_test_train = ntk_fn(x_test, x_train, params)   # (N_te, N_tr)
  full = empirical_ntk_fn(f, trace_axes=())(x_test, x_train, params)  # (N_te, N_tr, K, K)

  # Differentiate only w.r.t. params["peft"]["current"]; everything else is a constant.
  f_sub, sub_params = restrict_to_subtree(f, params, ["peft/current"])
  k_peft = empirical_ntk_fn(f_sub, vmap_axes=0)(x_test, x_train, sub_params)

Conventions (SPEC §7.2):

* Axes index the full shape of `f(params, x)`, batch axis 0 included; negative axes are allowed.
* `trace_axes` are contracted and **divided by their total size (averaged, not summed)**: for
  f: (N, K) the default `trace_axes=(-1,)` gives the (N1, N2) kernel (1/K)·Σ_k Θ[n1, k, n2, k].
* `diagonal_axes` appear once (only the x1 index = x2 index entries are computed or kept).
* All other axes appear as (x1, x2) pairs, in the order of f's output axes. Output shape rule:
  walk f(x1).shape and f(x2).shape together; a traced axis contributes nothing, a diagonal axis its
  size once, any other axis `(size1, size2)`. E.g. f: (N, K) gives `trace_axes=()` →
  (N1, N2, K, K); `trace_axes=(), diagonal_axes=(0,)` → (N, K, K);
  `trace_axes=(-1,), diagonal_axes=(0,)` → (N,). See :func:`ntk_output_shape`.
* Jacobians are float32: bfloat16/float16 parameter leaves are promoted to float32 before
  differentiation (float64 leaves, with x64 enabled, stay float64), and the native backend traces
  f and the contractions under `jax.default_matmul_precision("highest")`, so GPUs/TPUs do not drop
  to TF32/bfloat16 matmul passes (which would break the rtol 1e-4 agreement of implementations).
  The neural_tangents backend uses whatever precision is in effect where it is called.
"""

from __future__ import annotations

import functools
import math
import operator
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "BACKENDS",
  "IMPLEMENTATIONS",
  "empirical_ntk_fn",
  "ntk_output_shape",
  "restrict_to_subtree",
]

PyTree = Any
ApplyFn = Callable[..., jax.Array]
Axes = int | Sequence[int]
VMapAxes = None | int | tuple[Any, Any, Mapping[str, Any]]
NtkFn = Callable[..., jax.Array]

IMPLEMENTATIONS = {
  0: "AUTO",
  1: "JACOBIAN_CONTRACTION",
  2: "NTK_VECTOR_PRODUCTS",
  3: "STRUCTURED_DERIVATIVES",
}
"""Implementation codes, as in `neural_tangents.NtkImplementation`."""

BACKENDS = ("native", "neural_tangents")

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def empirical_ntk_fn(
  f: ApplyFn,
  trace_axes: Axes = (-1,),
  diagonal_axes: Axes = (),
  vmap_axes: VMapAxes = None,
  implementation: int = 1,
  backend: str = "native",
  batch_size: int | None = None,
) -> NtkFn:
  """Returns `ntk_fn(x1, x2, params, **kwargs)` computing the empirical NTK of `f`.

  Args:
    f: the function, `f(params, x, **kwargs) -> array`; `params` is the pytree differentiated
      (every leaf must be floating: close integer state over, or use :func:`restrict_to_subtree`),
      `x` an array or pytree of arrays. A single array output is required by the native backend
      (for several outputs, concatenate them or build one kernel per output).
    trace_axes: output axes of f contracted and **averaged**: the kernel is
      (1/Π size) · Σ over those axes of Θ[..., a, ..., b, ...] at a = b. The default `(-1,)` averages
      over the last (logit / feature) axis. `()` keeps every output axis.
    diagonal_axes: output axes of which only the diagonal (x1 index = x2 index) is kept; they
      appear once in the result. Must not overlap `trace_axes`. f(x1) and f(x2) must have equal
      sizes on traced and diagonal axes.
    vmap_axes: `None` (default; always correct), an int, or a triple `(in_axes, out_axes,
      kwargs_axes)` as in neural-tangents. A value certifies that `f(params, x, **kwargs)` equals
      the concatenation along `out_axes` of f applied to single slices of `x` along `in_axes` (an int
      or a pytree of ints / None matching x) and of the keyword arguments named in `kwargs_axes`
      (a dict name -> axis); an int `a` means `(a, a, {})`. Jacobians are then computed per example
      (`jax.vmap`), which is much cheaper. `vmap_axes=0` is valid for any model whose outputs for
      example i depend only on input i: no BatchNorm in training mode, no dropout keys shared
      across the batch, no attention or pooling across the batch axis. The NTK-CL eval forward
      (`fused_feature`, `prototype_logits`, `proxy_logits`) satisfies it. If batch elements
      interact, leave it `None`: a wrong value gives silently wrong kernels.
    implementation: 1 = Jacobian contraction: reverse-mode Jacobians at x1 and x2 contracted leaf
      by leaf (reference method, best for small outputs). 2 = NTK-vector products: a VJP at x2 and
      a `jax.vmap`-ed JVP at x1 per basis vector of f(x2)'s output (no Jacobian contraction; better
      for large outputs and cheap forward passes; computes the full kernel, then traces). 0 = AUTO:
      compiles 1 and 2 for the given shapes and picks the one with fewer flops in XLA's cost
      analysis (cached per input shapes/dtypes and static keyword values; a heuristic, flops are
      not wall time; ties and missing cost analyses pick 1). 3 = structured derivatives: only
      with `backend="neural_tangents"` (JAX 0.9.x); the native backend raises
      `NotImplementedError`. A `neural_tangents.NtkImplementation` value is accepted too.
    backend: `"native"` (pure JAX, default) or `"neural_tangents"`, which calls
      `analysis.nt_compat.install()` and then `neural_tangents.empirical_ntk_fn` with the same
      arguments (implementations 1, 2, 3; 0 uses the same flops selection as native over
      neural-tangents' 1, 2 and, where supported, 3, because neural-tangents' own AUTO indexes
      `cost_analysis()[0]`, a dict on current JAX, and prints) and `neural_tangents.batch` for
      `batch_size` (single device, no `pmap`; sizes must then be divisible by `batch_size`).
    batch_size: `None` computes the kernel in one call. An int `b` splits axis 0 of every leaf of
      x1 and x2 into blocks of `b` rows (the last block may be smaller: it compiles once more) and
      assembles the full kernel from the blocks, so peak memory is that of a (b, b) block. It
      assumes output axis 0 of f is that example axis. Only the blocks needed are computed: with
      `x2=None` the lower triangle is the transpose of the upper one; with axis 0 in
      `diagonal_axes` (or `trace_axes`) only the diagonal blocks. Keyword arguments given as a
      2-tuple `(v1, v2)` of arrays with leading sizes (N1, N2) are blocked with x1 and x2; other
      keyword arguments are passed whole. Each block is an ordinary jitted call, so blocks whose
      inputs are placed with a `jax.sharding.NamedSharding(mesh, P("data"))` are computed under
      that mesh (XLA partitions the per-example work along the batch axis); to spread independent
      blocks over devices or hosts, call `ntk_fn` on the block pairs yourself.

  Returns:
    `ntk_fn(x1, x2, params, **kwargs) -> array`. `x1`: inputs, e.g. (N1, ...); `x2`: (N2, ...) or
    `None`, meaning x1 (then the Jacobian at x1 is reused). `params`: the pytree f is
    differentiated with respect to (whatever tree is passed). `kwargs` are passed to f; a 2-tuple
    `(v1, v2)` gives `v1` to f(x1) and `v2` to f(x2), any other value goes to both (when `x2` is
    `None` only `v1` is used). Unlike neural-tangents, an `rng` keyword is not split. The result
    has the shape given by :func:`ntk_output_shape`: "almost" `zip(f(x1).shape, f(x2).shape)`,
    traced axes dropped, diagonal axes once. The native `ntk_fn` is jit-compiled per input
    shapes (non-array keyword values, such as `train=False`, are static and must be hashable) and
    can itself be called under `jax.jit`. With `implementation=0`, `ntk_fn.select_implementation(
    x1, x2, params, **kwargs)` returns the implementation (1 or 2) AUTO picks for those inputs
    (with `batch_size`, AUTO decides per block shape: pass one block to see its choice).

  Raises:
    NotImplementedError: `implementation=3` with the native backend.
    ValueError: unknown backend / implementation, bad axes, non-positive `batch_size`, shapes of
      f(x1) and f(x2) differing on traced or diagonal axes.
  """
  impl = _check_implementation(implementation)
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}.")
  if batch_size is not None and (
    isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0
  ):
    raise ValueError(f"batch_size must be a positive int or None; got {batch_size!r}.")
  if backend == "neural_tangents":
    return _nt_ntk_fn(f, trace_axes, diagonal_axes, vmap_axes, impl, batch_size)
  if impl == 3:
    raise NotImplementedError(
      "implementation=3 (structured derivatives) is not part of the native backend; use "
      "implementation=1 (Jacobian contraction) or 2 (NTK-vector products), or 0 to pick between "
      "them, or backend='neural_tangents' (neural-tangents 0.6.5 through analysis.nt_compat; "
      "implementation 3 works there on JAX 0.9.x)."
    )
  _check_axes_disjoint(trace_axes, diagonal_axes)
  triple = _vmap_triple(vmap_axes)
  kernels = {
    1: _jit_with_static_kwargs(
      functools.partial(_jacobian_contraction, f, trace_axes, diagonal_axes, triple)
    ),
    2: _jit_with_static_kwargs(
      functools.partial(_ntk_vector_products, f, trace_axes, diagonal_axes, triple)
    ),
  }
  selector = None
  if impl == 0:
    selector = _AutoSelector(kernels)
    block_fn = selector
  else:
    block_fn = kernels[impl]
  if batch_size is None:
    ntk_fn = _named(block_fn, "ntk_fn")
  else:
    ntk_fn = _blocked(block_fn, f, batch_size, trace_axes, diagonal_axes)
  if selector is not None:
    ntk_fn.select_implementation = selector.select
  return ntk_fn


def ntk_output_shape(
  fx1_shape: Sequence[int],
  fx2_shape: Sequence[int],
  trace_axes: Axes = (-1,),
  diagonal_axes: Axes = (),
) -> tuple[int, ...]:
  """Shape of the kernel `ntk_fn` returns for outputs f(x1): `fx1_shape`, f(x2): `fx2_shape`.

  A traced axis contributes nothing, a diagonal axis its size once, every other axis the pair
  `(fx1_shape[i], fx2_shape[i])`, in output-axis order. E.g. (5, 3), (4, 3) → (5, 4) with the
  default `trace_axes=(-1,)`; (5, 4, 3, 3) with `trace_axes=()`.
  """
  fx1_shape, fx2_shape = tuple(fx1_shape), tuple(fx2_shape)
  trace, diag = _canonical_trace_diag(trace_axes, diagonal_axes, fx1_shape, fx2_shape)
  out: list[int] = []
  for i, (a, b) in enumerate(zip(fx1_shape, fx2_shape)):
    if i in diag:
      out.append(a)
    elif i not in trace:
      out += [a, b]
  return tuple(out)


def restrict_to_subtree(
  f: ApplyFn,
  full_params: PyTree,
  path_prefixes: str | Sequence[str] | Sequence[Sequence[str]],
) -> tuple[ApplyFn, dict[str, jax.Array]]:
  """Restricts differentiation to the leaves of `full_params` under the given path prefixes.

  Args:
    f: `f(params, x, **kwargs)` taking the full parameter tree.
    full_params: the full tree (nested dicts, lists, dataclasses: any pytree).
    path_prefixes: one prefix or a sequence of them, each a "/"-joined path ("peft/current") or a
      tuple of path components (("peft", "current")). A leaf is selected when its path starts
      with a prefix component by component (so "fusion/val" does not select "fusion/value/...").
      Dict keys, attribute names and sequence indices are the components.

  Returns:
    `(f_sub, sub_params)`. `sub_params` is a flat dict `{"peft/current/adapter_0/down/kernel":
    leaf, ...}` of the selected leaves, in tree order; `f_sub(sub_params, x, **kwargs)` puts them
    back into the tree and calls f, so `empirical_ntk_fn(f_sub, ...)(x1, x2, sub_params)` is the
    kernel of the selected sub-tree only (every other leaf is a constant). The other leaves are
    closed over from `full_params`; under `jax.jit` closed-over arrays become compile-time
    constants, which is slow to compile for a large frozen backbone. To keep them as runtime
    arguments instead, pass the full tree as a keyword: `ntk_fn(x1, x2, sub_params,
    frozen_params=full_params)` (its selected leaves are ignored; it must have the structure of
    `full_params`).

  Raises:
    ValueError: a prefix selects no leaf (the message lists the available top-level paths) or no
      prefix is given.
  """
  prefixes = _as_prefixes(path_prefixes)
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(full_params)
  paths = [tuple(_key_name(k) for k in path) for path, _ in leaves_with_path]
  full_leaves = [leaf for _, leaf in leaves_with_path]
  selected = [i for i, p in enumerate(paths) if any(p[: len(q)] == q for q in prefixes)]
  for q in prefixes:
    if not any(p[: len(q)] == q for p in paths):
      available = sorted({"/".join(p[: len(q)]) for p in paths})
      raise ValueError(
        f"Path prefix {'/'.join(q)!r} selects no leaf of the parameter tree. Paths at that depth: "
        f"{available[:20]}{' ...' if len(available) > 20 else ''}."
      )
  names = ["/".join(paths[i]) for i in selected]
  sub_params = {name: full_leaves[i] for name, i in zip(names, selected)}

  def f_sub(sub: Mapping[str, jax.Array], x: PyTree, *, frozen_params: PyTree = None, **kwargs):
    if set(sub) != set(names):
      missing, extra = sorted(set(names) - set(sub)), sorted(set(sub) - set(names))
      raise ValueError(
        f"Sub-tree parameters do not match the selection: missing {missing}, unexpected {extra}. "
        "Pass the `sub_params` returned by restrict_to_subtree (or a tree of the same keys)."
      )
    if frozen_params is None:
      leaves = list(full_leaves)
    else:
      leaves = list(treedef.flatten_up_to(frozen_params))
    for name, i in zip(names, selected):
      leaves[i] = sub[name]
    return f(jax.tree_util.tree_unflatten(treedef, leaves), x, **kwargs)

  return f_sub, sub_params


# ----------------------------------------------------------------------------------------------
# Axes and shapes
# ----------------------------------------------------------------------------------------------


def _check_implementation(implementation: Any) -> int:
  try:
    impl = int(implementation)
  except (TypeError, ValueError):
    impl = None
  if impl not in IMPLEMENTATIONS or isinstance(implementation, bool):
    raise ValueError(
      f"implementation must be one of {sorted(IMPLEMENTATIONS)} ({IMPLEMENTATIONS}); "
      f"got {implementation!r}."
    )
  return impl


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


# ----------------------------------------------------------------------------------------------
# jit with static keyword values, AUTO selection, blocking
# ----------------------------------------------------------------------------------------------


class _Dynamic:
  """Marks an array leaf of the keyword arguments (passed to jit as a runtime argument)."""

  def __repr__(self) -> str:
    return "<array>"


_DYNAMIC = _Dynamic()


def _is_array(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


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


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _as_prefixes(path_prefixes) -> list[tuple[str, ...]]:
  if isinstance(path_prefixes, str):
    path_prefixes = [path_prefixes]
  prefixes = []
  for p in path_prefixes:
    q = tuple(c for c in p.split("/") if c) if isinstance(p, str) else tuple(str(c) for c in p)
    if not q:
      raise ValueError(f"Empty path prefix {p!r}; name a sub-tree such as 'peft/current'.")
    prefixes.append(q)
  if not prefixes:
    raise ValueError("path_prefixes is empty; name at least one sub-tree such as 'peft/current'.")
  return prefixes
