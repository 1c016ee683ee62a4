"""Comparing two different compiled programs: tolerances, near-tie-aware predictions, the guard.

What the suite treats as guaranteed, and how it compares:

- **The same program rerun on the same inputs** (resume after SIGKILL, a rerun of a finished run,
  a truncated run's first tasks, one configuration run twice) gives identical bits: those tests
  compare exactly.
- **Two different programs that compute the same thing** (K stacked seeds vs K single runs, a
  vmapped step vs a loop of single steps, 8 devices vs 1, 2 processes vs 1) sum float32 terms in
  different orders. XLA fixes that order per compiled program and per CPU, not across program
  shapes or machines, so such pairs are compared with the tolerances below, and their predictions
  must be identical except at *near-ties*: test images whose top-2 logit margin is below
  `LOGIT_ATOL` in either run may flip, and are counted rather than required equal. Accuracies
  (R, A_t, old/new, task-id, top-5, Ā, A_T, forgetting, BWT) then differ by at most what the
  counted near-ties can move; with no near-tie (every case measured so far) they are identical.

Where the numbers come from: jax 0.9.2 on a 2-core AMD EPYC (family 25 model 17, AVX-512), the
tiny configs of `tiny_configs`, largest differences between such program pairs with XLA's
optimisations off (the suite) / on with AVX2 code (the guard below):

  quantity, programs compared                          suite      guard      tolerance here
  loss terms, grad norm, relative: stacked vs single   5.0e-7     1.0e-6     LOSS_RTOL 1e-4
    K = 3 vmapped step vs 3 single steps               3.2e-7     4.4e-7
  L_orth (reference Q4: a signed sum that cancels to    1.0e-6     7.3e-7     ORTH_ATOL 1e-5
    ~1e-6, so absolute): stacked vs single
  parameters and optimiser state, relative to the      3.3e-6     9.8e-7     STATE_RTOL 1e-4
    leaf's largest |x|: K = 3 vmapped vs single
    K = 4 seeds on a 4 x 2 mesh vs 1 device            2.2e-6     -
  prototypes (|μ| ≤ 2.9), absolute: stacked vs single  2.4e-7     2.4e-7     PROTOTYPE_ATOL 1e-5
  NTK Θ after training, relative to max |Θ|            2.4e-7     1.2e-7     KERNEL_RTOL 1e-5
  predictions: differing / near-ties / smallest top-2   0/0/9e-5   0/0/9e-5   LOGIT_ATOL 1e-5
    margin, stacked vs single and 1 vs 8 devices

Each tolerance is 10 to 100 times the largest measured difference (float32 ε = 1.2e-7; a few
Adam steps amplify reordering noise in near-zero gradient entries, hence the state figures), and
far below what a real defect moves: giving every stacked seed seed 0's class order moves seed 1's
cross-entropies by 2-3 %, its gradient norm by 64 % and 7 of its 16 stage-0 test predictions
(with margins ≥ 1e-5), and `test_stacked_run` fails.

**The guard.** `NTKCL_NUMERICS_GUARD=1 pytest -m numerics` runs the numerically sensitive tests
(marked `numerics`) under a perturbed but valid float32 computation: XLA's optimisation pipeline
on (`JAX_DISABLE_MOST_OPTIMIZATIONS=0`: other fusions, so other summation orders) and XLA's CPU
code generation capped at AVX2 (`--xla_cpu_max_isa=AVX2`: other vector widths in reductions on
AVX-512 machines). `conftest.py` applies it to this process and `tiny_configs.subprocess_env` to
every child process, so a test that passes only because two programs happened to round alike on
the developer's CPU fails there, not on the next machine.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

LOSS_RTOL = 1e-4
ORTH_ATOL = 1e-5
STATE_RTOL = 1e-4
PROTOTYPE_ATOL = 1e-5
KERNEL_RTOL = 1e-5
LOGIT_ATOL = 1e-5
# Leaves whose largest magnitude is below this are numerically zero (dead parameters, ~1e-15):
# compared absolutely against it, not relative to their own size.
SCALE_FLOOR = 1e-3

GUARD_ENV = "NTKCL_NUMERICS_GUARD"
GUARD_XLA_FLAGS = ("--xla_cpu_max_isa=AVX2",)

# Fields of metrics lines and summaries that are functions of the predictions (percentages).
ACCURACY_KEYS = frozenset(
  {"R_row", "R", "A", "old", "new", "task_id", "top5", "accuracy_matrix"}
  | {"avg_acc", "last_acc", "forgetting", "bwt"}
)


def guard_on() -> bool:
  """Whether `NTKCL_NUMERICS_GUARD` asks for the perturbed float32 computation."""
  return os.environ.get(GUARD_ENV, "") not in ("", "0")


def optimizations_disabled_env() -> str:
  """`JAX_DISABLE_MOST_OPTIMIZATIONS` for this process and its children: "0" under the guard,
  else what the environment says, by default "1" (the suite compiles many small programs, and
  XLA's full pipeline would dominate its time)."""
  return "0" if guard_on() else os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")


def xla_flags(num_devices: int) -> str:
  """`XLA_FLAGS` for a child process: `num_devices` CPU devices, plus the guard's flags."""
  flags = [f"--xla_force_host_platform_device_count={num_devices}"]
  return " ".join([*flags, *(GUARD_XLA_FLAGS if guard_on() else ())])


def max_difference(a: Any, b: Any) -> tuple[float, float]:
  """(max |a - b|, max relative difference) over the leaves of two pytrees (or arrays).

  A leaf's relative difference is max |a - b| / max(max |b|, SCALE_FLOOR).
  """
  import jax

  def one(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert x.shape == y.shape, (x.shape, y.shape)
    d = float(np.max(np.abs(x - y), initial=0.0))
    return np.array([d, d / max(float(np.max(np.abs(y), initial=0.0)), SCALE_FLOOR)])

  pairs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(one, a, b))
  return max((float(p[0]) for p in pairs), default=0.0), max(
    (float(p[1]) for p in pairs), default=0.0
  )


def assert_trees_close(got: Any, want: Any, rtol: float = STATE_RTOL, what: str = "") -> None:
  """Same tree structure and shapes; every leaf within `rtol` of `want` (see `max_difference`)."""
  import jax

  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want), what
  diff = max_difference(got, want)
  assert diff[1] <= rtol, f"{what}: (abs, rel) difference {diff} > rtol {rtol}"


# ------------------------------------------------------------------------------------------------
# Predictions and near-ties.


class PredictionRecorder:
  """A trainer hook (`ntkcl_jax.hooks.TaskHook`) recording, after each task, every seen test
  image's top-1 prediction and top-2 logit margin under the prototype classifier.

  `stages[t]` = {"top1": (n,) int, "margin": (n,) float, "label": (n,) int, "task": (n,) int}
  over `stream.test_indices(t)`, logits = the section-weighted cosine logits over seen classes.
  """

  def __init__(self, section_weights: Sequence[float], batch_size: int = 64):
    self.section_weights = tuple(section_weights)
    self.batch_size = batch_size
    self.stages: list[dict[str, np.ndarray]] = []

  def on_init(self, view) -> None:
    del view

  def on_task_end(self, view) -> None:
    from ntkcl_jax.models.heads import section_weighted_logits

    stream = view.stream
    indices = stream.test_indices(view.task)
    feats, labels = [], []
    for batch in stream.eval_batches(indices, self.batch_size, "test"):
      valid = np.asarray(batch["mask"], bool)
      feats.append(np.asarray(view.features(view.params, batch["image"]))[valid])
      labels.append(np.asarray(batch["label"])[valid])
    logits = np.asarray(
      section_weighted_logits(
        np.concatenate(feats), np.asarray(view.prototypes), self.section_weights
      )
    )[:, : view.num_seen]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    label = np.concatenate(labels)
    self.stages.append(
      {
        "top1": logits.argmax(-1),
        "margin": top2[:, 1] - top2[:, 0],
        "label": label,
        "task": np.asarray(stream.task_of_label)[label],
      }
    )

  def summary(self) -> dict[str, Any]:
    return {}

  def save(self, path) -> None:
    np.savez(
      path,
      **{f"{k}_{t}": v for t, stage in enumerate(self.stages) for k, v in stage.items()},
    )

  @staticmethod
  def load(path) -> list[dict[str, np.ndarray]]:
    with np.load(path) as z:
      n = 1 + max(int(k.rpartition("_")[2]) for k in z.files)
      return [{k: z[f"{k}_{t}"] for k in ("top1", "margin", "label", "task")} for t in range(n)]


def final_predictions(config, workdir, seed: int | None = None) -> list[dict[str, np.ndarray]]:
  """`PredictionRecorder` stages of a finished run's last checkpoint (one stage: the last task),
  for runs no hook could watch (CLI subprocesses). Earlier task ends are not kept on disk."""
  import types

  import jax

  from ntkcl_jax import config as config_lib
  from ntkcl_jax import run_state
  from ntkcl_jax.models.ntkcl import NTKCL
  from ntkcl_jax.train_step import make_feature_fn

  run = run_state.load_run(config, workdir, seed=seed)
  view = types.SimpleNamespace(
    task=run.tasks_done - 1,
    params=run.params,
    prototypes=run.prototypes,
    num_seen=run.num_seen,
    stream=run.stream,
    features=jax.jit(make_feature_fn(NTKCL(run.spec))),
  )
  recorder = PredictionRecorder(config_lib.section_weights(config))
  recorder.on_task_end(view)
  return recorder.stages


def near_tie_allowance(
  got: Sequence[Mapping[str, np.ndarray]],
  want: Sequence[Mapping[str, np.ndarray]],
  logit_atol: float = LOGIT_ATOL,
) -> tuple[int, float]:
  """Checks recorded predictions of two runs; returns (near-ties, accuracy allowance in %).

  Asserts per stage: the same test images (labels), and identical top-1 predictions wherever
  both runs' top-2 margins are ≥ `logit_atol`. The allowance is how far any accuracy percentage
  over one task's test images (or a union of them) may move: 100 · (near-ties of the stage with
  most) / (the smallest task's test size), doubled for differences of accuracies (forgetting,
  BWT); 0.0 when there is no near-tie.
  """
  assert len(got) == len(want), (len(got), len(want))
  ties, allowance = 0, 0.0
  for t, (g, w) in enumerate(zip(got, want)):
    np.testing.assert_array_equal(g["label"], w["label"], err_msg=f"stage {t}: test images")
    tie = (g["margin"] < logit_atol) | (w["margin"] < logit_atol)
    differ = g["top1"] != w["top1"]
    assert not (differ & ~tie).any(), (
      f"stage {t}: {int((differ & ~tie).sum())} of {differ.size} predictions differ with a "
      f"top-2 margin ≥ {logit_atol}"
    )
    n = int(tie.sum())
    ties += n
    smallest = min(np.bincount(w["task"])[np.unique(w["task"])])
    allowance = max(allowance, 2 * 100.0 * n / smallest)
  return ties, allowance


# ------------------------------------------------------------------------------------------------
# Metrics lines and summaries.


def assert_records_close(got: Any, want: Any, accuracy_atol: float = 0.0, path: str = "") -> None:
  """Recursively: same keys, lengths, strings, ints, bools and Nones; floats close by field.

  Accuracy fields (`ACCURACY_KEYS`, and everything under them) within `accuracy_atol` (from
  `near_tie_allowance`; 0.0 = identical); `orth` within ORTH_ATOL absolute; timing fields (a
  key containing "time") are skipped; every other float within LOSS_RTOL relative.
  """
  _assert_close(got, want, accuracy_atol, path, field="")


def _assert_close(got: Any, want: Any, accuracy_atol: float, path: str, field: str) -> None:
  """`assert_records_close` at `path`; `field` is the dict key the value sits under (list items
  inherit their list's), which picks the tolerance."""
  if isinstance(want, Mapping):
    assert isinstance(got, Mapping), path
    keys = {k for k in want if "time" not in k}
    assert {k for k in got if "time" not in k} == keys, f"{path}: keys differ"
    for k in sorted(keys):
      _assert_close(got[k], want[k], accuracy_atol, f"{path}/{k}", k)
    return
  if isinstance(want, (list, tuple)):
    assert isinstance(got, (list, tuple)) and len(got) == len(want), f"{path}: lengths differ"
    for i, (g, w) in enumerate(zip(got, want)):
      _assert_close(g, w, accuracy_atol, f"{path}/{i}", field)
    return
  if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
    if field in ACCURACY_KEYS:
      assert abs(got - want) <= accuracy_atol, f"{path}: {got} vs {want} (±{accuracy_atol})"
    elif field == "orth":
      assert abs(got - want) <= ORTH_ATOL, f"{path}: {got} vs {want} (±{ORTH_ATOL})"
    else:
      assert math.isclose(got, want, rel_tol=LOSS_RTOL, abs_tol=1e-9), f"{path}: {got} vs {want}"
    return
  assert type(got) is type(want) and got == want, f"{path}: {got!r} vs {want!r}"
