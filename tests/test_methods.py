"""The method registry and protocol (`ntkcl_jax.methods`), and the plan's capability checks."""

from __future__ import annotations

import pytest

from ntkcl_jax import methods
from ntkcl_jax import plan as plan_lib
from tests import tiny_configs as tc


@pytest.mark.parametrize("name", sorted(methods.BUILTIN))
def test_every_builtin_method_builds_from_its_plan(name):
  plan = plan_lib.resolve(tc.method_config(name))
  method = methods.build(plan)
  assert isinstance(method, methods.Method) and type(method) is methods.method_class(name)
  assert method.feature_dim > 0 and method.epochs(0, plan.num_tasks) in (0, plan.epochs)


def test_a_method_is_found_by_import_path():
  path = "experiments.custom_methods.ncm:NearestClassMean"
  plan = plan_lib.resolve(tc.tiny_config(method=path, seeds="0,1"))
  assert plan.method == path and methods.build(plan).supports_stacked_seeds


@pytest.mark.parametrize(
  "name, match",
  [
    ("nope", r"method='nope'; valid: \('ntkcl'"),
    ("ntkcl_jax.methods.base:Nope", "cannot be imported"),
    ("ntkcl_jax.plan:RunPlan", "not a subclass"),
  ],
)
def test_unknown_methods_list_the_known_names(name, match):
  with pytest.raises(ValueError, match=match):
    plan_lib.resolve(tc.tiny_config(method=name))


@pytest.mark.parametrize("overrides", [{"method": "ranpac"}, {"eval__head": "ridge"}])
def test_methods_that_cannot_stack_say_so(overrides):
  with pytest.raises(ValueError, match="closed-form ridge head runs one seed per process"):
    plan_lib.resolve(tc.tiny_config(seeds="0,1", **overrides))
