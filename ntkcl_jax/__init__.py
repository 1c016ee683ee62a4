"""ntkcl-jax: NTK-CL (arXiv 2407.17120) in JAX/Flax linen, reproducing the released code.

Public API (what `analysis/` and notebooks use):
  ModelSpec, NTKCL, init_params          the network (models/ntkcl.py)
  ViTSpec, VisionTransformer, load_augreg the backbone and its strict AugReg loader
  base_config, validate, resolve_quirks   configuration (config.py)
  init_key                                the key of a run's init parameters (config.py)
  build_stream, initial_params, load_run  a run's stream, init parameters and a checkpoint's
  RunState                                evaluation state (run_state.py)
  TaskHook, TaskView                      trainer hooks (hooks.py)
  run                                     the trainer (train.py)
"""

from ntkcl_jax.config import base_config, init_key, resolve_quirks, validate
from ntkcl_jax.hooks import TaskHook, TaskView
from ntkcl_jax.models.ntkcl import NTKCL, ModelSpec, init_params
from ntkcl_jax.models.vit import VisionTransformer, ViTSpec, load_augreg
from ntkcl_jax.run_state import RunState, build_stream, initial_params, load_run
from ntkcl_jax.train import run

__all__ = [
  "NTKCL",
  "ModelSpec",
  "RunState",
  "TaskHook",
  "TaskView",
  "ViTSpec",
  "VisionTransformer",
  "base_config",
  "build_stream",
  "init_key",
  "init_params",
  "initial_params",
  "load_augreg",
  "load_run",
  "resolve_quirks",
  "run",
  "validate",
]
