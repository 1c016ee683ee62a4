"""Parity cases and their seeded inputs, in the ntkcl-jax layout (NumPy only, no torch/JAX).

Every input of a parity fixture (backbone, both PEFT banks, fusion, proxy head, L_reg snapshot,
prototypes, images, labels) is drawn here from `np.random.default_rng(seed)`, so a fixture stores
only outputs and the SHA-256 of these inputs; `tests/test_parity_official.py` regenerates them and
checks the hash. The official side receives the same values through `mapping.TABLE`.

Values are a "mid-stream" state rather than a fresh init, so that every code path carries signal:
adapters with non-zero `up`, prompt generators with non-zero mix kernel and LN scale (input-
dependent prompts; the released zero init would make their gradients exactly 0, SPEC Q2), an EMA
bank that differs from the current one, an L_reg snapshot that differs from the current values,
and random old prototype rows followed by s_t zero rows (the official state during task t).
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from experiments.parity.official import Geometry


@dataclasses.dataclass(frozen=True)
class Case:
  """One official training step. dataset: the official `--dataset` whose defaults apply."""

  name: str
  geometry: Geometry
  dataset: str
  task: int  # t; the official proxy head has `increment` = s_t outputs
  known: int  # k_t old classes (rows of random prototypes)
  new: int  # s_t
  batch: int
  seed: int = 0
  feed_basis: bool = False  # rank(prototypes) < 40: feed one fixed basis to every run

  @property
  def num_seen(self) -> int:
    return self.known + self.new


TINY = Geometry(image_size=56, patch_size=4, width=64, depth=3, num_heads=4, mlp_dim=256)
TINY32 = Geometry(image_size=56, patch_size=4, width=32, depth=3, num_heads=2, mlp_dim=128)
CASES = {
  c.name: c
  for c in (
    # 40 known classes: the 40-vector basis spans exactly the old prototypes (unique projector).
    Case("tiny", TINY, "cifar224", task=8, known=40, new=5, batch=8),
    # Pre-trained (PTM) pass on: D = 3d, section weights (1.0, 0.3, 0.1).
    Case("tiny_ptm", TINY32, "oxfordpets", task=9, known=45, new=5, batch=8, seed=1),
    # 4 known classes (< 40): the basis completion is arbitrary, so one basis is fed to all runs.
    Case("tiny_few", TINY32, "imagenetr", task=2, known=4, new=2, batch=8, seed=2, feed_basis=True),
    # ViT-B/16 at 224 px (slow; generated on the fly).
    Case("vitb16", Geometry(), "cifar224", task=4, known=40, new=10, batch=4, seed=3),
  )
}


def backbone_arrays(geo: Geometry, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """AugReg flat keys → float32 arrays (LN scales ≈ 1, kernels ~ N(0, 1/fan_in))."""
  d, h, hd, m = geo.width, geo.num_heads, geo.width // geo.num_heads, geo.mlp_dim
  p, n = geo.patch_size, geo.num_tokens
  shapes = {
    "embedding/kernel": (p, p, 3, d),
    "embedding/bias": (d,),
    "cls": (1, 1, d),
    "Transformer/posembed_input/pos_embedding": (1, n, d),
    "Transformer/encoder_norm/scale": (d,),
    "Transformer/encoder_norm/bias": (d,),
  }
  for i in range(geo.depth):
    b = f"Transformer/encoderblock_{i}/"
    a = b + "MultiHeadDotProductAttention_1/"
    for ln in ("LayerNorm_0", "LayerNorm_2"):
      shapes[f"{b}{ln}/scale"], shapes[f"{b}{ln}/bias"] = (d,), (d,)
    for q in ("query", "key", "value"):
      shapes[f"{a}{q}/kernel"], shapes[f"{a}{q}/bias"] = (d, h, hd), (h, hd)
    shapes[f"{a}out/kernel"], shapes[f"{a}out/bias"] = (h, hd, d), (d,)
    shapes[f"{b}MlpBlock_3/Dense_0/kernel"], shapes[f"{b}MlpBlock_3/Dense_0/bias"] = (d, m), (m,)
    shapes[f"{b}MlpBlock_3/Dense_1/kernel"], shapes[f"{b}MlpBlock_3/Dense_1/bias"] = (m, d), (d,)
  out = {}
  for k, s in shapes.items():
    if k.endswith("/scale"):
      v = 1.0 + 0.1 * rng.standard_normal(s)
    elif k.endswith("/bias"):
      v = 0.05 * rng.standard_normal(s)
    elif k.endswith("/kernel"):
      fan_in = s[0] if s[0] == d and len(s) == 3 else int(np.prod(s[:-1]))
      v = rng.standard_normal(s) / np.sqrt(fan_in)
    else:  # cls, position embedding
      v = 0.5 * rng.standard_normal(s)
    out[k] = v.astype(np.float32)
  return out


def _bank(geo: Geometry, rng: np.random.Generator, n_prompts: int = 10, r: int = 16) -> dict:
  d, n = geo.width, geo.num_tokens
  f = lambda *s, sc=1.0, off=0.0: (off + sc * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
  bank = {}
  for l in range(geo.depth):
    bank[f"adapter_{l}"] = {
      "down": {
        "kernel": rng.uniform(-(d**-0.5), d**-0.5, (d, r)).astype(np.float32),
        "bias": f(r, sc=0.02),
      },
      "up": {"kernel": f(r, d, sc=0.05), "bias": f(d, sc=0.02)},
    }
    bank[f"prompt_{l}"] = {
      "mix": {"kernel": f(n, n_prompts, sc=0.05), "bias": f(n_prompts, sc=0.02)},
      "norm": {"scale": f(d, sc=0.1, off=1.0), "bias": f(d, sc=0.1)},
    }
  return bank


def _perturb(tree, rng, scale=0.01):
  if isinstance(tree, dict):
    return {k: _perturb(v, rng, scale) for k, v in tree.items()}
  return (tree + scale * rng.standard_normal(tree.shape)).astype(np.float32)


def make_inputs(case: Case) -> dict:
  """All inputs of `case` (float32 / int64 NumPy)."""
  geo = case.geometry
  rng = np.random.default_rng(case.seed)
  ptm = case.dataset in ("oxfordpets", "eurosat", "plantvillage", "vtab", "kvasir")
  dim = (3 if ptm else 2) * geo.width
  bound = dim**-0.5
  u = lambda *s: rng.uniform(-bound, bound, s).astype(np.float32)  # noqa: E731
  backbone = backbone_arrays(geo, rng)
  current, ema = _bank(geo, rng), _bank(geo, rng)
  fusion = {q: {"kernel": u(dim, dim), "bias": u(dim)} for q in ("query", "key", "value")}
  proxy = {"kernel": u(dim, case.new), "sigma": np.float32(1.3)}
  snapshot = {"peft": _perturb(current, rng), "fusion": _perturb(fusion, rng)}
  protos = np.zeros((case.num_seen, dim), np.float32)
  protos[: case.known] = rng.standard_normal((case.known, dim)).astype(np.float32)
  images = rng.uniform(0, 1, (case.batch, geo.image_size, geo.image_size, 3)).astype(np.float32)
  labels = case.known + rng.integers(0, case.new, case.batch)
  labels[1] = labels[0]  # at least one positive pair for L_MI
  return {
    "backbone": backbone,
    "params": {"peft": {"current": current, "ema": ema}, "fusion": fusion},
    "proxy_head": proxy,
    "reg_snapshot": snapshot,
    "prototypes": protos,
    "images": images,
    "labels": labels.astype(np.int64),
    "use_init_ptm": ptm,
  }


def inputs_sha256(inputs: dict) -> str:
  """Order-independent digest of every array in `inputs` (keys sorted, raw bytes)."""
  h = hashlib.sha256()

  def walk(t, prefix=""):
    if isinstance(t, dict):
      for k in sorted(t):
        walk(t[k], f"{prefix}/{k}")
    else:
      a = np.ascontiguousarray(np.asarray(t))
      h.update(prefix.encode() + str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())

  walk(inputs)
  return h.hexdigest()
