"""Analytic FLOP count of the NTK-CL step (matmuls only), beside XLA's compiled count.

`analytic_flops(spec, num_classes, head_width, batch)` counts, per image, the matmul FLOPs of
the forward, the train step and the eval step from the model's geometry alone. The step
benchmark (`experiments/benchmarks/stepcase.py`) and the compile-only preflight
(`ntkcl_jax/preflight/`) report it next to `compiled.cost_analysis()["flops"]`.
"""

from __future__ import annotations

from ntkcl_jax.models.ntkcl import ModelSpec

__all__ = ["analytic_flops"]


def analytic_flops(
  spec: ModelSpec, num_classes: int, head_width: int, batch: int
) -> dict[str, float]:
  """Matmul FLOPs per image (2 per multiply-add) of the forward, train step and eval step.

  Notation: d width, m MLP width, L depth, N = 1 + (H/P)² tokens, N' = N + n_p with n_p prompts,
  r adapter bottleneck, D = feature width (2d, 3d with PTM), dense(n, i, o) = 2·n·i·o.

    attn(n)    = dense(n, d, 3d) + dense(n, d, d) + 4·n²·d       (QKV, out, scores + A·V)
    attn_cls(n)= dense(n, d, 2d) + 2·dense(1, d, d) + 4·n·d      (K, V on n; Q, out, rows: 1)
    mlp(n)     = dense(n, d, m) + dense(n, m, d)
    adapter(n) = dense(n, d, r) + dense(n, r, d)      prompt_gen = 2·N·d·n_p   (token mixing)
    block0     = dense(N-1, P²·3, d) + attn(N) + mlp(N)           (embedding + block 0)
    last(n)    = attn_cls(n) + mlp(1)  [CLS-only]  or  attn(n) + mlp(n)
    plain      = Σ_{l=1}^{L-2} [attn(N) + mlp(N)] + last(N)
    channel    = adapter(N) + Σ_{l=1}^{L-2} [attn(N) + mlp(N) + adapter(N)] + last(N) + adapter
    patch      = prompt_gen + mlp(n_p) + Σ_{l=1}^{L-2} [attn(N') + prompt_gen + mlp(N')]
                 + last(N') [+ prompt_gen when not CLS-only]
    forward    = block0·(1 if shared else #passes) + [plain] + 2·channel + 2·patch
                 + dense(1, D, D)                                                  (fusion value)

  Train adds the proxy head (3·dense(1, D, K)), L_MI (dense(1, D, min(B, C))), L_orth
  (2·2·dense(1, D, 40)) and the backward of the two *current* passes, fusion and heads only
  (frozen passes get none): 1× the forward FLOPs of matmuls with a frozen weight (input gradient
  only), 2× for activation-activation matmuls (scores, A·V) and trainable weights (adapters,
  prompt generators, fusion, heads; an upper bound for the block-0 ones, whose input is constant);
  remat="full" adds one more forward of the two current passes ("dots" recomputes only
  activation-activation matmuls and elementwise work). Eval adds the prototype logits
  dense(1, D, C). LayerNorm, softmax, GELU and the optimiser update are not counted.
  """
  v = spec.vit
  d, m, n, r, n_p = v.width, v.mlp_dim, v.num_tokens, spec.adapter_dim, spec.num_prompts
  n2, big_d, cls_only = n + n_p, spec.feature_dim, spec.last_block_cls_only

  def dense(rows, i, o):
    return 2.0 * rows * i * o

  def attn(k):  # -> (frozen-weight flops, activation-activation flops)
    return dense(k, d, 3 * d) + dense(k, d, d), 4.0 * k * k * d

  def attn_cls(k):
    return dense(k, d, 2 * d) + 2 * dense(1, d, d), 4.0 * k * d

  def mlp(k):
    return dense(k, d, m) + dense(k, m, d)

  def adapter(k):
    return dense(k, d, r) + dense(k, r, d)

  prompt_gen = 2.0 * v.num_tokens * d * n_p

  def last(k):  # -> (frozen, act, rows the last block outputs)
    if cls_only:
      fw, aa = attn_cls(k)
      return fw + mlp(1), aa, 1
    fw, aa = attn(k)
    return fw + mlp(k), aa, k

  # Each pass as (frozen-weight, activation-activation, trainable-weight) FLOPs after block 0.
  def plain():
    fw, aa = attn(n)
    lf, la, _ = last(n)
    return ((v.depth - 2) * (fw + mlp(n)) + lf, (v.depth - 2) * aa + la, 0.0)

  def channel():
    fw, aa = attn(n)
    lf, la, rows = last(n)
    tw = adapter(n) + (v.depth - 2) * adapter(n) + adapter(rows)
    return ((v.depth - 2) * (fw + mlp(n)) + lf, (v.depth - 2) * aa + la, tw)

  def patch():
    fw, aa = attn(n2)
    lf, la, _ = last(n2)
    tw = prompt_gen * (1 + (v.depth - 2) + (0 if cls_only else 1))
    return (mlp(n_p) + (v.depth - 2) * (fw + mlp(n2)) + lf, (v.depth - 2) * aa + la, tw)

  fw0, aa0 = attn(n)
  block0 = dense(v.num_patches, v.patch_size**2 * v.channels, d) + fw0 + aa0 + mlp(n)
  passes = [channel(), channel(), patch(), patch()] + ([plain()] if spec.use_init_ptm else [])
  n_block0 = 1 if spec.share_block0 else len(passes)
  fusion = dense(1, big_d, big_d)
  forward = n_block0 * block0 + sum(sum(p) for p in passes) + fusion
  cur = [channel(), patch()]  # the two passes that get a backward
  heads = 3 * dense(1, big_d, head_width) + dense(1, big_d, min(batch, num_classes))
  heads += 2 * 2 * dense(1, big_d, 40)
  backward = sum(fw + 2 * aa + 2 * tw for fw, aa, tw in cur) + 2 * (fusion + heads)
  recompute = {"none": 0.0, "dots": sum(aa for _, aa, _ in cur), "full": sum(map(sum, cur))}
  train = forward + heads + backward + recompute[spec.remat]
  return {"forward": forward, "train": train, "eval": forward + dense(1, big_d, num_classes)}
