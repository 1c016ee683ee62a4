"""`ntkcl_jax.preflight` for NVIDIA GPU targets (`--target h100x8`, `ntkcl_jax/preflight/gpus.py`):
target names, the XLA target description made from our per-GPU table, the float32 matmul peak per
precision, the HLO FLOP counter and collectives on real XLA:GPU output, the missing-plugin exit,
and deviceless compiles of the tiny run (skipped without JAX's CUDA plugin).

The `tests/fixtures/preflight_gpu_*.hlo` files are optimised HLO that jaxlib 0.9.2's CUDA plugin
compiled deviceless for `h100x1`/`h100x8` (metadata and sharding annotations stripped):
  cublas_cudnn: a 4x4-stride-4 "VALID" conv of f32[2,8,8,3] with f32[4,4,3,8] (a cuDNN
    `__cudnn$convForward` call) reshaped to (2, 4, 8), times f32[8,16] (a `__cublas$gemm` call),
    precision "highest";
  triton_allreduce: the gradient in `y` of sum(tanh(x @ y)**2), x f32[64,128] split over 8
    devices, y f32[128,256] replicated, default precision (two Triton gemm fusions and the
    gradient's all-reduce-start);
  while: `fori_loop(0, 5, lambda i, x: tanh(dot(x, w)))`, x f32[8,16], w f32[16,16], precision
    "highest" (a while loop with known_trip_count 5 around a cuBLAS gemm).
"""

from __future__ import annotations

import json
import pathlib

import pytest

from ntkcl_jax import preflight as pf
from ntkcl_jax.preflight import command as pf_command
from ntkcl_jax.preflight import gpus
from ntkcl_jax.preflight.compiled import collectives, hlo_matmul_flops
from tests import tiny_configs as tc
from tests.preflight_checks import check_run_report

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"

# The tests run with JAX_PLATFORMS=cpu (tests/conftest.py), under which the plugin skips its CUDA
# check anyway; set for a run without that variable.
gpus.allow_deviceless_cuda()

needs_cuda_plugin = pytest.mark.skipif(
  not gpus.plugin_installed(),
  reason=f"JAX's CUDA plugin is not installed ({gpus.INSTALL}): no GPU topology to compile for",
)


def _hlo(name: str) -> str:
  return (FIXTURES / f"preflight_gpu_{name}.hlo").read_text()


def test_gpu_target_names():
  assert gpus.parse_target("h100x8") == ("h100", 8)
  assert gpus.parse_target("a100x1") == ("a100", 1)
  assert gpus.parse_target("t4x1") == ("t4", 1)
  for name in ("h100x0", "h100x9", "h100", "x100x1", "v5litepod-1", "h100x8x1", "H100x8"):
    assert gpus.parse_target(name) is None, name
  for name in gpus.TARGETS:  # every listed name resolves to a GPU of the table and a chip
    model, _ = gpus.parse_target(name)
    assert model in gpus.GPUS and pf.CHIPS[model].is_gpu


def test_unknown_target_lists_the_gpu_targets():
  with pytest.raises(pf.UnknownTargetError) as e:
    pf.resolve_target("h100x16")
  for name in ("h100x1", "h100x8", "a100x8", "l4x1", "t4x1", "v5litepod-1", "cpu"):
    assert name in str(e.value)


@pytest.mark.parametrize("model", sorted(gpus.GPUS))
def test_target_config_text_carries_the_gpus_facts(model):
  gpu, chip = gpus.GPUS[model], pf.CHIPS[model]
  text = gpus.target_config_text(gpu, chip)
  major, minor = gpu.compute_capability
  assert f"cuda_compute_capability {{ major: {major} minor: {minor} }}" in text
  assert f"  core_count: {gpu.sms}\n" in text
  assert f"  device_memory_size: {chip.hbm_bytes}\n" in text
  assert f"  memory_bandwidth: {int(chip.hbm_bw)}\n" in text
  assert f"  l2_cache_size: {gpu.l2_bytes}\n" in text
  assert f'device_description_str: "{gpu.name}"' in text and 'platform_name: "CUDA"' in text
  assert text.count("{") == text.count("}")


def test_h100_target_config_values():
  text = gpus.target_config_text(gpus.GPUS["h100"], pf.CHIPS["h100"])
  for line in ("major: 9 minor: 0", "core_count: 132", "shared_memory_per_core: 233472"):
    assert line in text
  assert "shared_memory_per_block_optin: 232448" in text and "fpus_per_core: 128" in text


def test_float32_matmul_peak_follows_the_chip_family():
  v5e, h100, t4 = pf.CHIPS["v5e"], pf.CHIPS["h100"], pf.CHIPS["t4"]
  # TPU: bf16 passes (unchanged).
  assert v5e.f32_matmul_flops("default") == 197e12
  assert v5e.f32_matmul_flops("high") == 197e12 / 3
  assert v5e.f32_matmul_flops("highest") == 197e12 / 6
  # NVIDIA: TF32 tensor cores at default/high, FP32 CUDA cores at highest.
  assert h100.f32_matmul_flops("default") == h100.f32_matmul_flops("high") == 494.7e12
  assert h100.f32_matmul_flops("highest") == 66.9e12
  # No TF32 (Turing): the FP32 units at every precision.
  assert {t4.f32_matmul_flops(p) for p in ("default", "high", "highest")} == {8.1e12}


def test_hlo_flops_count_cublas_and_cudnn_calls():
  # conv: 2 images x 2x2 positions x 8 features, each a 4x4x3 dot: 2 * 64 * 48 = 6,144;
  # gemm: (8, 8) x (8, 16): 2 * 8 * 16 * 8 = 2,048.
  assert hlo_matmul_flops(_hlo("cublas_cudnn")) == 6144 + 2048


def test_hlo_flops_count_triton_gemm_fusions_and_the_all_reduce():
  # Per device x is (8, 128): forward x @ y and the gradient x^T @ g, 2 * 8 * 128 * 256 each.
  text = _hlo("triton_allreduce")
  assert hlo_matmul_flops(text) == 2 * (2 * 8 * 128 * 256)
  assert collectives(text) == {"all-reduce": {"count": 1, "bytes": 128 * 256 * 4}}


def test_hlo_flops_multiply_a_while_body_by_its_trip_count():
  assert hlo_matmul_flops(_hlo("while")) == 5 * (2 * 8 * 16 * 16)


def test_async_collectives_count_their_results():
  # all-gather-start lines of the tiny stacked train step on h100x8 (real XLA:GPU output): one
  # operand → (operand, result); two combined → ((operands), (results)).
  text = "\n".join(
    [
      "  %all-gather-start = (f32[4,28,28,6]{3,2,1,0}, f32[16,28,28,6]{3,2,1,0}) "
      "all-gather-start(%loop_transpose_fusion), channel_id=4, dimensions={0}",
      "  %all-gather-start.1 = ((f32[4,28,28,3]{2,1,0,3}, f32[7,7,3,16]{2,1,0,3}), "
      "(f32[4,28,28,6]{2,1,0,3}, f32[7,7,3,32]{2,1,0,3})) all-gather-start(%bitcast.6294.0, "
      "%bitcast.6298.0), channel_id=3, dimensions={3}",
    ]
  )
  found = collectives(text)["all-gather"]
  assert found["count"] == 2
  assert found["bytes"] == 4 * (16 * 28 * 28 * 6 + 4 * 28 * 28 * 6 + 7 * 7 * 3 * 32)


def test_a_gpu_target_without_the_plugin_exits_2_naming_the_install(monkeypatch, capsys):
  monkeypatch.setattr(gpus, "plugin_installed", lambda: False)
  with pytest.raises(SystemExit) as e:
    pf_command.main(tc.tiny_config(), "h100x8", None)
  assert e.value.code == 2
  errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
  assert errors == [f"error: {gpus.missing_plugin_message('h100x8')}"]
  assert 'pip install "jax-cuda12-plugin==0.9.2" "jax-cuda12-pjrt==0.9.2"' in errors[0]


@needs_cuda_plugin
@pytest.mark.parametrize("target", ["h100x1", "h100x8"])
@pytest.mark.parametrize("seeds", ["", "0,1"])
def test_tiny_run_compiles_and_reports_for_h100(target, seeds):
  n = int(target.partition("x")[2])
  report = pf.preflight(tc.tiny_config(seeds=seeds), pf.resolve_target(target))
  assert report["devices"] == n and report["device_kind"] == gpus.GPUS["h100"].name
  assert "no autotuning" in report["environment"]["estimate"]
  train_step = check_run_report(report, seeds)
  assert train_step["flops_source"] == "hlo_matmul_count"
  assert train_step["roofline_bound"]["compute_only"] is True
  if n > 1:
    assert "all-reduce" in train_step["collectives"]  # gradients summed over "data"
  text = pf.format_report(report)
  assert "deviceless compile for NVIDIA H100 SXM (no autotuning" in text
  json.dumps(report)  # the --json file


@needs_cuda_plugin
@pytest.mark.parametrize("target", ["h100x1", "h100x8"])
def test_gpu_train_flops_match_the_analytic_count(target):
  # tests/test_preflight.py's width-256 config. The TPU test bounds cost_analysis FLOPs (all
  # work: matmuls plus LayerNorm, softmax, GELU, optimiser) at 1.00-1.05 x the analytic matmul
  # count; the GPU count is matmuls and convolutions only (hlo_matmul_flops), so the ratio is
  # the analytic count's own accuracy: measured 0.995 (h100x1) and 1.008 (h100x8).
  config = tc.tiny_config(
    backbone__width=256,
    backbone__mlp_dim=1024,
    backbone__num_heads=1,
    model__fusion_heads=1,
  )
  report = pf.preflight(config, pf.resolve_target(target), functions=["train_step"])
  (r,) = report["functions"]
  ratio = r["flops_per_image"] / r["analytic_matmul_flops_per_image"]
  assert 0.95 <= ratio <= 1.05, ratio
