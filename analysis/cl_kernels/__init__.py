"""Continual-learning kernel algebra on empirical-NTK block matrices (SPEC 7.3-7.8) [PROJ].

Everything in this module is this project's formulation ([PROJ]) on standard NTK continual-learning
theory: the kernel (lazy) regime, kernel ridge regression and Rademacher-style bounds. The paper's own
equations, theorems and bound constants are unknown ([UNK], SPEC 9); nothing here claims to be them.

Input is one measurement: a Gram matrix `theta` of shape (N, N) over the concatenation of every
task's probe rows (train probes X_i^tr and test probes X_i^te, seen and unseen tasks alike), held in a
`BlockKernel` together with the row layout (task, split, global label) and the task class ranges
[k_t, k_t + s_t). `theta` is the scalar kernel of `analysis.ntk.empirical_ntk_fn` with the default
`trace_axes=(-1,)`, i.e. averaged (not summed) over outputs; for a model whose outputs share one
scalar kernel (a per-output-independent linear head) the full kernel is exactly theta (x) I_C;
for other models the predictor treats the output-averaged kernel as that shared kernel [PROJ].

Numerics (SPEC 7.8): float64 on the host; every Gram is symmetrised on entry; ridge systems are
solved by Cholesky; eigenvalues are clipped at 0 wherever a spectrum is used (mu_min, lambda_min,
effective rank, overlap). Pure NumPy/SciPy: no JAX is imported here.

Modules, one per SPEC section: `layout` (`BlockKernel`, 7.3), `blocks` (ρ, q, intra retention, 7.4),
`predictor` (sequential kernel predictor of forgetting, `correlate`, 7.5), `gaps` (gap terms and the
λ / sample-size sweeps, 7.6), `dynamics` (task overlap, spectrum, velocity, alignment, 7.7). Every
public name is importable from this package (`from analysis import cl_kernels as ck; ck.gap_terms`).

Example:
  >>> kernel = BlockKernel.from_task_probes(theta, train_labels, test_labels, [(0, 2), (2, 2)])
  >>> result = sequential_kernel_predictor(kernel, lambda_rel=1e-2)
  >>> result.accuracy           # (T, T) predicted R-hat[t, s] in %, NaN above the diagonal
  >>> gaps = gap_terms(result)  # task-interplay I, its bound I-bar, G_s, e_s, E_s
  >>> block_ratio_rho(kernel.blocks("all"))  # (T, T) inter/intra block ratio
"""

from analysis.cl_kernels.blocks import (
  block_ratio_rho,
  intra_retention,
  intra_retention_matrix,
  mean_inter_ratio,
  normalized_ratio_q,
)
from analysis.cl_kernels.dynamics import (
  Overlap,
  kernel_distance,
  kernel_dynamics,
  kernel_label_alignment,
  kernel_velocity,
  spectrum_stats,
  task_overlap,
  task_overlap_matrix,
)
from analysis.cl_kernels.gaps import (
  SAMPLE_SIZES,
  GapTerms,
  SweepPoint,
  gap_terms,
  lambda_sweep,
  sample_size_sweep,
)
from analysis.cl_kernels.layout import (
  BlockKernel,
  Split,
  tripled_block_kernel,
)
from analysis.cl_kernels.predictor import (
  LAMBDA_REL_GRID,
  Correlation,
  MetricsFn,
  Mode,
  PredictorResult,
  correlate,
  sequential_kernel_predictor,
  task_targets,
)

__all__ = [
  "LAMBDA_REL_GRID",
  "SAMPLE_SIZES",
  "BlockKernel",
  "Correlation",
  "GapTerms",
  "MetricsFn",
  "Mode",
  "Overlap",
  "PredictorResult",
  "Split",
  "SweepPoint",
  "block_ratio_rho",
  "correlate",
  "gap_terms",
  "intra_retention",
  "intra_retention_matrix",
  "kernel_distance",
  "kernel_dynamics",
  "kernel_label_alignment",
  "kernel_velocity",
  "lambda_sweep",
  "mean_inter_ratio",
  "normalized_ratio_q",
  "sample_size_sweep",
  "sequential_kernel_predictor",
  "spectrum_stats",
  "task_overlap",
  "task_overlap_matrix",
  "task_targets",
  "tripled_block_kernel",
]
