"""The method protocol: what a continual-learning method declares to the one trainer.

A method is a subclass of `Method` built from the run plan (`Method(plan)`; no data, weights or
devices). The trainer (`train.run`) owns tasks, seeds, keys, the mesh, prefetching, jit,
checkpoints, evaluation, metrics and hooks; the method says

- what it trains: `model_spec` (the model), `init_proxy_head` / `task_proxy_head` (the head
  and when it is re-drawn), `train_step` (loss and SGD step), `task_aux` (per-task step inputs),
  `epochs` (which tasks take gradient steps at all);
- what it keeps: `init_state` (extra run state the trainer checkpoints, e.g. ridge statistics),
  `step_state` (which of it the train step reads), `feature_dim` (the width of the prototype rows);
- what it does at the end of a task: `ema_after_task`, then `end_of_task` (prototypes, drift
  compensation, ridge statistics), which returns the state it changed and its predictor;
- how it classifies: `feature_fn`, `predict_fn` and `programs` (its own jitted entry points,
  built once by `steps.build_programs`);
- what it supports: `check_plan` (settings it rejects), `supports_stacked_seeds`.

The defaults are those of a prototype classifier on the NTK-CL model with a per-task proxy head
(NTK-CL itself and SimpleCIL override only a few); a new method overrides what differs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntkcl_jax import losses, prototypes
from ntkcl_jax.data import TaskStream
from ntkcl_jax.evaluate import make_predict_fn
from ntkcl_jax.models.ntkcl import NTKCL, ModelSpec
from ntkcl_jax.seed_stack import SeedStack
from ntkcl_jax.train_step import TaskInfo, init_proxy_head, make_feature_fn, make_train_step

if TYPE_CHECKING:
  from ntkcl_jax.plan import RunPlan
  from ntkcl_jax.steps import Programs

Features = Callable[[Any, jax.Array], jax.Array]  # (params, images (b, H, W, C)) → (b, D)
# images → (top-1 (b,), top-k (b, k)); with a leading seed axis in a stacked run
Predictor = Callable[[jax.Array], tuple[jax.Array, jax.Array]]
ApplySeeds = Callable[[Callable[..., Any], Any, list[np.ndarray]], list[tuple[Any, np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class TaskEnd:
  """What a method reads at the end of task t (the trainer builds it; read-only).

  Attributes:
    task, last: t, and whether t is the sequence's last task (also when `max_tasks` truncates).
    task_start, num_new: k_t and s_t (task t holds labels [k_t, k_t + s_t)).
    params: the run's evaluation parameters {backbone, peft: {current, ema}, fusion} after the
      EMA update (stacked over seeds when the run is).
    state: the run state (trainer's dict: "train", "ema", "prototypes", "reg_snapshot", and the
      method's `init_state` keys), before this task's end-of-task changes.
    ema_before: the EMA bank before `ema_after_task`.
    frozen_backbone: the backbone as the compiled functions take it.
    programs: the run's jitted functions (`steps.Programs`).
    streams: per seed, its task stream. stack: the run's seeds (`SeedStack`).
    apply_seeds: `(fn, params, indices per seed) → per seed (fn(params, images), labels)` over
      training images with the eval transform.
  """

  task: int
  last: bool
  task_start: int
  num_new: int
  params: Any
  state: Mapping[str, Any]
  ema_before: Any
  frozen_backbone: Any
  programs: Programs
  streams: Sequence[TaskStream]
  stack: SeedStack
  apply_seeds: ApplySeeds

  @property
  def num_seen(self) -> int:
    return self.task_start + self.num_new

  def task_indices(self) -> list[np.ndarray]:
    """Per seed, the training indices of task t."""
    return [st.train_indices(self.task) for st in self.streams]


@dataclasses.dataclass(frozen=True)
class ProgramParts:
  """What `Method.programs` builds its jitted functions from (`steps.build_programs`).

  Attributes:
    model: the method's model. stack: the run's seeds (`stack.vmap` over them).
    jit: jit with the run's matmul precision. param_axes: in_axes of the eval parameters.
    features: the run's jitted feature function (vmapped over seeds when stacked).
  """

  model: NTKCL
  stack: SeedStack
  jit: Callable[[Callable[..., Any]], Callable[..., Any]]
  param_axes: dict[str, Any]
  features: Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class TaskResult:
  """What `end_of_task` returns: run state it replaces, its predictor, per-seed stage fields."""

  state: dict[str, Any]
  predict: Predictor
  stage_info: list[dict[str, Any]]


class Method:
  """Base of every method; see the module docstring for the hooks.

  Class attributes:
    one_task: the method trains all classes as one task (joint training is a data schedule).
    takes_steps: whether the method trains at all (SimpleCIL does not).
    accepts_ridge_head: whether `eval.head=ridge` applies to it.
  """

  one_task: ClassVar[bool] = False
  takes_steps: ClassVar[bool] = True
  accepts_ridge_head: ClassVar[bool] = False

  def __init__(self, plan: RunPlan):
    self.plan = plan

  # -- what it supports ----------------------------------------------------------------------------

  @classmethod
  def model_spec(cls, spec: ModelSpec) -> ModelSpec:
    """The model the method trains, from the configured one."""
    return spec

  @classmethod
  def check_plan(cls, plan: RunPlan) -> None:
    """Raises ValueError for settings the method cannot run."""
    if plan.eval_head == "ridge" and not cls.accepts_ridge_head:
      raise ValueError(
        f"eval.head=ridge applies to method=ntkcl (ranpac always uses it), not "
        f"method={plan.method!r}."
      )

  @property
  def supports_stacked_seeds(self) -> bool:
    """Whether `config.seeds` may stack several seeds in one vmapped step."""
    return True

  @property
  def why_not_stacked(self) -> str:
    """The reason, when `supports_stacked_seeds` is False (one sentence, for the error)."""
    return "this method trains one seed per process."

  @property
  def spec(self) -> ModelSpec:
    return self.plan.spec

  # -- what it trains ------------------------------------------------------------------------------

  def default_adapt_tasks(self, num_tasks: int) -> int:
    """Leading tasks that take training steps when `train.adapt_tasks` is -1."""
    return num_tasks

  def adapt_tasks(self, num_tasks: int) -> int:
    """How many leading tasks take training steps (`train.adapt_tasks`; -1: the default)."""
    k = self.plan.adapt_tasks
    return min(self.default_adapt_tasks(num_tasks) if k < 0 else k, num_tasks)

  def epochs(self, task: int, num_tasks: int) -> int:
    """Epochs of task `task` (0: no gradient steps; the task still ends and is evaluated)."""
    if not self.takes_steps or task >= self.adapt_tasks(num_tasks):
      return 0
    return self.plan.epochs

  def init_proxy_head(self, root_key: jax.Array) -> dict[str, jax.Array]:
    """The head in the run state at init: zeros of the per-task head's layout."""
    head = functools.partial(
      init_proxy_head, feature_dim=self.spec.feature_dim, width=self.plan.head_width
    )
    shapes = jax.eval_shape(head, root_key)
    return jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)

  def task_proxy_head(self, task_key: jax.Array) -> dict[str, jax.Array] | None:
    """The head a task starts from (SPEC 2.4 step 1); None keeps the previous one."""
    return init_proxy_head(
      jax.random.fold_in(task_key, 0), self.spec.feature_dim, self.plan.head_width
    )

  def train_step(self, model: NTKCL, tx: optax.GradientTransformation) -> Callable[..., Any]:
    """(state, frozen, aux, batch, key, lr) → (state, terms): one seed's SGD step."""
    return make_train_step(model, self.plan.loss_weights, tx, self.plan.batch_size)

  def task_aux(
    self, protos: np.ndarray, task: int, task_start: int, num_new: int
  ) -> dict[str, Any]:
    """One seed's host inputs of task t's steps: `TaskInfo` and the L_orth basis.

    `protos`: that seed's (C, D) prototypes before the task.
    """
    p, q = self.plan, self.plan.quirks
    n_old = losses.mi_old_rows(
      task_start + num_new,
      task_start,
      p.data.increment,
      known_only=q.mi_old_rows == "known_only",
    )
    info = TaskInfo.make(task_start, num_new, n_old, task > 0 or q.reg_at_task0)
    seen = protos[: task_start + num_new]
    if q.orth_loss == "signed_residual_sum":
      basis = losses.orthogonality_basis(seen, p.svd_k)
    else:
      basis = losses.old_subspace_basis(seen, task_start, p.svd_k)
    return {"task": info, "orth_basis": basis}

  # -- what it keeps -------------------------------------------------------------------------------

  @property
  def feature_dim(self) -> int:
    """D of the prototype rows (the run state's (C, D) "prototypes")."""
    return self.spec.feature_dim

  def init_state(self) -> dict[str, jax.Array]:
    """Run state of the method's own, checkpointed with the rest (one seed's)."""
    return {}

  @property
  def step_state(self) -> tuple[str, ...]:
    """Keys of `init_state` the train step reads: passed in its aux (`task_loop.frozen_and_aux`)."""
    return ()

  # -- how it classifies ---------------------------------------------------------------------------

  @property
  def section_weights(self) -> tuple[float, ...]:
    """ω of the cosine logits' sections (one section by default)."""
    return (1.0,)

  def feature_fn(self, model: NTKCL) -> Features:
    """The eval-mode feature the prototypes are means of."""
    return make_feature_fn(model)

  def predict_fn(self, model: NTKCL) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """(params, prototypes (C, D), num_seen, images) → (top-1, top-k): the cosine classifier."""
    return make_predict_fn(self.feature_fn(model), self.section_weights)

  def programs(self, parts: ProgramParts) -> dict[str, Callable[..., Any]]:
    """The method's own jitted functions beyond features and predict (none by default)."""
    return {}

  # -- end of task ---------------------------------------------------------------------------------

  def ema_after_task(self, ema: Any, current: Any, task: int, last: bool) -> Any:
    """The EMA bank after task `task` (default: unchanged)."""
    return ema

  def refresh(self) -> str:
    """The Q6 refresh of old prototype rows (`prototypes.REFRESH`)."""
    return "never"

  def new_prototypes(self, end: TaskEnd, new: list[tuple[np.ndarray, np.ndarray]]) -> Any:
    """The run's prototypes after task t (`prototypes.update_after_task`), placed on the mesh.

    `new`: per seed, (features, labels) of task t's training images under `end.params`.
    """
    stack, state, t = end.stack, end.state, end.task
    features = end.programs.features

    @functools.cache
    def old_feats():  # the end-of-previous-task model: reg snapshot + the EMA bank before update
      snap = state["reg_snapshot"]
      old = {
        "backbone": end.frozen_backbone,
        "peft": {"current": snap["peft"], "ema": end.ema_before},
        "fusion": snap["fusion"],
      }
      return end.apply_seeds(features, old, end.task_indices())

    @functools.cache
    def seen_feats():
      seen = [np.concatenate([st.train_indices(s) for s in range(t)]) for st in end.streams]
      return end.apply_seeds(features, end.params, seen)

    protos = [
      prototypes.update_after_task(
        protos,
        end.task_start,
        end.num_new,
        *new[i],
        refresh=self.refresh(),
        old_feats=lambda i=i: old_feats()[i][0],
        seen_feats=lambda i=i: seen_feats()[i],
      )
      for i, protos in enumerate(stack.host(state["prototypes"]))
    ]
    return stack.put(stack.stack(protos))

  def prototype_result(
    self, end: TaskEnd
  ) -> tuple[TaskResult, list[tuple[np.ndarray, np.ndarray]]]:
    """The prototype classifier after task t, and per seed the (features, labels) it used."""
    new = end.apply_seeds(end.programs.features, end.params, end.task_indices())
    protos = self.new_prototypes(end, new)
    predict = functools.partial(end.programs.predict, end.params, protos, end.num_seen)
    return TaskResult({"prototypes": protos}, predict, [{} for _ in end.streams]), new

  def end_of_task(self, end: TaskEnd) -> TaskResult:
    """Class means of task t's features become its prototype rows; predict by cosine."""
    return self.prototype_result(end)[0]
