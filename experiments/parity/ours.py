"""ntkcl-jax on a parity case: the same quantities as the official fixture, under the same names.

Uses only the project's public functions (`models.ntkcl`, `losses`, `train_step.loss_fn`,
`optim.make_optimizer`, `ema.ema_update`, `models.heads.section_weighted_logits`,
`models.vit.load_augreg`) on the case's inputs (`cases.make_inputs`); official parameter names
come from `mapping.TABLE`. No torch. `sgd_step` is the training step of both parity runs (this
one-step case and `trajectory.py`).
"""

from __future__ import annotations

import pathlib
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.parity import mapping
from experiments.parity.cases import Case
from ntkcl_jax import losses
from ntkcl_jax.ema import ema_update
from ntkcl_jax.models.heads import section_weighted_logits
from ntkcl_jax.models.ntkcl import NTKCL, ModelSpec
from ntkcl_jax.models.vit import ViTSpec, load_augreg
from ntkcl_jax.optim import make_optimizer
from ntkcl_jax.train_step import TaskInfo, loss_fn


def model_for(case: Case, use_init_ptm: bool) -> NTKCL:
  g = case.geometry
  vit = ViTSpec(g.image_size, g.patch_size, g.width, g.depth, g.num_heads, g.mlp_dim)
  return NTKCL(ModelSpec(vit=vit, use_init_ptm=use_init_ptm, remat="none"))


def load_backbone(case: Case, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
  g = case.geometry
  vit = ViTSpec(g.image_size, g.patch_size, g.width, g.depth, g.num_heads, g.mlp_dim)
  with tempfile.TemporaryDirectory() as d:
    path = pathlib.Path(d) / "augreg.npz"
    np.savez(path, **arrays)
    return load_augreg(path, vit)


def _official(tree: dict, names: list[str], prefix: str = "") -> dict[str, np.ndarray]:
  return {n: np.asarray(v, np.float64) for n, v in mapping.project_to_official(tree, names).items()}


def sgd_step(
  trainable: dict,
  opt_state: Any,
  frozen: dict,
  aux: dict,
  batch: dict,
  lr: float | jax.Array,
  *,
  model: NTKCL,
  weights: losses.LossWeights,
  tx: optax.GradientTransformation,
  batch_size: int,
  with_outputs: bool = False,
) -> tuple[dict, dict, dict, Any]:
  """One training step of the parity runs (this file's one-step case and `trajectory.py`).

  `value_and_grad(train_step.loss_fn)` with dropout off (`deterministic=True`; the key is then
  unused), the optimiser update `tx` (`optim.make_optimizer`: weight decay + momentum SGD) and
  θ ← θ − lr·update. Not jitted: callers jit it, alone or inside a larger step.

  Returns:
    (loss terms, gradients, updated trainables, updated optimiser state).
  """
  (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    trainable,
    frozen,
    aux,
    batch,
    jax.random.key(0),
    model=model,
    weights=weights,
    batch_size=batch_size,
    deterministic=True,
    with_outputs=with_outputs,
  )
  updates, opt_state = tx.update(grads, opt_state, trainable)
  after = jax.tree_util.tree_map(lambda p, u: p - lr * u, trainable, updates)
  return terms, grads, after, opt_state


def run(case: Case, inputs: dict, fixture: dict[str, Any], meta: dict) -> dict[str, np.ndarray]:
  """{quantity: float64 array} for every `ref/<quantity>` the fixture has."""
  args = meta["official_args"]
  ptm = bool(args["use_init_ptm"])
  model = model_for(case, ptm)
  j = lambda t: jax.tree_util.tree_map(jnp.asarray, t)  # noqa: E731
  params = inputs["params"]
  trainable = j({"peft": {"current": params["peft"]["current"]}, "fusion": params["fusion"]})
  trainable["proxy_head"] = j(inputs["proxy_head"])
  frozen = {
    "backbone": load_backbone(case, inputs["backbone"]),
    "peft": {"ema": j(params["peft"]["ema"])},
  }
  protos = jnp.asarray(inputs["prototypes"])
  basis = fixture.get("in/orth_basis")
  if basis is None:
    basis = losses.orthogonality_basis(inputs["prototypes"])
  n_old = case.num_seen - args["increment"]
  aux = {
    "task": TaskInfo.make(case.known, case.new, n_old, True),
    "prototypes": protos,
    "orth_basis": jnp.asarray(basis, jnp.float32),
    "reg_snapshot": j(inputs["reg_snapshot"]),
    "mi_rows": jnp.asarray(fixture["in/mi_rows"], jnp.int32),
  }
  batch = {
    "image": jnp.asarray(inputs["images"]),
    "label": jnp.asarray(inputs["labels"], jnp.int32),
    "mask": jnp.ones(case.batch, bool),
  }
  weights = losses.LossWeights(
    mi=args["nce_temp"], orth=args["dis_temp"], reg=args["reg_temp"], mi_sign=-1
  )

  tx = make_optimizer(args["weight_decay"])

  @jax.jit
  def step(trainable, frozen, aux, batch):
    terms, grads, after, _ = sgd_step(
      trainable,
      tx.init(trainable),
      frozen,
      aux,
      batch,
      args["init_lr"],
      model=model,
      weights=weights,
      tx=tx,
      batch_size=case.batch,
      with_outputs=True,
    )
    ema = ema_update(frozen["peft"]["ema"], after["peft"]["current"], case.task)
    # Eval features: with `deterministic=True` the training forward *is* the eval forward
    # (`NTKCL`'s `train` flag only switches dropout), so the loss's features are reused rather
    # than compiling a second forward (the test's time is XLA compilation).
    ev = terms["outputs"]["features"]
    sw = (args["beta"], args["gamma"], args["alpha"]) if ptm else (args["gamma"], args["alpha"])
    proto = {k: section_weighted_logits(ev[k], aux["prototypes"], sw) for k in ("c", "p", "m")}
    return terms, grads, after, ema, ev, proto

  terms, grads, after, ema, ev, proto = jax.device_get(step(trainable, frozen, aux, batch))
  outs = terms.pop("outputs")
  q: dict[str, Any] = {}
  for k, v in outs["features"]["passes"].items():
    q[f"features/pass_{k}"] = v
  for k in ("c", "p", "m"):
    q[f"features/{k}"] = outs["features"][k]
    q[f"logits/proxy_{k}"] = outs["proxy_logits"][k]
    q[f"features/eval_{k}"] = ev[k]
    q[f"logits/proto_{k}"] = proto[k]
  for k in ("ce_c", "ce_p", "ce_m", "mi", "orth", "reg", "total"):
    q[f"losses/{k}"] = terms[k]
  names = meta["official_trainable"]
  q.update({f"grads/{n}": v for n, v in _official(grads, names).items()})
  q.update({f"sgd/{n}": v for n, v in _official(after, names).items()})
  ema_names = [k[len("ref/ema/") :] for k in fixture if k.startswith("ref/ema/")]
  q.update({f"ema/{n}": v for n, v in _official({"peft": {"ema": ema}}, ema_names).items()})
  r = min(meta["rank"], 40)
  u_ours = losses.orthogonality_basis(inputs["prototypes"]).astype(np.float64)[:, :r]
  # The first min(rank, 40) columns are unique up to sign: compare projectors, not vectors.
  q["basis/projector"] = u_ours @ u_ours.T
  return {k: np.asarray(v, np.float64) for k, v in q.items()}
