"""Continual-learning methods: one module per method, behind one protocol (`base.Method`).

`method_class(config.method)` resolves a short name (`registry.BUILTIN`) or an import path
`pkg.module:Class`; `build(plan)` makes the run's method. The trainer names no method.
"""

from ntkcl_jax.methods.base import Method, ProgramParts, TaskEnd, TaskResult
from ntkcl_jax.methods.registry import BUILTIN, method_class

__all__ = [
  "BUILTIN",
  "Method",
  "ProgramParts",
  "TaskEnd",
  "TaskResult",
  "build",
  "method_class",
]


def build(plan) -> Method:
  """The method of `plan` (a `plan.RunPlan`), built from the plan alone."""
  return method_class(plan.method)(plan)
