"""NVIDIA GPU targets for preflight: a table of per-GPU facts, the XLA target description made from
it, and a deviceless topology of N such GPUs in one host.

`GPUS` holds each GPU's published architecture (sources named per entry; its peaks, memory and
memory bandwidth are in `targets.CHIPS`), `SM_LIMITS` the per-SM limits of its compute capability.
`target_config_text` renders one as the text form of XLA's `GpuTargetConfigProto`, which the CUDA PJRT plugin
(`jax-cuda12-plugin` + `jax-cuda12-pjrt`) takes to compile for that GPU without one;
`topology_devices` asks the plugin for N device descriptions of it.

The plugin checks the CUDA installation when JAX first discovers its plugins (the first
`jax.devices()`, backend or topology call, not `import jax`), unless `JAX_PLATFORMS` excludes
"cuda" or `JAX_SKIP_CUDA_CONSTRAINTS_CHECK` is set. On a machine without an NVIDIA driver that
check fails and the plugin never registers its topology, so `allow_deviceless_cuda()` must run
before that first call: `python -m ntkcl_jax.preflight` calls it on start.

A deviceless compile does no autotuning: cuBLAS/cuDNN algorithms and Triton tilings are XLA's
defaults, so gemm choices and temp sizes may differ from a compile on the GPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
  from ntkcl_jax.preflight.targets import ChipSpec

SKIP_CHECK_ENV = "JAX_SKIP_CUDA_CONSTRAINTS_CHECK"
# The two wheels of jax[cuda12] that compile: the plugin (Python glue) and the PJRT library with
# XLA:GPU. jax[cuda12]'s nvidia-* wheels (cuBLAS, cuDNN, NCCL, ...; ~3 GB) run programs, and are
# not needed to compile them (measured on the tiny test config for h100x1: the same optimised HLO
# text and memory with and without them).
INSTALL = 'pip install "jax-cuda12-plugin==0.9.2" "jax-cuda12-pjrt==0.9.2"'
# The cuDNN version the compile assumes (a target description carries one): the one
# jax[cuda12]==0.9.2 installs, nvidia-cudnn-cu12 9.28.
CUDNN_VERSION = (9, 28, 0)


@dataclasses.dataclass(frozen=True)
class Gpu:
  """One NVIDIA GPU model's architecture, as NVIDIA publishes it (its peaks, memory and memory
  bandwidth are its `targets.CHIPS` entry).

  name: the device name (what `device_kind` reports). compute_capability: (major, minor).
  sms: streaming multiprocessors. l2_bytes: L2 cache bytes. clock_ghz: boost clock, GHz.
  """

  name: str
  compute_capability: tuple[int, int]
  sms: int
  l2_bytes: int
  clock_ghz: float


@dataclasses.dataclass(frozen=True)
class SmLimits:
  """Per-SM limits of a compute capability (CUDA C++ Programming Guide, "Features and Technical
  Specifications", table "Technical Specifications per Compute Capability", and "Arithmetic
  Instructions" for the FP32 results per clock per SM). Bytes and counts."""

  threads_per_sm: int
  shared_per_sm: int
  shared_per_block_optin: int
  fp32_lanes: int


KiB = 1024
SM_LIMITS: dict[tuple[int, int], SmLimits] = {
  (7, 5): SmLimits(1024, 64 * KiB, 64 * KiB, 64),
  (8, 0): SmLimits(2048, 164 * KiB, 163 * KiB, 64),
  (8, 9): SmLimits(1536, 100 * KiB, 99 * KiB, 128),
  (9, 0): SmLimits(2048, 228 * KiB, 227 * KiB, 128),
}
# Limits common to compute capabilities 7.5-9.0 (same table): threads per block, warp size,
# static shared memory per block, 32-bit registers per SM and per block, grid extents (x, y, z).
THREADS_PER_BLOCK, WARP, SHARED_PER_BLOCK, REGISTERS = 1024, 32, 48 * KiB, 64 * KiB
GRID_LIMITS = (2**31 - 1, 65535, 65535)

MiB = 2**20
GPUS: dict[str, Gpu] = {
  # NVIDIA H100 Tensor Core GPU Architecture whitepaper (resources.nvidia.com, "H100 SXM5"):
  # 132 SMs, 50 MB L2. 1.98 GHz: the maximum SM clock an H100 SXM reports (the whitepaper lists
  # the boost clock as not finalised).
  "h100": Gpu("NVIDIA H100 80GB HBM3", (9, 0), 132, 50 * MiB, 1.98),
  # H200 SXM: the H100 SXM's GH100 configuration with 141 GB HBM3e
  # (nvidia.com/en-us/data-center/h200).
  "h200": Gpu("NVIDIA H200", (9, 0), 132, 50 * MiB, 1.98),
  # NVIDIA A100 Tensor Core GPU Architecture whitepaper: 108 SMs, 40 MB L2, 1.41 GHz boost.
  "a100": Gpu("NVIDIA A100-SXM4-80GB", (8, 0), 108, 40 * MiB, 1.41),
  # NVIDIA Ada GPU Architecture whitepaper, L4 column: 58 SMs, 48 MB L2, 2.04 GHz boost.
  "l4": Gpu("NVIDIA L4", (8, 9), 58, 48 * MiB, 2.04),
  # NVIDIA Turing GPU Architecture whitepaper, Tesla T4 column: 40 SMs, 4 MB L2, 1.59 GHz boost.
  "t4": Gpu("Tesla T4", (7, 5), 40, 4 * MiB, 1.59),
}
TARGET_NAME = re.compile(r"^(?P<gpu>[a-z]+\d+)x(?P<count>\d+)$")
# Named GPU targets (the README's); any <gpu>x<count> with count 1-8 also resolves.
TARGETS = ("h100x1", "h100x8", "h200x8", "a100x1", "a100x8", "l4x1", "t4x1")
MAX_PER_HOST = 8


class GpuTargetError(ValueError):
  """A GPU target that cannot be compiled for here (plugin missing, or registered too late)."""


def parse_target(name: str) -> tuple[str, int] | None:
  """ "h100x8" → ("h100", 8); None when `name` is not <known gpu>x<1..8>."""
  m = TARGET_NAME.match(name)
  if m is None or m["gpu"] not in GPUS or not 1 <= int(m["count"]) <= MAX_PER_HOST:
    return None
  return m["gpu"], int(m["count"])


def target_config_text(gpu: Gpu, chip: ChipSpec) -> str:
  """`gpu` (memory size and bandwidth from its `chip`) as the text format of XLA's
  `GpuTargetConfigProto`: device info, platform, cuDNN version, description; only fields this
  jaxlib parses (an unknown field fails the whole parse)."""
  major, minor = gpu.compute_capability
  sm = SM_LIMITS[gpu.compute_capability]
  info = {
    "threads_per_block_limit": THREADS_PER_BLOCK,
    "threads_per_warp": WARP,
    "shared_memory_per_block": SHARED_PER_BLOCK,
    "shared_memory_per_core": sm.shared_per_sm,
    "threads_per_core_limit": sm.threads_per_sm,
    "core_count": gpu.sms,
    "fpus_per_core": sm.fp32_lanes,
    "block_dim_limit_x": GRID_LIMITS[0],
    "block_dim_limit_y": GRID_LIMITS[1],
    "block_dim_limit_z": GRID_LIMITS[2],
    "memory_bandwidth": int(chip.hbm_bw),
    "l2_cache_size": gpu.l2_bytes,
    "clock_rate_ghz": gpu.clock_ghz,
    "device_memory_size": chip.hbm_bytes,
    "shared_memory_per_block_optin": sm.shared_per_block_optin,
    "registers_per_core_limit": REGISTERS,
    "registers_per_block_limit": REGISTERS,
  }
  body = "".join(f"  {k}: {v}\n" for k, v in info.items())
  body += f"  cuda_compute_capability {{ major: {major} minor: {minor} }}\n"
  cudnn = dict(zip(("major", "minor", "patch"), CUDNN_VERSION))
  return (
    f"gpu_device_info {{\n{body}}}\n"
    'platform_name: "CUDA"\n'
    f"dnn_version_info {{ {' '.join(f'{k}: {v}' for k, v in cudnn.items())} }}\n"
    f'device_description_str: "{gpu.name}"\n'
  )


def allow_deviceless_cuda() -> None:
  """Lets the CUDA plugin register without a driver (`JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`, unless
  set already). Effective only before JAX discovers its plugins (see the module docstring)."""
  os.environ.setdefault(SKIP_CHECK_ENV, "1")


def plugin_installed() -> bool:
  """Whether JAX's CUDA plugin (module `jax_plugins.xla_cuda12`) is importable."""
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:  # no jax_plugins package at all
    return False


def missing_plugin_message(name: str) -> str:
  return (
    f"--target {name!r} compiles for an NVIDIA GPU and needs JAX's CUDA plugin, which is not "
    f"installed: {INSTALL} (~165 MB; no GPU or CUDA libraries needed to compile)."
  )


def topology_devices(name: str, chip: ChipSpec) -> Sequence[Any]:
  """The compile-only devices of GPU target `name` (<gpu>x<count>, `parse_target`): `count`
  device descriptions of `GPUS[gpu]` with `chip`'s memory, in one host.

  Raises:
    GpuTargetError: the plugin is missing, or JAX discovered its plugins before
      `allow_deviceless_cuda()` and the plugin's CUDA check failed on this machine.
  """
  model, count = parse_target(name) or (None, 0)
  if model is None:
    raise GpuTargetError(f"{name!r} is not a GPU target <gpu>x<count>")
  if not plugin_installed():
    raise GpuTargetError(missing_plugin_message(name))
  allow_deviceless_cuda()
  from jax.experimental import topologies

  try:
    desc = topologies.get_topology_desc(
      GPUS[model].name,
      platform="cuda",
      target_config=target_config_text(GPUS[model], chip),
      topology=f"1x1x{count}",
    )
  except NotImplementedError as e:  # the plugin did not register (its CUDA check failed)
    raise GpuTargetError(
      f"--target {name!r}: the CUDA plugin is installed but did not register on this machine "
      f"(no NVIDIA driver, and JAX initialised its backends before {SKIP_CHECK_ENV}=1 was set); "
      f"rerun with {SKIP_CHECK_ENV}=1 in the environment."
    ) from e
  return desc.devices
