"""Compatibility layer so that neural-tangents 0.6.5 imports on JAX 0.9 / 0.10 (SPEC §8).

neural-tangents 0.6.5 (Dec 2023, its last release) fails at import on any JAX >= 0.6: it imports
names that JAX has since moved or removed (`jax.core.Jaxpr`, `jax.util.safe_map`,
`jax.interpreters.ad.source_info_util`, ...), and its `neural_tangents.experimental` package
imports TensorFlow and tf2jax. This module restores exactly what neural-tangents needs, from the
names' current homes, and nothing else:

(a) an empty module registered as `neural_tangents.experimental` (it only holds the TensorFlow
    bridge `empirical_ntk_fn_tf`), so TensorFlow is never imported;
(b) the `jax.core` names `Jaxpr`, `JaxprEqn`, `Literal`, `Var`, `Primitive` (now in
    `jax.extend.core`), `ShapedArray`, `AbstractValue`, `Value`, `eval_context` (kept where JAX
    still has them) and a placeholder type `DShapedArray` (dynamic shapes are gone; neural-tangents
    only compares types against it, so no value is ever an instance);
(c) `source_info_util`, `config` and `zeros_like_p` as attributes of `jax.interpreters.ad`;
(d) a `jax.util` module with `safe_map` / `safe_zip` where `jax.util` no longer exists.

Nothing happens on import of this module: call :func:`install` explicitly (the `neural_tangents`
backend of :func:`analysis.ntk.empirical_ntk_fn` does). :func:`install` is idempotent (it only adds
names that are missing, and never replaces one that exists) and version-guarded: it refuses a JAX
outside :data:`SUPPORTED_JAX` (tested: 0.9.2 and 0.10.2) because it touches private JAX names.

Install neural-tangents without its dependencies (its declared TensorFlow / tf2jax requirements are
neither needed nor wanted)::

  pip install --no-deps neural-tangents==0.6.5

What works afterwards (measured by the project, see ENV.md):

* JAX 0.9.x: implementations 1 (Jacobian contraction), 2 (NTK-vector products) and 3 (structured
  derivatives); 1, 2 and 3 agree with each other and with the native backend to rtol 1e-4.
* JAX 0.10.x: implementations 1 and 2 only; 3 fails inside JAX's rewritten `linearize`. Use
  implementation 1 or 2, or `backend="native"`.

Example::

  from analysis import nt_compat
  nt = nt_compat.install()          # returns the imported `neural_tangents` module
  ntk_fn = nt.empirical_ntk_fn(f, trace_axes=(-1,), vmap_axes=0, implementation=3)
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import sys
import types
import warnings

__all__ = [
  "NT_VERSION",
  "SUPPORTED_JAX",
  "available",
  "check_jax_version",
  "install",
  "structured_derivatives_supported",
]

NT_VERSION = "0.6.5"
"""The only neural-tangents release this layer is written and tested for."""

SUPPORTED_JAX = ((0, 9), (0, 11))
"""Half-open range [min, max) of (major, minor) JAX versions the layer is tested on."""

_STRUCTURED_DERIVATIVES_JAX = ((0, 9), (0, 10))
"""JAX versions on which neural-tangents' implementation 3 works through this layer."""

_HOW_TO_FIX = (
  "Use backend='native' of analysis.ntk.empirical_ntk_fn (implementations 0/1/2, any JAX), or "
  "install a supported JAX (>={lo},<{hi}, e.g. `pip install jax==0.9.2`)."
)

_INSTALL_NT = (
  f"Install it without its TensorFlow dependencies: `pip install --no-deps "
  f"neural-tangents=={NT_VERSION}`, or use backend='native' of analysis.ntk.empirical_ntk_fn."
)

# jax.core names neural-tangents imports, with the modules to look for them in (first hit wins).
_JAX_CORE_NAMES = {
  "Jaxpr": ("jax.extend.core", "jax._src.core"),
  "JaxprEqn": ("jax.extend.core", "jax._src.core"),
  "Literal": ("jax.extend.core", "jax._src.core"),
  "Var": ("jax.extend.core", "jax._src.core"),
  "Primitive": ("jax.extend.core", "jax._src.core"),
  "ShapedArray": ("jax._src.core",),
  "AbstractValue": ("jax._src.core",),
  "Value": ("jax._src.core",),
  "eval_context": ("jax._src.core",),
  "get_aval": ("jax._src.core",),
}

_AD_NAMES = {
  "source_info_util": ("jax._src", "source_info_util"),
  "config": ("jax._src.config", "config"),
  "zeros_like_p": ("jax._src.ad_util", "zeros_like_p"),
}


def _dotted(version: tuple[int, ...]) -> str:
  return ".".join(map(str, version))


def _how_to_fix() -> str:
  lo, hi = SUPPORTED_JAX
  return _HOW_TO_FIX.format(lo=_dotted(lo), hi=_dotted(hi))


def _parse_version(version: str) -> tuple[int, int, int]:
  match = re.match(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?", version)
  if match is None:
    raise RuntimeError(
      f"Cannot parse the JAX version {version!r}; expected 'MAJOR.MINOR[.PATCH...]'."
    )
  major, minor, patch = match.groups()
  return int(major), int(minor), int(patch or 0)


def check_jax_version(version: str | None = None) -> tuple[int, int, int]:
  """Raises unless `version` is inside :data:`SUPPORTED_JAX`.

  Args:
    version: a JAX version string such as `"0.9.2"` or `"0.10.0.dev20260101"`; `None` reads
      `jax.__version__`.

  Returns:
    The parsed `(major, minor, patch)`.

  Raises:
    RuntimeError: the version is outside the tested range; the message says which range is
      supported and how to proceed.
  """
  if version is None:
    import jax

    version = jax.__version__
  parsed = _parse_version(version)
  lo, hi = SUPPORTED_JAX
  if not lo <= parsed[:2] < hi:
    raise RuntimeError(
      f"analysis.nt_compat supports JAX >={_dotted(lo)},<{_dotted(hi)} (it restores private JAX "
      f"names that neural-tangents {NT_VERSION} imports); found jax {version}. " + _how_to_fix()
    )
  return parsed


def structured_derivatives_supported(version: str | None = None) -> bool:
  """Whether neural-tangents' implementation 3 works through this layer on JAX `version`.

  True on JAX 0.9.x; False on 0.10.x (it fails inside JAX's rewritten `linearize`) and on any
  version outside :data:`SUPPORTED_JAX`.
  """
  try:
    parsed = check_jax_version(version)
  except RuntimeError:
    return False
  lo, hi = _STRUCTURED_DERIVATIVES_JAX
  return lo <= parsed[:2] < hi


def _installed_nt_version() -> str | None:
  if importlib.util.find_spec("neural_tangents") is None:
    return None
  try:
    return importlib.metadata.version("neural-tangents")
  except importlib.metadata.PackageNotFoundError:
    return None


def available() -> bool:
  """Whether :func:`install` can be expected to succeed here; has no side effects.

  True when neural-tangents 0.6.5 is installed and JAX is in :data:`SUPPORTED_JAX`.
  Nothing is patched or imported (beyond `jax` itself); call :func:`install` to do that.
  """
  if _installed_nt_version() != NT_VERSION:
    return False
  try:
    check_jax_version()
  except RuntimeError:
    return False
  return True


def _lookup(module_names: tuple[str, ...], name: str):
  for module_name in module_names:
    try:
      module = importlib.import_module(module_name)
    except ImportError:
      continue
    if _has(module, name):
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return getattr(module, name)
  raise RuntimeError(
    f"analysis.nt_compat could not find `{name}` in any of {list(module_names)} on this JAX; "
    "the layer needs updating for it. " + _how_to_fix()
  )


def _has(module: types.ModuleType, name: str) -> bool:
  """hasattr that treats a deprecated-but-present JAX name as present, without warning."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    return hasattr(module, name)


class DShapedArray:
  """Placeholder for the removed `jax.core.DShapedArray` (dynamic shapes).

  neural-tangents only tests `type(aval) is core.DShapedArray`; no value is ever an instance.
  """


def _patch_jax_core() -> None:
  import jax.core

  for name, homes in _JAX_CORE_NAMES.items():
    if not _has(jax.core, name):
      setattr(jax.core, name, _lookup(homes, name))
  if not _has(jax.core, "DShapedArray"):
    jax.core.DShapedArray = DShapedArray


def _patch_ad() -> None:
  from jax.interpreters import ad

  for name, (module_name, attr) in _AD_NAMES.items():
    if not _has(ad, name):
      setattr(ad, name, _lookup((module_name,), attr))


def _patch_jax_util() -> None:
  import jax

  try:
    util = importlib.import_module("jax.util")
  except ImportError:
    util = sys.modules.setdefault("jax.util", types.ModuleType("jax.util"))
    util.__doc__ = "Stand-in for the removed `jax.util`, registered by analysis.nt_compat."
  if not _has(jax, "util"):
    jax.util = util
  from jax._src import util as src_util

  for name in ("safe_map", "safe_zip"):
    if not _has(util, name):
      setattr(util, name, getattr(src_util, name))


def _register_empty_experimental() -> None:
  name = "neural_tangents.experimental"
  if name in sys.modules:
    return
  module = types.ModuleType(name)
  module.__doc__ = (
    "Empty stand-in registered by analysis.nt_compat: the real module only holds the TensorFlow "
    "bridge (empirical_ntk_fn_tf) and would import TensorFlow."
  )
  sys.modules[name] = module


def _patch_slice_transposes() -> None:
  """Plain transpose rules for slice / dynamic_slice built from JAX's "fancy" ones.

  neural-tangents' implementation 3 looks transposes up in `ad.primitive_transposes`; on JAX 0.9
  `slice_p` and `dynamic_slice_p` only have `ad.fancy_transposes` entries, so any model that
  slices (NTK-CL reads the CLS token) fails there. Existing entries are never replaced.
  """
  try:
    from jax._src.interpreters import ad as ad_internal
    from jax._src.lax import slicing
  except ImportError:  # a JAX whose internals moved: implementation 3 is then unsupported
    return
  fancy = getattr(ad_internal, "fancy_transposes", {})
  accum = getattr(ad_internal, "ValAccum", None)
  if accum is None:
    return

  def legacy(rule):
    def transpose(ct, *invals, **params):
      accs = [accum(x.aval) if ad_internal.is_undefined_primal(x) else x for x in invals]
      rule(ct, *accs, **params)
      return [a.freeze() if isinstance(a, accum) else None for a in accs]

    return transpose

  for prim in (slicing.slice_p, slicing.dynamic_slice_p):
    if prim in fancy and prim not in ad_internal.primitive_transposes:
      ad_internal.primitive_transposes[prim] = legacy(fancy[prim])


def install() -> types.ModuleType:
  """Makes `import neural_tangents` work on this JAX, imports it and returns the module.

  Idempotent: a second call only re-imports the already imported module. Explicit: importing
  `analysis.nt_compat` patches nothing. The patches add the missing names listed in the module
  docstring to `jax.core`, `jax.interpreters.ad` and `jax.util`; existing names are never
  replaced. On JAX 0.10.x only implementations 1 and 2 of neural-tangents work.

  Returns:
    The `neural_tangents` module.

  Raises:
    RuntimeError: JAX outside :data:`SUPPORTED_JAX`, or a neural-tangents version other than
      0.6.5.
    ImportError: neural-tangents is not installed, or it still fails to import (the message
      includes the original error).
  """
  check_jax_version()
  version = _installed_nt_version()
  if version is None:
    raise ImportError(f"neural-tangents is not installed. {_INSTALL_NT}")
  if version != NT_VERSION:
    raise RuntimeError(
      f"analysis.nt_compat is written for neural-tangents {NT_VERSION}; found {version}. "
      f"Run `pip install --no-deps neural-tangents=={NT_VERSION}`, or use backend='native'."
    )
  _patch_jax_core()
  _patch_ad()
  _patch_slice_transposes()
  _patch_jax_util()
  _register_empty_experimental()
  try:
    import neural_tangents
  except Exception as e:  # report any import-time failure with how to proceed
    raise ImportError(
      f"neural-tangents {NT_VERSION} failed to import even with analysis.nt_compat installed "
      f"({type(e).__name__}: {e}). Use backend='native' of analysis.ntk.empirical_ntk_fn."
    ) from e
  return neural_tangents
