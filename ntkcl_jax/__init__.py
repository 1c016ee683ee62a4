"""ntkcl-jax: NTK-CL (arXiv 2407.17120) in JAX/Flax linen, reproducing the released code.

Public API (what `analysis/`, `experiments/` and notebooks use):
  ModelSpec, NTKCL, init_params          the network (models/ntkcl.py)
  ViTSpec, VisionTransformer, load_augreg the backbone and its strict AugReg loader
  section_weighted_logits                 the prototype logits the evaluation ranks (SPEC 1.6)
  base_config, validate, resolve_quirks   configuration (config.py)
  init_key                                the key of a run's init parameters (config.py)
  build_stream, initial_params, load_run  a run's stream, init parameters and a checkpoint's
  RunState                                evaluation state (run_state.py)
  data.TaskStream, data.ArraySource, ...  the input pipeline: the names of `data.__all__` (data/)
  prefetch                                background batch building and host-to-device copies
  TaskHook, TaskView                      trainer hooks (hooks.py)
  run                                     the trainer (train.py)

Assembly: the trainer builds every run from these, and so do the tools that build the same
functions outside it (preflight, `experiments/benchmarks`):
  plan.resolve, plan.RunPlan              the config resolved once into the run plan (plan.py)
  methods.method_class, methods.build     the configured method behind its protocol (methods/)
  SeedStack                               one plain run or K stacked seeds: mesh and placement
  steps.build_programs, steps.Programs    every jitted function of a run (steps.py)
  TrainState, Health, TaskSchedule        the train step's carried state and per-task inputs
  split_trainable, reg_targets            the trainable/frozen partition and L_reg's targets
  loss_fn                                 the training loss (a verifier entry point, README)
"""

from ntkcl_jax.config import base_config, init_key, resolve_quirks, validate
from ntkcl_jax.data.prefetch import prefetch
from ntkcl_jax.hooks import TaskHook, TaskView
from ntkcl_jax.models.heads import section_weighted_logits
from ntkcl_jax.models.ntkcl import NTKCL, ModelSpec, init_params
from ntkcl_jax.models.vit import VisionTransformer, ViTSpec, load_augreg
from ntkcl_jax.run_state import RunState, build_stream, initial_params, load_run
from ntkcl_jax.seed_stack import SeedStack
from ntkcl_jax.train import run
from ntkcl_jax.train_step import (
  Health,
  TaskSchedule,
  TrainState,
  loss_fn,
  reg_targets,
  split_trainable,
)

__all__ = [
  "NTKCL",
  "Health",
  "ModelSpec",
  "RunState",
  "SeedStack",
  "TaskHook",
  "TaskSchedule",
  "TaskView",
  "TrainState",
  "ViTSpec",
  "VisionTransformer",
  "base_config",
  "build_stream",
  "init_key",
  "init_params",
  "initial_params",
  "load_augreg",
  "load_run",
  "loss_fn",
  "prefetch",
  "reg_targets",
  "resolve_quirks",
  "run",
  "section_weighted_logits",
  "split_trainable",
  "validate",
]
