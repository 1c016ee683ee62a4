"""The preflight report as text."""

from __future__ import annotations

from typing import Any

# JAX's default XLA_PYTHON_CLIENT_MEM_FRACTION on GPUs (docs.jax.dev, "GPU memory allocation").
GPU_MEM_FRACTION = 0.75


def mib(x: float | None) -> str:
  if x is None:
    return "—"
  if abs(x) < 2**20:
    return f"{x / 2**10:,.1f} KiB"
  return f"{x / 2**20:,.1f} MiB"


def _num(x: float | None, unit: str = "") -> str:
  if x is None:
    return "—"
  for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale * (1 - 5e-4):  # 999.7e9 reads "1 T", not "1e+03 G"
      return f"{x / scale:.3g} {prefix}{unit}"
  return f"{x:.3g} {unit}"


def format_report(report: dict[str, Any]) -> str:
  chip = report["chip"]
  lines = [
    f"preflight {report['target']} ({report['topology']}): {report['devices']} x "
    f"{report['device_kind']}, mesh {report['mesh']}; method {report['method']}, seeds "
    f"{report['seeds']}{' stacked' if report['stacked'] else ''}, batch {report['batch_size']} "
    f"(eval {report['eval_batch_size']}), precision {report['matmul_precision']}, remat "
    f"{report['remat']}",
    "Compile-time estimates for the target (XLA memory/cost analysis of a deviceless compile), "
    "not measurements.",
  ]
  if chip and chip.get("fp32_flops") is not None:
    lines.append(
      f"GPU: {report['environment']['estimate']}. FLOPs are the matmuls and convolutions of the "
      "optimised HLO (no cost analysis); the roofline bound is compute-only. JAX preallocates "
      f"{GPU_MEM_FRACTION:.0%} of GPU memory by default: a peak above that needs "
      "XLA_PYTHON_CLIENT_MEM_FRACTION raised."
    )
  for r in report["functions"]:
    if "compile_error" in r:
      lines.append(
        f"\n{r['function']} ({r['images_per_call']} images/call): DOES NOT FIT in "
        f"{mib(r['hbm_bytes'])} HBM; XLA refused to compile it: {r['compile_error']}"
      )
      continue
    m = r["memory_per_device"]
    fit = ""
    if "fits" in r:
      verdict = "fits" if r["fits"] else "DOES NOT FIT"
      fit = f" of {mib(r['hbm_bytes'])} HBM: {verdict} (margin {mib(r['margin_bytes'])})"
    lines += [
      f"\n{r['function']} ({r['images_per_call']} images/call, compiled in {r['compile_s']} s)",
      f"  memory/device: argument {mib(m['argument_bytes'])}, output {mib(m['output_bytes'])}, "
      f"aliased {mib(m['aliased_bytes'])}, temp {mib(m['temp_bytes'])}; "
      f"peak {mib(m['peak_bytes'])}{fit}",
      f"  FLOPs ({r['flops_source']}): {_num(r['flops_per_device'], 'FLOP')}/device/call, "
      f"{_num(r['flops_per_image'], 'FLOP')}/image (analytic matmuls: "
      f"{_num(r['analytic_matmul_flops_per_image'], 'FLOP')}/image); bytes accessed "
      f"{mib(r['bytes_accessed_per_device'])}/device",
    ]
    coll = r["collectives"]
    lines.append(
      "  collectives: "
      + (
        ", ".join(f"{k} x{v['count']} ({mib(v['bytes'])})" for k, v in sorted(coll.items()))
        or "none"
      )
    )
    if "roofline_bound" in r:
      b = r["roofline_bound"]
      only = ", matmuls only: no bytes-accessed estimate" if b.get("compute_only") else ""
      lines.append(
        f"  roofline upper bound: {b['images_per_s_upper_bound']:,.0f} images/s "
        f"({b['bound_by']}-bound{only}; a bound from {chip['source']} peaks, not a measurement)"
      )
  if report.get("ntk"):
    n = report["ntk"]
    lines.append(
      f"\nntk_block: the NTK hook's kernel for two blocks of {n['block']} probes (of "
      f"{n['probes']}; analysis.batch_size), on one device"
    )
  if report["not_compiled"]:
    lines.append(f"\nnot compiled (method programs): {', '.join(report['not_compiled'])}")
  return "\n".join(lines)
