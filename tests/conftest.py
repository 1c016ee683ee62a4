"""Test-session setup: 8 simulated CPU devices (set before JAX is imported anywhere), and the
numerics guard (`NTKCL_NUMERICS_GUARD=1`, see `tests/numerics.py`)."""

import os

import pytest

from tests import numerics

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Tests compile many small programs; XLA's full optimisation pipeline would dominate their time.
# The guard turns it back on (other fusions, other float32 summation orders).
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = numerics.optimizations_disabled_env()
if "XLA_FLAGS" not in os.environ or numerics.guard_on():
  os.environ["XLA_FLAGS"] = " ".join(
    filter(None, [os.environ.get("XLA_FLAGS", ""), numerics.xla_flags(8)])
  )


def pytest_report_header(config):
  if numerics.guard_on():
    return (
      f"numerics guard on: JAX_DISABLE_MOST_OPTIMIZATIONS=0, XLA_FLAGS={os.environ['XLA_FLAGS']}"
    )
  return None


@pytest.fixture(scope="session", autouse=True)
def session_compilation_cache(tmp_path_factory):
  """One persistent compilation cache for the session (per xdist worker): tests that build the
  same program from different function objects compile it once. The executables are the ones a
  cold compile makes, so every comparison means what it did without the cache."""
  from tests import tiny_configs as tc

  with tc.compilation_cache(tc.compile_cache_dir(tmp_path_factory)):
    yield
