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

This module holds the public entry points; `analysis.ntk_kernels` the axes bookkeeping and the two
native implementations, `analysis.ntk_dispatch` jit, AUTO selection, blocking and the
neural-tangents backend.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from analysis.ntk_dispatch import (
  _AutoSelector,
  _blocked,
  _jit_with_static_kwargs,
  _named,
  _nt_ntk_fn,
)
from analysis.ntk_kernels import (
  ApplyFn,
  Axes,
  NtkFn,
  PyTree,
  VMapAxes,
  _canonical_trace_diag,
  _check_axes_disjoint,
  _jacobian_contraction,
  _ntk_vector_products,
  _vmap_triple,
)

__all__ = [
  "BACKENDS",
  "IMPLEMENTATIONS",
  "empirical_ntk_fn",
  "ntk_output_shape",
  "restrict_to_subtree",
]

IMPLEMENTATIONS = {
  0: "AUTO",
  1: "JACOBIAN_CONTRACTION",
  2: "NTK_VECTOR_PRODUCTS",
  3: "STRUCTURED_DERIVATIVES",
}
"""Implementation codes, as in `neural_tangents.NtkImplementation`."""

BACKENDS = ("native", "neural_tangents")


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
  ntk_fn.block_kernel = block_fn  # one (x1 block, x2 block) call, what `batch_size` repeats
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
