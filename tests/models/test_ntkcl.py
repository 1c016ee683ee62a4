"""SPEC 1.2-1.6: the NTK-CL passes against a literal, unoptimised re-implementation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.scipy.special import erf

from ntkcl_jax import losses
from ntkcl_jax.models.heads import Fusion, cosine_logits, section_weighted_logits
from ntkcl_jax.models.ntkcl import NTKCL, ModelSpec, init_params
from ntkcl_jax.models.vit import VIT_B16, VisionTransformer
from ntkcl_jax.optim import count_params
from ntkcl_jax.train_step import TaskInfo, init_proxy_head, loss_fn, reg_targets, split_trainable
from tests.fakes import tiny_spec

# ---- literal SPEC re-implementation (no shared work, all tokens everywhere) ---------------------


def _ln(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / jnp.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _attn_res(x, bp):
  p, y = bp["MultiHeadDotProductAttention_1"], _ln(x, bp["LayerNorm_0"])
  q, k, v = (
    jnp.einsum("bnd,dhc->bnhc", y, p[n]["kernel"]) + p[n]["bias"] for n in ("query", "key", "value")
  )
  w = jax.nn.softmax(jnp.einsum("bqhc,bkhc->bhqk", q, k) / np.sqrt(q.shape[-1]), -1)
  o = jnp.einsum("bhqk,bkhc->bqhc", w, v)
  return x + jnp.einsum("bqhc,hcd->bqd", o, p["out"]["kernel"]) + p["out"]["bias"]


def _mlp(h, bp):
  p, y = bp["MlpBlock_3"], _ln(h, bp["LayerNorm_2"])
  z = y @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
  z = 0.5 * z * (1 + erf(z / np.sqrt(2)))
  return z @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def _embed(images, bb, patch):
  b, hgt, _, c = images.shape
  g = hgt // patch
  x = images.reshape(b, g, patch, g, patch, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1)
  x = x @ bb["embedding"]["kernel"].reshape(-1, bb["embedding"]["kernel"].shape[-1])
  x = x + bb["embedding"]["bias"]
  cls = jnp.broadcast_to(bb["cls"], (b, 1, x.shape[-1]))
  return jnp.concatenate([cls, x], 1) + bb["Transformer"]["posembed_input"]["pos_embedding"]


def _blocks(bb):
  t = bb["Transformer"]
  return [t[f"encoderblock_{l}"] for l in range(len([k for k in t if k.startswith("encoder")]) - 1)]


def _adapter(h, p):
  return (
    jax.nn.relu(h @ p["down"]["kernel"] + p["down"]["bias"]) @ p["up"]["kernel"] + p["up"]["bias"]
  ) * 0.1


def _prompts(tokens, p):
  u = jnp.einsum("bnd,nk->bkd", tokens, p["mix"]["kernel"]) + p["mix"]["bias"][None, :, None]
  return _ln(u, p["norm"])


def literal_features(params, images, spec):
  bb = params["backbone"]
  final = lambda x: _ln(x[:, 0], bb["Transformer"]["encoder_norm"])  # noqa: E731
  n_p = spec.num_prompts

  def plain():
    x = _embed(images, bb, spec.vit.patch_size)
    for bp in _blocks(bb):
      h = _attn_res(x, bp)
      x = h + _mlp(h, bp)
    return final(x)

  def channel(bank):
    x = _embed(images, bb, spec.vit.patch_size)
    for l, bp in enumerate(_blocks(bb)):
      h = _attn_res(x, bp)
      x = h + _mlp(h, bp) + _adapter(h, bank[f"adapter_{l}"])
    return final(x)

  def patch(bank):
    x = _embed(images, bb, spec.vit.patch_size)
    for l, bp in enumerate(_blocks(bb)):
      h = _attn_res(x, bp)
      if l >= 1:
        r = h[:, 1 : 1 + n_p]
        hp = jnp.concatenate([h[:, :1], h[:, 1 + n_p :]], 1)
      else:
        hp = h
      prm = _prompts(hp, bank[f"prompt_{l}"])
      if l >= 1:
        prm = prm + 0.1 * r
      y = _mlp(jnp.concatenate([hp[:, :1], prm, hp[:, 1:]], 1), bp)
      if l == 0:
        x = y + jnp.concatenate([h[:, :1], jnp.zeros_like(prm), h[:, 1:]], 1)
      else:
        x = y + h
    return final(x)

  pre = [plain()] if spec.use_init_ptm else []
  ema, cur = params["peft"]["ema"], params["peft"]["current"]
  c = jnp.concatenate([*pre, channel(ema), channel(cur)], -1)
  p = jnp.concatenate([*pre, patch(ema), patch(cur)], -1)
  fv = params["fusion"]["value"]
  return {"c": c, "p": p, "m": c + 0.1 * p + 0.5 * (c @ fv["kernel"] + fv["bias"])}


def _perturb(tree, key, scale=0.3):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten(
    [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  )


# The optimisation switches (`python -m experiments.benchmarks step --ablate`) must not change the
# features; each is checked with the PTM pass on (all three pass kinds), to keep the file fast.
CASES = {
  "no_ptm": (False, {}),
  "ptm": (True, {}),
  "ptm-no_share_block0": (True, {"share_block0": False}),
  "ptm-no_cls_only": (True, {"last_block_cls_only": False}),
  "ptm-remat_none": (True, {"remat": "none"}),
  "ptm-remat_full": (True, {"remat": "full"}),
}


@pytest.mark.parametrize(("use_init_ptm", "switches"), CASES.values(), ids=CASES.keys())
def test_passes_match_literal_spec(use_init_ptm, switches):
  spec = tiny_spec(use_init_ptm=use_init_ptm, **switches)
  params = init_params(spec, jax.random.key(0))
  params["peft"] = _perturb(params["peft"], jax.random.key(1))  # non-degenerate prompts/adapters
  params["backbone"] = _perturb(params["backbone"], jax.random.key(2), 0.05)
  images = jax.random.uniform(jax.random.key(3), (3, 16, 16, 3))
  got = jax.jit(lambda p, x: NTKCL(spec).apply({"params": p}, x, train=False))(params, images)
  want = jax.jit(lambda p, x: literal_features(p, x, spec))(params, images)
  for k in ("c", "p", "m"):
    assert got[k].shape == (3, spec.feature_dim)
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.mark.slow
def test_switches_keep_training_gradients():
  """remat and an unshared block 0 change only the schedule: same loss and gradients (train
  mode, dropout on). Not `last_block_cls_only`: its dropout masks have another shape."""
  spec = tiny_spec(use_init_ptm=True)
  params = init_params(spec, jax.random.key(0))
  params["peft"] = _perturb(params["peft"], jax.random.key(1))
  params["proxy_head"] = init_proxy_head(jax.random.key(4), spec.feature_dim, 3)
  trainable, frozen = split_trainable(params)
  aux = {
    "task": TaskInfo.make(task_start=0, num_new=3, n_old=0, use_reg=True),
    "prototypes": jnp.zeros((3, spec.feature_dim)),
    "orth_basis": jnp.eye(spec.feature_dim)[:, :2],
    "reg_snapshot": reg_targets(trainable),
  }
  batch = {
    "image": jax.random.uniform(jax.random.key(3), (4, 16, 16, 3)),
    "label": jnp.array([0, 1, 2, 1]),
    "mask": jnp.array([True, True, True, False]),
  }

  def grads(s):
    f = lambda t: loss_fn(  # noqa: E731
      t,
      frozen,
      aux,
      batch,
      jax.random.key(5),
      model=NTKCL(s),
      weights=losses.LossWeights(),
      batch_size=4,
    )[0]
    return jax.jit(jax.value_and_grad(f))(trainable)

  spec = dataclasses.replace(spec, remat="none")  # the baseline: every activation stored
  l0, g0 = grads(spec)
  assert float(optax.global_norm(g0)) > 0
  for switches in ({"remat": "full", "share_block0": False}, {"remat": "dots"}):
    l1, g1 = grads(dataclasses.replace(spec, **switches))
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_zero_init_channel_branch_equals_plain_backbone():
  spec = tiny_spec()
  params = init_params(spec, jax.random.key(0))
  images = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))
  plain = VisionTransformer(spec.vit).apply({"params": params["backbone"]}, images)
  feats = NTKCL(spec).apply(
    {"params": params}, images, train=True, rngs={"dropout": jax.random.key(2)}
  )
  d = spec.vit.width
  np.testing.assert_allclose(feats["c"][:, :d], plain, atol=1e-6)
  np.testing.assert_allclose(feats["c"][:, d:], plain, atol=1e-6)


def test_ablation_model_names_return_their_features():
  images = jnp.ones((2, 16, 16, 3))
  for name, keys in (("channel", {"c"}), ("patch", {"p"}), ("both", {"c", "p", "m"})):
    spec = tiny_spec(model_name=name)
    params = init_params(spec, jax.random.key(0))
    assert set(NTKCL(spec).apply({"params": params}, images, train=False)) == keys


def test_reference_geometry_check_q8():
  with pytest.raises(ValueError, match="prompt_tokens='fixed_197'"):
    dataclasses.replace(tiny_spec(), fixed_197_tokens=True)
  ModelSpec(vit=VIT_B16, fixed_197_tokens=True)  # ViT-B/16 at 224 px is fine


def test_full_size_parameter_counts():
  """SPEC 2.2: 346,512 PEFT scalars per bank; fusion 3(D²+D) at D = 1536 / 2304."""
  for ptm, fusion_count in ((False, 7_082_496), (True, 15_932_160)):
    spec = ModelSpec(vit=VIT_B16, use_init_ptm=ptm)
    shapes = jax.eval_shape(lambda s=spec: init_params(s, jax.random.key(0)))
    assert count_params(shapes["peft"]["current"]) == 346_512
    assert count_params(shapes["peft"]["ema"]) == 346_512
    assert count_params(shapes["fusion"]) == fusion_count
  spec = ModelSpec(vit=VIT_B16, fusion_with_qk=False)
  shapes = jax.eval_shape(lambda: init_params(spec, jax.random.key(0)))
  assert set(shapes["fusion"]) == {"value"}
  prompt = shapes["peft"]["current"]["prompt_0"]
  assert prompt["mix"]["kernel"].shape == (197, 10)


def _literal_attention_fusion(params, c, p, heads, keep):
  """nn.MultiheadAttention-style fusion on one token per sample (SPEC 1.5), literal."""
  b, dim = c.shape
  q = (p @ params["query"]["kernel"] + params["query"]["bias"]).reshape(b, heads, 1, -1)
  k = (c @ params["key"]["kernel"] + params["key"]["bias"]).reshape(b, heads, 1, -1)
  v = (c @ params["value"]["kernel"] + params["value"]["bias"]).reshape(b, heads, 1, -1)
  scores = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / np.sqrt(dim // heads), -1)  # (b,h,1,1)
  scores = scores * keep[:, :, None, None] / 0.9
  out = (scores @ v).reshape(b, dim)
  return c + 0.1 * p + 0.5 * out


def test_fusion_effective_form_matches_literal_attention():
  dim, heads = 32, 8
  fusion = Fusion(dim, heads)
  c, p = jax.random.normal(jax.random.key(0), (2, 5, dim))
  params = fusion.init(
    jax.random.key(1), c, method=lambda m, x: m.touch_qk(x) + m(x, x, deterministic=True).sum()
  )["params"]
  ones = jnp.ones((5, heads))
  got = fusion.apply({"params": params}, c, p, deterministic=True)
  np.testing.assert_allclose(
    got, _literal_attention_fusion(params, c, p, heads, ones * 0.9), rtol=1e-5, atol=1e-5
  )
  # Train mode: each (sample, head) chunk is dropped or scaled by 1/0.9, as per-head dropout.
  train = fusion.apply(
    {"params": params}, c, p, deterministic=False, rngs={"dropout": jax.random.key(3)}
  )
  v = (c @ params["value"]["kernel"] + params["value"]["bias"]).reshape(5, heads, -1)
  attn = ((train - c - 0.1 * p) / 0.5).reshape(5, heads, -1)
  kept = jnp.all(jnp.abs(attn - v / 0.9) < 1e-4, -1)
  dropped = jnp.all(jnp.abs(attn) < 1e-6, -1)
  assert bool(jnp.all(kept ^ dropped)) and 0 < int(dropped.sum()) < heads * 5
  np.testing.assert_allclose(
    train,
    _literal_attention_fusion(params, c, p, heads, kept.astype(jnp.float32)),
    rtol=1e-5,
    atol=1e-5,
  )


def test_cosine_and_section_logits():
  x = jnp.array([[3.0, 4.0], [0.0, 0.0]])
  w = jnp.array([[1.0, 0.0], [0.0, 0.0]])
  np.testing.assert_allclose(cosine_logits(x, w, 2.0), [[1.2, 0.0], [0.0, 0.0]], atol=1e-6)
  g = jax.grad(lambda x: cosine_logits(x, w).sum())(x)
  assert bool(jnp.all(jnp.isfinite(g)))
  feats = jnp.array([[1.0, 0.0, 0.0, 1.0]])
  protos = jnp.array([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
  np.testing.assert_allclose(
    section_weighted_logits(feats, protos, (0.3, 0.1)), [[0.3, 0.1]], atol=1e-6
  )
