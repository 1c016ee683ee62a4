"""Adaptive EMA of the PEFT bank (SPEC 2.3) as pure pytree maps."""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp


def ema_rates(task: int) -> tuple[float, float]:
  """(r0, r1) after training task t: (0, 1) at t = 0, (t/(t+1), 1/(t+1)) for t ≥ 1."""
  if task < 0:
    raise ValueError(f"task must be >= 0, got {task}.")
  return (0.0, 1.0) if task == 0 else (task / (task + 1), 1.0 / (task + 1))


@jax.jit
def _blend(ema: Any, current: Any, r0: jax.Array, r1: jax.Array) -> Any:
  # r0, r1 are traced float32 scalars, cast to each leaf's dtype as a Python float would be: one
  # compilation serves every task, with the same arithmetic as constant rates.
  return jax.tree_util.tree_map(
    lambda e, c: r0.astype(e.dtype) * e + r1.astype(c.dtype) * c, ema, current
  )


def ema_update(ema: Any, current: Any, task: int) -> Any:
  """θ_ema ← r0·θ_ema + r1·θ_cur leaf by leaf (SPEC 2.3).

  Applied after every task t (the reference skips t = T−1, quirk Q5), it makes θ_ema^(t) the
  running mean (1/(t+1))·Σ_{s≤t} θ_cur^(s) of the end-of-task snapshots.

  Args:
    ema, current: PEFT banks with identical tree structure and shapes.
    task: t, the task just trained (a Python int; the rates enter the compiled update as traced
      scalars, so it compiles once per bank layout, not once per task).
  """
  chex.assert_trees_all_equal_shapes(ema, current)
  r0, r1 = ema_rates(task)
  return _blend(ema, current, jnp.float32(r0), jnp.float32(r1))
