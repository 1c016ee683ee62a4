"""Tests of analysis.nt_compat (SPEC §8) and of the `neural_tangents` backend of analysis.ntk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from analysis import nt_compat
from analysis.ntk import empirical_ntk_fn
from tests.analysis.test_ntk import (
  ATOL,
  LAYOUT_CASES,
  LAYOUT_NAMES,
  RTOL,
  mlp,
  mlp_params,
  native,
  normal,
  reference_full,
  tokens_model,
  tokens_params,
)

REPO = Path(__file__).resolve().parents[2]
NT_SKIP = pytest.mark.skipif(
  not nt_compat.available(),
  reason="neural-tangents 0.6.5 is not installed or JAX is outside analysis.nt_compat's range; "
  "install it with `pip install --no-deps neural-tangents==0.6.5`.",
)

# Runs in a fresh interpreter: nothing imported or patched beforehand by other tests.
_FRESH_PROCESS_SCRIPT = """
import json, sys
import jax, jax.core
from jax.interpreters import ad
before = {"Jaxpr": hasattr(jax.core, "Jaxpr"), "zeros_like_p": hasattr(ad, "zeros_like_p"),
          "jax.util": "jax.util" in sys.modules}
from analysis import nt_compat
after_import = {"Jaxpr": hasattr(jax.core, "Jaxpr"), "zeros_like_p": hasattr(ad, "zeros_like_p"),
                "jax.util": "jax.util" in sys.modules}
nt = nt_compat.install()
patched = {name: id(getattr(jax.core, name)) for name in ("Jaxpr", "Var", "DShapedArray")}
nt_again = nt_compat.install()
patched_again = {name: id(getattr(jax.core, name)) for name in ("Jaxpr", "Var", "DShapedArray")}
import jax.extend.core
print(json.dumps({
  "before": before,
  "after_import": after_import,
  "same_module": nt is nt_again,
  "same_patches": patched == patched_again,
  "version": nt.__version__,
  "has_ntk_fn": callable(nt.empirical_ntk_fn),
  "jaxpr_restored": jax.core.Jaxpr is jax.extend.core.Jaxpr,
  "experimental_empty": not hasattr(sys.modules["neural_tangents.experimental"],
                                    "empirical_ntk_fn_tf"),
  "tf_modules": sorted(m for m in sys.modules
                       if m.split(".")[0] in ("tensorflow", "tf2jax", "keras")),
}))
"""


@NT_SKIP
def test_install_in_fresh_process_is_explicit_idempotent_and_tensorflow_free():
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
    [sys.executable, "-c", _FRESH_PROCESS_SCRIPT],
    capture_output=True,
    text=True,
    env=env,
    cwd=REPO,
    timeout=120,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["after_import"] == result["before"], "importing nt_compat must patch nothing"
  assert result["same_module"] and result["same_patches"]
  assert result["version"] == nt_compat.NT_VERSION and result["has_ntk_fn"]
  assert result["jaxpr_restored"] and result["experimental_empty"]
  assert result["tf_modules"] == []


@NT_SKIP
def test_install_in_this_process_twice():
  nt = nt_compat.install()
  assert nt_compat.install() is nt
  assert hasattr(jax.core, "Jaxpr") and hasattr(jax.core, "DShapedArray")
  assert not any(m.split(".")[0] in ("tensorflow", "tf2jax") for m in sys.modules)


def test_version_guard_accepts_supported_and_rejects_others():
  assert nt_compat.check_jax_version("0.9.2") == (0, 9, 2)
  assert nt_compat.check_jax_version("0.10.2") == (0, 10, 2)
  assert nt_compat.check_jax_version("0.10.0.dev20260101") == (0, 10, 0)
  for bad in ("0.8.1", "0.4.30", "0.11.0", "1.0.0"):
    with pytest.raises(RuntimeError, match=r"JAX >=0\.9,<0\.11.*found jax .*backend='native'"):
      nt_compat.check_jax_version(bad)
  with pytest.raises(RuntimeError, match="Cannot parse"):
    nt_compat.check_jax_version("nightly")
  assert nt_compat.structured_derivatives_supported("0.9.2")
  assert not nt_compat.structured_derivatives_supported("0.10.2")
  assert not nt_compat.structured_derivatives_supported("0.12.0")


def test_install_refuses_unsupported_jax(monkeypatch):
  monkeypatch.setattr(jax, "__version__", "0.11.1")
  assert not nt_compat.available()
  with pytest.raises(RuntimeError, match=r"found jax 0\.11\.1"):
    nt_compat.install()
  with pytest.raises(RuntimeError, match="backend='native'"):
    empirical_ntk_fn(mlp, backend="neural_tangents")


def test_install_without_neural_tangents_says_how_to_fix(monkeypatch):
  monkeypatch.setattr(jax, "__version__", "0.9.2")  # so the version guard passes
  monkeypatch.setattr(nt_compat, "_installed_nt_version", lambda: None)
  assert not nt_compat.available()
  with pytest.raises(ImportError, match=r"pip install --no-deps neural-tangents==0\.6\.5"):
    nt_compat.install()
  monkeypatch.setattr(nt_compat, "_installed_nt_version", lambda: "0.6.4")
  assert not nt_compat.available()
  with pytest.raises(RuntimeError, match=r"written for neural-tangents 0\.6\.5; found 0\.6\.4"):
    nt_compat.install()


# ---------------------------------------------------------------------------------------------
# The neural_tangents backend against the native one
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  return {
    "mlp_params": mlp_params(rng),
    "x1": normal(rng, (5, 3)),
    "x2": normal(rng, (6, 3)),
    "tok_params": tokens_params(rng),
    "t1": normal(rng, (3, 2, 3)),
    "t2": normal(rng, (4, 2, 3)),
    "t3": normal(rng, (3, 2, 3)),
  }


@NT_SKIP
@pytest.mark.parametrize(LAYOUT_NAMES, [LAYOUT_CASES[i] for i in (1, 4, 5)])
def test_more_layouts_match_native(data, trace_axes, diagonal_axes, spec, divisor, same_n, impl):
  p, t1 = data["tok_params"], data["t1"]
  t2 = data["t3"] if same_n else data["t2"]
  expected = np.einsum(spec, reference_full(tokens_model, p, t1, t2)) / divisor
  theirs = jax.jit(
    empirical_ntk_fn(tokens_model, trace_axes, diagonal_axes, 0, impl, backend="neural_tangents")
  )(t1, t2, p)
  ours = native(tokens_model, trace_axes, diagonal_axes, 0, impl)(t1, t2, p)
  np.testing.assert_allclose(theirs, expected, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=ATOL)


@NT_SKIP
def test_neural_tangents_auto_and_batch(data):
  p, x1 = data["mlp_params"], data["x1"][:4]
  expected = np.einsum("akbk->ab", reference_full(mlp, p, x1, x1)) / 4
  fn = empirical_ntk_fn(mlp, vmap_axes=0, implementation=0, backend="neural_tangents")
  allowed = (1, 2, 3) if nt_compat.structured_derivatives_supported() else (1, 2)
  assert fn.select_implementation(x1, None, p) in allowed
  np.testing.assert_allclose(fn(x1, None, p), expected, rtol=RTOL, atol=ATOL)
  batched = empirical_ntk_fn(mlp, vmap_axes=0, backend="neural_tangents", batch_size=2)
  np.testing.assert_allclose(batched(x1, None, p), expected, rtol=RTOL, atol=ATOL)
  with pytest.raises(ValueError, match="divisible"):
    batched(data["x1"], None, p)


@NT_SKIP
@pytest.mark.skipif(
  not nt_compat.structured_derivatives_supported(), reason="implementation 3 needs JAX 0.9.x"
)
def test_structured_derivatives_accept_numpy_params(data):
  """neural-tangents' implementation 3 calls jnp.dtype(leaf), which NumPy 2 refuses for
  np.ndarray leaves; the backend converts params to JAX arrays first (eager call, no jit)."""
  p, x1, x2 = data["mlp_params"], data["x1"][:2], data["x2"][:3]
  assert isinstance(p["w1"], np.ndarray)
  got = empirical_ntk_fn(mlp, vmap_axes=0, implementation=3, backend="neural_tangents")(x1, x2, p)
  expected = np.einsum("akbk->ab", reference_full(mlp, p, x1, x2)) / 4
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
