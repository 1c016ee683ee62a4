"""Forward, train step and eval step of the official NTK-CL in PyTorch (official computation
order and shapes; see `bench_torch_reference.py`'s docstring), on the parameter tree of
`torch_reference_model.py`. No JAX import (a PyTorch worker's peak RSS is measured).
"""

from __future__ import annotations

from typing import Any

from experiments.torch_reference_model import (
  ADAPTER_DROPOUT,
  ADAPTER_SCALE,
  DIS_TEMP,
  FUSION_DROPOUT,
  FUSION_HEADS,
  LR,
  MI_TAU,
  MOMENTUM,
  NCE_TEMP,
  ORTH_K,
  PROMPT_CARRY,
  REG_TEMP,
  SECTION_WEIGHTS,
  TOPK,
  WEIGHT_DECAY,
  F,
  Geometry,
  named_tensors,
  tensors,
  torch,
)

# ------------------------------------------------------------------------------------------------
# Forward (official computation order and shapes).


def _lin(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
  return F.linear(x, p["weight"], p["bias"])


def _ln(x: torch.Tensor, p: dict[str, torch.Tensor], eps: float) -> torch.Tensor:
  return F.layer_norm(x, (x.shape[-1],), p["weight"], p["bias"], eps)


def attention(x: torch.Tensor, p: dict[str, Any], heads: int) -> torch.Tensor:
  """(B, n, d) -> (B, n, d): separate q/k/v Linears, per-head bmm, softmax, output projection."""
  b, n, d = x.shape
  hd = d // heads

  def split(t):  # (B, n, d) -> (B·heads, n, hd), contiguous like the official `_shape`
    return t.view(b, n, heads, hd).transpose(1, 2).contiguous().view(b * heads, n, hd)

  k, v, q = split(_lin(x, p["k"])), split(_lin(x, p["v"])), split(_lin(x, p["q"]))
  scores = torch.bmm(q, k.transpose(1, 2)) * hd**-0.5
  out = torch.bmm(scores.softmax(dim=-1), v)
  return _lin(out.view(b, heads, n, hd).transpose(1, 2).reshape(b, n, d), p["proj"])


def mlp(x: torch.Tensor, p: dict[str, Any], eps: float) -> torch.Tensor:
  """fc2(GELU(fc1(LN2(x)))), (B, n, d) -> (B, n, d)."""
  return _lin(F.gelu(_lin(_ln(x, p["norm2"], eps), p["fc1"])), p["fc2"])


def adapter(h: torch.Tensor, p: dict[str, Any], training: bool) -> torch.Tensor:
  """(B, n, d) -> (B, n, d): up(dropout(relu(down(h)))) · 0.1."""
  z = F.dropout(F.relu(_lin(h, p["down"])), ADAPTER_DROPOUT, training)
  return _lin(z, p["up"]) * ADAPTER_SCALE


def prompt_generator(h: torch.Tensor, p: dict[str, Any], g: Geometry) -> torch.Tensor:
  """(B, N or N + n_p, d) -> (B, N + n_p, d): new prompts from the token-axis Linear + LN,
  carried prompts (recognised by the sequence length) cut out and added ×0.1."""
  n_p = g.num_prompts
  carried = None
  if h.shape[1] == g.num_tokens + n_p:
    carried = h[:, 1 : 1 + n_p]
    h = torch.cat((h[:, :1], h[:, 1 + n_p :]), dim=1)
  u = _lin(h.transpose(2, 1), p["mix"]).transpose(2, 1)  # (B, n_p, d)
  new = _ln(u, p["norm"], g.ln_eps)
  if carried is not None:
    new = new + PROMPT_CARRY * carried
  return torch.cat((h[:, :1], new, h[:, 1:]), dim=1)


def block(
  x: torch.Tensor,
  p: dict[str, Any],
  g: Geometry,
  mode: str,
  peft: dict[str, Any] | None,
  training: bool,
) -> torch.Tensor:
  """One pre-LN block in "channel" (optional adapter parallel to the MLP) or "patch" mode."""
  h = x + attention(_ln(x, p["norm1"], g.ln_eps), p, g.num_heads)
  if mode == "channel":
    out = mlp(h, p, g.ln_eps) + h
    return out if peft is None else out + adapter(h, peft, training)
  y = mlp(prompt_generator(h, peft, g), p, g.ln_eps)
  if y.shape == h.shape:
    return y + h
  # block 0: the residual reaches CLS and the patch tokens, not the new prompts (in place)
  y[:, 0] += h[:, 0]
  y[:, 1 + g.num_prompts :] += h[:, 1:]
  return y


def embed(images: torch.Tensor, bb: dict[str, Any], g: Geometry) -> torch.Tensor:
  """(B, 3, H, W) -> (B, N, d): patch conv, CLS, position embedding."""
  x = F.conv2d(images, bb["patch"]["weight"], bb["patch"]["bias"], stride=g.patch_size)
  x = x.flatten(2).transpose(1, 2)
  x = torch.cat((bb["cls"].expand(x.shape[0], -1, -1), x), dim=1)
  return x + bb["pos"]


def run_pass(
  x: torch.Tensor,
  model: dict[str, Any],
  g: Geometry,
  mode: str,
  bank: str | None,
  training: bool,
) -> torch.Tensor:
  """All blocks from the embedded tokens x (B, N, d), final LN on all tokens -> CLS (B, d)."""
  kind = "adapters" if mode == "channel" else "prompts"
  for l, p in enumerate(model["backbone"]["blocks"]):
    peft = None if bank is None else model[bank][kind][l]
    x = block(x, p, g, mode, peft, training)
  return _ln(x, model["backbone"]["norm"], g.ln_eps)[:, 0]


def features(
  images: torch.Tensor, model: dict[str, Any], g: Geometry, use_ptm: bool, training: bool
) -> tuple[torch.Tensor, torch.Tensor]:
  """(B, 3, H, W) -> c, p (B, D): [PTM,] EMA, current sections, each pass from block 0."""
  x = embed(images, model["backbone"], g)
  ptm = [run_pass(x, model, g, "channel", None, training)] if use_ptm else []
  c = [run_pass(x, model, g, "channel", bank, training) for bank in ("ema", "current")]
  p = [run_pass(x, model, g, "patch", bank, training) for bank in ("ema", "current")]
  return torch.cat(ptm + c, dim=1), torch.cat(ptm + p, dim=1)


def fusion(c: torch.Tensor, p: torch.Tensor, f: dict[str, Any], training: bool) -> torch.Tensor:
  """AttentionFusion over one token per sample: (B, D), (B, D) -> m (B, D)."""
  b, dim = c.shape
  hd = dim // FUSION_HEADS

  def heads(t):  # (B, D) -> (B, heads, 1, hd)
    return t.view(b, -1, FUSION_HEADS, hd).transpose(1, 2)

  q, k, v = heads(_lin(p, f["query"])), heads(_lin(c, f["key"])), heads(_lin(c, f["value"]))
  scores = torch.softmax(q @ k.transpose(-2, -1) / hd**0.5, dim=-1)
  scores = F.dropout(scores, FUSION_DROPOUT, training)
  fused = (scores @ v).transpose(1, 2).contiguous().view(b, dim)
  return 0.5 * fused + c + 0.1 * p


def cosine(x: torch.Tensor, w: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
  """σ·cos(x, w_k): (B, D), (K, D) -> (B, K)."""
  return sigma * F.linear(F.normalize(x, p=2, dim=1), F.normalize(w, p=2, dim=1))


def reweighted(x: torch.Tensor, w: torch.Tensor, sigma: torch.Tensor, width: int) -> torch.Tensor:
  """Section-weighted cosine logits: Σ_j ω_j cos(x^(j), w_k^(j)) over width-d sections."""
  num = x.shape[1] // width
  out = 0.0
  for j, weight in enumerate(SECTION_WEIGHTS[num == 3]):
    sl = slice(j * width, (j + 1) * width)
    out = (
      out + F.linear(F.normalize(x[:, sl], p=2, dim=1), F.normalize(w[:, sl], p=2, dim=1)) * weight
    )
  return sigma * out


def orthogonal_residuals(
  fc: torch.Tensor, c: torch.Tensor, p: torch.Tensor, m: torch.Tensor
) -> torch.Tensor:
  """Full SVD of the column-normalised prototypes (D, rows); first 40 left singular vectors U;
  signed sum of x̂ − x̂UUᵀ over c and p (m's residual is computed and discarded, as upstream)."""
  u, _, _ = torch.linalg.svd(F.normalize(fc.transpose(0, 1), p=2, dim=0), full_matrices=True)
  basis = u[:, :ORTH_K]

  def residual(x):
    xn = F.normalize(x, p=2, dim=-1)
    return xn - xn @ basis @ basis.T

  res_c, res_p, _ = residual(c), residual(p), residual(m)
  return res_c.sum() + res_p.sum()


def mutual_information(feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
  """L_MI (SPEC §2.1) of (n, D) features with (n,) labels: one global positive log-sum-exp plus
  the mean per-row log-sum-exp over all other rows."""
  z = F.normalize(feats, p=2, dim=1)
  sim = z @ z.T / MI_TAU
  eye = torch.eye(sim.shape[0], dtype=torch.bool)
  positive = (labels[:, None] == labels[None, :]) & ~eye
  pos_term = -torch.log((torch.exp(sim) * positive).sum())
  neg_term = torch.logsumexp(sim.masked_fill(eye, float("-inf")), dim=1).mean()
  return pos_term + neg_term


def reg_loss(model: dict[str, Any]) -> torch.Tensor:
  """Σ‖θ − θ_snap‖² over the "weight" tensors of the current bank and the fusion Linears."""
  pairs = named_tensors({"bank": model["current"], "fusion": model["fusion"]})
  snaps = dict(named_tensors(model["reg"]))
  terms = [(t - snaps[n]).pow(2).sum() for n, t in pairs if n.endswith("weight")]
  return torch.stack(terms).sum()


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
  if not bool(torch.isfinite(x).all()):
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
  return x


def make_train_step(model: dict[str, Any], g: Geometry, use_ptm: bool, k_t: int, s_t: int):
  """Official training step: returns step(images (B, 3, H, W), labels (B,)) -> loss (float)."""
  trainable = tensors([model["current"], model["fusion"], model["proxy"]])
  opt = torch.optim.SGD(trainable, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

  def step(images: torch.Tensor, labels: torch.Tensor) -> float:
    c, p = features(images, model, g, use_ptm, training=True)
    m = fusion(c, p, model["fusion"], training=True)
    orth = orthogonal_residuals(model["train_fc"], c, p, m)
    local = labels - k_t
    proxy = model["proxy"]
    ce = [F.cross_entropy(cosine(x, proxy["weight"], proxy["sigma"]), local) for x in (c, p, m)]
    old = model["train_fc"][:-s_t]
    picked = torch.randperm(old.shape[0])[: images.shape[0]]
    mi = -mutual_information(torch.cat((m, old[picked]), dim=0), torch.cat((labels, picked)))
    reg = reg_loss(model)
    mi, orth, reg = _finite_or_zero(mi), _finite_or_zero(orth), _finite_or_zero(reg)
    loss = sum(ce) + mi * NCE_TEMP + orth * DIS_TEMP + reg * REG_TEMP
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()

  return step


def make_eval_step(model: dict[str, Any], g: Geometry, use_ptm: bool, num_seen: int):
  """Official test step: images (B, 3, H, W) -> top-k class ids (B, k) of m's logits."""

  @torch.no_grad()
  def step(images: torch.Tensor) -> torch.Tensor:
    c, p = features(images, model, g, use_ptm, training=False)
    m = fusion(c, p, model["fusion"], training=False)
    orthogonal_residuals(model["eval_fc"][:num_seen], c, p, m)  # computed and unused upstream
    fc, sigma = model["eval_fc"], model["fc_sigma"]
    logits = [reweighted(x, fc, sigma, g.width) for x in (c, p, m)]
    return torch.topk(logits[2][:, :num_seen], k=min(TOPK, num_seen), dim=1)[1]

  return step
