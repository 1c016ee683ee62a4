"""Preflight targets: TPU slices by accelerator type or topology, NVIDIA GPUs by model and count
(`h100x8`), their chips' published peaks.

`resolve_target(name)` gives the devices preflight builds its mesh from (TPU device descriptions
from `jax.experimental.topologies`, no TPU needed; GPU ones from the CUDA plugin, no GPU needed,
see `gpus.py`; "cpu" = this machine's devices).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax

from ntkcl_jax.preflight import gpus

GiB, GB = 2**30, 10**9


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  """Published per-chip peaks (one JAX device per chip: v4/v5p run as megacore; per GPU).

  bf16_flops: dense bf16 matmul peak, FLOP/s. hbm_bytes: HBM (GPU: device memory) capacity.
  hbm_bw: its bytes/s. fp32_flops / tf32_flops: an NVIDIA GPU's FP32 (CUDA cores) and dense TF32
  (tensor cores) peaks, FLOP/s; None on TPUs (fp32_flops) and on GPUs without TF32 (tf32_flops).
  """

  name: str
  bf16_flops: float
  hbm_bytes: int
  hbm_bw: float
  source: str
  fp32_flops: float | None = None
  tf32_flops: float | None = None

  @property
  def is_gpu(self) -> bool:
    return self.fp32_flops is not None

  def f32_matmul_flops(self, precision: str) -> float:
    """Peak FLOP/s of a float32 matmul at `precision` ("default", "high", "highest").

    TPU: bf16 passes on the MXU, bf16_flops / PRECISION_PASSES[precision]. NVIDIA (XLA:GPU):
    "default" and "high" run as TF32 on the tensor cores, "highest" as FP32 on the CUDA cores
    (GPUs without TF32 run all three on the CUDA cores).
    """
    if self.fp32_flops is None:
      return self.bf16_flops / PRECISION_PASSES[precision]
    if precision == "highest" or self.tf32_flops is None:
      return self.fp32_flops
    return self.tf32_flops


CHIPS: dict[str, ChipSpec] = {
  # https://cloud.google.com/tpu/docs/v4 ("System architecture"): 275 TFLOP/s bf16 peak per chip,
  # 32 GiB HBM2, 1,200 GB/s.
  "v4": ChipSpec("TPU v4", 275e12, 32 * GiB, 1200e9, "cloud.google.com/tpu/docs/v4"),
  # https://cloud.google.com/tpu/docs/v5e ("System architecture"): 197 TFLOP/s bf16 per chip,
  # 16 GiB HBM2, 819 GB/s.
  "v5e": ChipSpec("TPU v5e", 197e12, 16 * GiB, 819e9, "cloud.google.com/tpu/docs/v5e"),
  # https://cloud.google.com/tpu/docs/v5p ("System architecture"): 459 TFLOP/s bf16 per chip,
  # 95 GiB HBM2e, 2,765 GB/s.
  "v5p": ChipSpec("TPU v5p", 459e12, 95 * GiB, 2765e9, "cloud.google.com/tpu/docs/v5p"),
  # https://cloud.google.com/tpu/docs/v6e ("System architecture"): 918 TFLOP/s bf16 per chip,
  # 32 GiB HBM, 1,640 GB/s.
  "v6e": ChipSpec("TPU v6e", 918e12, 32 * GiB, 1640e9, "cloud.google.com/tpu/docs/v6e"),
  # NVIDIA GPUs (gpus.GPUS has their architecture). Datasheets list tensor-core peaks with 2:4
  # sparsity; these are the dense ones (half). Memory in decimal GB as published.
  # https://www.nvidia.com/en-us/data-center/h100/ (SXM): BF16 1,979 / TF32 989 TFLOP/s sparse,
  # FP32 67 TFLOP/s, 80 GB HBM3 at 3.35 TB/s; the H100 architecture whitepaper's H100 SXM5 column
  # gives the dense figures unrounded: BF16 989.4, TF32 494.7, FP32 66.9 TFLOP/s.
  "h100": ChipSpec(
    "NVIDIA H100 SXM",
    989.4e12,
    80 * GB,
    3.35e12,
    "nvidia.com/en-us/data-center/h100",
    fp32_flops=66.9e12,
    tf32_flops=494.7e12,
  ),
  # https://www.nvidia.com/en-us/data-center/h200/ (SXM): the H100's compute, 141 GB HBM3e at
  # 4.8 TB/s.
  "h200": ChipSpec(
    "NVIDIA H200 SXM",
    989.4e12,
    141 * GB,
    4.8e12,
    "nvidia.com/en-us/data-center/h200",
    fp32_flops=66.9e12,
    tf32_flops=494.7e12,
  ),
  # https://www.nvidia.com/en-us/data-center/a100/ (80GB SXM): BF16 312, TF32 156 TFLOP/s dense,
  # FP32 19.5 TFLOP/s, 80 GB HBM2e at 2,039 GB/s.
  "a100": ChipSpec(
    "NVIDIA A100 80GB SXM",
    312e12,
    80 * GB,
    2039e9,
    "nvidia.com/en-us/data-center/a100",
    fp32_flops=19.5e12,
    tf32_flops=156e12,
  ),
  # https://www.nvidia.com/en-us/data-center/l4/: BF16 242 / TF32 120 TFLOP/s sparse, FP32
  # 30.3 TFLOP/s, 24 GB GDDR6 at 300 GB/s.
  "l4": ChipSpec(
    "NVIDIA L4",
    121e12,
    24 * GB,
    300e9,
    "nvidia.com/en-us/data-center/l4",
    fp32_flops=30.3e12,
    tf32_flops=60e12,
  ),
  # https://www.nvidia.com/en-us/data-center/tesla-t4/: FP32 8.1 TFLOP/s, 16 GB GDDR6 at
  # 320 GB/s. Turing tensor cores do FP16/INT8 only: no TF32, and bf16 matmuls run on the FP32
  # units (bf16_flops = the FP32 peak).
  "t4": ChipSpec(
    "NVIDIA T4",
    8.1e12,
    16 * GB,
    320e9,
    "nvidia.com/en-us/data-center/tesla-t4",
    fp32_flops=8.1e12,
  ),
}

# float32 matmuls on the TPU MXU run as bf16 passes (`jax.lax.Precision`'s docstring: DEFAULT 1,
# HIGH 3, HIGHEST 6): the matmul peak at `model.matmul_precision` is bf16_flops / passes. Derived
# from the docs, not a published figure.
PRECISION_PASSES = {"default": 1, "high": 3, "highest": 6}

# Accelerator types as Cloud TPU names them → (topology, chip). v4 and v5p names count
# TensorCores (2 per chip, one JAX device per chip); v5e (v5litepod) and v6e names count chips.
TARGETS: dict[str, tuple[str, str]] = {
  "v4-8": ("v4:2x2x1", "v4"),
  "v4-16": ("v4:2x2x2", "v4"),
  "v4-32": ("v4:2x2x4", "v4"),
  "v4-64": ("v4:2x4x4", "v4"),
  "v4-128": ("v4:4x4x4", "v4"),
  "v5p-8": ("v5p:2x2x1", "v5p"),
  "v5p-16": ("v5p:2x2x2", "v5p"),
  "v5p-32": ("v5p:2x2x4", "v5p"),
  "v5p-64": ("v5p:2x4x4", "v5p"),
  "v5p-128": ("v5p:4x4x4", "v5p"),
  "v5litepod-1": ("v5e:1x1", "v5e"),
  "v5litepod-4": ("v5e:2x2", "v5e"),
  "v5litepod-8": ("v5e:2x4", "v5e"),
  "v5litepod-16": ("v5e:4x4", "v5e"),
  "v5litepod-32": ("v5e:4x8", "v5e"),
  "v5litepod-64": ("v5e:8x8", "v5e"),
  "v5litepod-128": ("v5e:8x16", "v5e"),
  "v5litepod-256": ("v5e:16x16", "v5e"),
  "v6e-1": ("v6e:1x1", "v6e"),
  "v6e-4": ("v6e:2x2", "v6e"),
  "v6e-8": ("v6e:2x4", "v6e"),
}
RAW_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):\d+(x\d+){1,2}$")
CPU_TARGET = "cpu"  # this machine's devices (what the tests run the trainer on)


class UnknownTargetError(ValueError):
  """A --target that is neither a known accelerator type nor a topology string."""


@dataclasses.dataclass(frozen=True)
class Target:
  """What preflight compiles for: its name, the devices of its mesh and its chip (None: CPU)."""

  name: str
  topology: str
  devices: Sequence[Any]
  chip: ChipSpec | None


def valid_targets_text() -> str:
  return (
    f"valid targets: {', '.join(TARGETS)}, {CPU_TARGET}, a topology "
    "<v4|v5e|v5p|v6e>:<AxB[xC]> (e.g. v5e:2x2, v4:2x2x1), or NVIDIA GPUs in one host "
    f"<{'|'.join(gpus.GPUS)}>x<1-{gpus.MAX_PER_HOST}> (e.g. {', '.join(gpus.TARGETS)})."
  )


def _one_device_per_chip(devices: Sequence[Any]) -> list[Any]:
  """TPU v4's topology lists both TensorCores of a chip; JAX on a v4 runs megacore (one device
  per chip), as `jax.make_mesh` requires: keep core 0 of each chip."""
  return [d for d in devices if getattr(d, "core_on_chip", 0) == 0]


def resolve_target(name: str, slices: int = 1) -> Target:
  """`name` → its devices (TPU device descriptions, or this machine's CPUs for "cpu").

  Args:
    slices: a multi-slice job of this many copies of the slice `name` (TPU only): the devices
      carry their `slice_index`, and the run's mesh spans the slices (`sharding.mesh_of`).
  Raises:
    UnknownTargetError: listing the valid targets; or, for a GPU target, saying what to install.
  """
  if slices < 1:
    raise UnknownTargetError(f"--slices={slices} must be >= 1.")
  if name == CPU_TARGET:
    if slices != 1:
      raise UnknownTargetError("--slices applies to TPU targets only.")
    return Target(name, CPU_TARGET, jax.devices("cpu"), None)
  gpu = gpus.parse_target(name)
  if gpu is not None:
    if slices != 1:
      raise UnknownTargetError("--slices applies to TPU targets only.")
    model, count = gpu
    try:
      devices = gpus.topology_devices(name, CHIPS[model])
    except gpus.GpuTargetError as e:
      raise UnknownTargetError(str(e)) from e
    return Target(name, f"{model}:1x{count}", devices, CHIPS[model])
  if name in TARGETS:
    topology, chip = TARGETS[name]
  elif RAW_TOPOLOGY.match(name):
    topology, chip = name, name.partition(":")[0]
  else:
    raise UnknownTargetError(f"unknown --target {name!r}; {valid_targets_text()}")
  from jax.experimental import topologies

  dims = [int(x) for x in topology.partition(":")[2].split("x")]
  kwargs = {"num_slices": slices} if slices > 1 else {}
  if math.prod(dims) < 4:  # libtpu's default host is 2x2x1 chips: smaller slices are one host
    kwargs["chips_per_host_bounds"] = [*dims, *[1] * (3 - len(dims))]
  try:
    desc = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs)
  except Exception as e:  # libtpu missing or busy, or a topology it rejects
    import importlib.util

    message = str(e).splitlines()[0][:300]
    if importlib.util.find_spec("libtpu") is None:
      hint = " Install libtpu: pip install 'jax[tpu]==0.9.2'."
    elif "lockfile" in message:  # libtpu admits one process at a time unless told otherwise
      hint = " Another process holds libtpu; rerun with ALLOW_MULTIPLE_LIBTPU_LOAD=1."
    else:
      hint = ""
    raise UnknownTargetError(
      f"--target {name!r} ({topology}): no TPU topology ({type(e).__name__}: {message}).{hint} "
      f"{valid_targets_text()}"
    ) from e
  label = f"{name} x {slices} slices" if slices > 1 else name
  return Target(label, topology, _one_device_per_chip(desc.devices), CHIPS[chip])
