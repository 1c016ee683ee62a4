"""Adaptive EMA of the PEFT bank (SPEC 2.3) as pure pytree maps."""

from __future__ import annotations

from typing import Any

import chex
import jax


def ema_rates(task: int) -> tuple[float, float]:
  """(r0, r1) after training task t: (0, 1) at t = 0, (t/(t+1), 1/(t+1)) for t ≥ 1."""
  if task < 0:
    raise ValueError(f"task must be >= 0, got {task}.")
  return (0.0, 1.0) if task == 0 else (task / (task + 1), 1.0 / (task + 1))


def ema_update(ema: Any, current: Any, task: int) -> Any:
  """θ_ema ← r0·θ_ema + r1·θ_cur leaf by leaf (SPEC 2.3).

  Applied after every task t (the reference skips t = T−1, quirk Q5), it makes θ_ema^(t) the
  running mean (1/(t+1))·Σ_{s≤t} θ_cur^(s) of the end-of-task snapshots.

  Args:
    ema, current: PEFT banks with identical tree structure and shapes.
    task: t, the task just trained.
  """
  chex.assert_trees_all_equal_shapes(ema, current)
  r0, r1 = ema_rates(task)
  return jax.tree_util.tree_map(lambda e, c: r0 * e + r1 * c, ema, current)
