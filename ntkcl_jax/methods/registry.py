"""Method lookup: `config.method` is a short name of `BUILTIN` or an import path `pkg.module:Class`.

Modules are imported when named (lazily), so a method outside the package (e.g.
`experiments.custom_methods.ncm:NearestClassMean`) is found the same way, also by a resumed run,
whose config stores the path.
"""

from __future__ import annotations

import importlib

from ntkcl_jax.methods.base import Method

# short name → import path
BUILTIN: dict[str, str] = {
  "ntkcl": "ntkcl_jax.methods.ntkcl:NTKCLMethod",
  "ntkcl_ogd": "ntkcl_jax.methods.ogd:NTKCLOGD",
  "simplecil": "ntkcl_jax.methods.simplecil:SimpleCIL",
  "seq_finetune": "ntkcl_jax.methods.linear:SeqFinetune",
  "joint": "ntkcl_jax.methods.linear:Joint",
  "ranpac": "ntkcl_jax.methods.analytic:RanPAC",
  "aper": "ntkcl_jax.methods.analytic:APER",
}


def method_class(name: str) -> type[Method]:
  """The `Method` subclass `name` refers to.

  Raises:
    ValueError: `name` is neither a known short name nor an importable `module:Class` naming a
      `Method` subclass (the message lists the short names).
  """
  path = BUILTIN.get(name, name)
  module_name, _, class_name = path.partition(":")
  valid = f"valid: {tuple(BUILTIN)} or an import path 'pkg.module:Class'"
  if not module_name or not class_name:
    raise ValueError(f"method={name!r}; {valid}.")
  try:
    cls = getattr(importlib.import_module(module_name), class_name)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"method={name!r} cannot be imported ({e}); {valid}.") from None
  if not (isinstance(cls, type) and issubclass(cls, Method)):
    raise ValueError(f"method={name!r} is not a subclass of ntkcl_jax.methods.Method.")
  return cls
