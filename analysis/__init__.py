"""Empirical-NTK continual-learning diagnostics of NTK-CL (SPEC 7) [PROJ].

Everything here is this project's formulation on standard NTK continual-learning theory; the
paper's theorems are unknown ([UNK], SPEC 9). Importing this package needs neither
neural-tangents (`nt_compat.install()` is only called by the `neural_tangents` backend) nor
matplotlib (`analysis.plots` imports it inside its functions).

Modules: `ntk` (empirical_ntk_fn; its internals in `ntk_kernels`, `ntk_dispatch`), `nt_compat`,
`cl_kernels` (package: layout, blocks ρ and q, predictor, gap terms and sweeps, dynamics),
`probes` (probe sets), `measure` (the SPEC 7.1 function and one measurement), `summary` (the
summary.json section), `hook` (training hook, standalone runners), `plots` (figures).
"""

from analysis import nt_compat
from analysis.cl_kernels import (
  BlockKernel,
  block_ratio_rho,
  correlate,
  gap_terms,
  lambda_sweep,
  normalized_ratio_q,
  sample_size_sweep,
  sequential_kernel_predictor,
)
from analysis.hook import (
  NTKHook,
  NTKSettings,
  load_points,
  measure_checkpoint,
  ntk_from_params,
  save_point,
)
from analysis.measure import make_output_fn, projection_matrix, split_params
from analysis.ntk import empirical_ntk_fn, restrict_to_subtree
from analysis.probes import ProbeSet, build_probes
from analysis.summary import analyze

__all__ = [
  "BlockKernel",
  "NTKHook",
  "NTKSettings",
  "ProbeSet",
  "analyze",
  "block_ratio_rho",
  "build_probes",
  "correlate",
  "empirical_ntk_fn",
  "gap_terms",
  "lambda_sweep",
  "load_points",
  "make_output_fn",
  "measure_checkpoint",
  "normalized_ratio_q",
  "nt_compat",
  "ntk_from_params",
  "projection_matrix",
  "restrict_to_subtree",
  "sample_size_sweep",
  "save_point",
  "sequential_kernel_predictor",
  "split_params",
]
