"""Stand-in for `timm` 0.6.12, just enough for the official NTK-CL code (parity checks only).

Why: timm 0.6.12 imports torchvision, which cannot be imported on the project's machines, and it
would download weights. The official code uses exactly three timm names:
  * `timm.create_model("vit_base_patch16_224[_in21k]", pretrained=True, num_classes=0)`, only to
    call `.state_dict()` on the result (`models/prompt_vit.py`);
  * `timm.models.layers.DropPath` (only built when drop_path_rate > 0; the official code passes 0);
  * `timm.models.vision_transformer.PatchEmbed` (the conv patch embedding).
`create_model` here returns a module whose state dict is what timm 0.6.12's
`vision_transformer._load_weights` builds from a Google AugReg `.npz` (file set with
`set_checkpoint`, never downloaded); the conversion is `augreg_to_timm_state_dict`.
"""

from __future__ import annotations

import collections

import numpy as np
import torch
from torch import nn

from . import models  # noqa: F401  (timm.models.layers, timm.models.vision_transformer)

_CHECKPOINT: dict[str, str | None] = {"path": None}


def set_checkpoint(path: str) -> None:
  """The AugReg `.npz` that `create_model(..., pretrained=True)` loads."""
  _CHECKPOINT["path"] = str(path)


def _n2p(w: np.ndarray, t: bool = True) -> torch.Tensor:
  """timm 0.6.12 `_n2p`: NumPy (HWIO / JAX layout) to a torch tensor in PyTorch layout."""
  if w.ndim == 4 and w.shape[0] == w.shape[1] == w.shape[2] == 1:
    w = w.flatten()
  if t:
    if w.ndim == 4:
      w = w.transpose([3, 2, 0, 1])
    elif w.ndim == 3:
      w = w.transpose([2, 0, 1])
    elif w.ndim == 2:
      w = w.transpose([1, 0])
  return torch.from_numpy(np.ascontiguousarray(w))


def augreg_to_timm_state_dict(w: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
  """The state dict timm 0.6.12's `_load_weights` writes into `VisionTransformer` (no head).

  Same statements as timm 0.6.12 (`vision_transformer.py::_load_weights`, non-hybrid path,
  `num_classes=0` so the head is Identity and skipped); the position embedding is used as stored
  (timm resamples it only when the token grid differs, which never happens here). Dtype: the
  default torch dtype (float32, or float64 for the float64 reference run).
  """
  dt = torch.get_default_dtype()
  sd: dict[str, torch.Tensor] = collections.OrderedDict()
  sd["cls_token"] = _n2p(w["cls"], t=False)
  sd["pos_embed"] = _n2p(w["Transformer/posembed_input/pos_embedding"], t=False)
  sd["patch_embed.proj.weight"] = _n2p(w["embedding/kernel"])
  sd["patch_embed.proj.bias"] = _n2p(w["embedding/bias"])
  depth = 0
  while f"Transformer/encoderblock_{depth}/LayerNorm_0/scale" in w:
    depth += 1
  for i in range(depth):
    bp = f"Transformer/encoderblock_{i}/"
    mp = f"{bp}MultiHeadDotProductAttention_1/"
    b = f"blocks.{i}."
    sd[b + "norm1.weight"] = _n2p(w[f"{bp}LayerNorm_0/scale"])
    sd[b + "norm1.bias"] = _n2p(w[f"{bp}LayerNorm_0/bias"])
    sd[b + "attn.qkv.weight"] = torch.cat(
      [_n2p(w[f"{mp}{n}/kernel"], t=False).flatten(1).T for n in ("query", "key", "value")]
    )
    sd[b + "attn.qkv.bias"] = torch.cat(
      [_n2p(w[f"{mp}{n}/bias"], t=False).reshape(-1) for n in ("query", "key", "value")]
    )
    sd[b + "attn.proj.weight"] = _n2p(w[f"{mp}out/kernel"]).flatten(1)
    sd[b + "attn.proj.bias"] = _n2p(w[f"{mp}out/bias"])
    sd[b + "norm2.weight"] = _n2p(w[f"{bp}LayerNorm_2/scale"])
    sd[b + "norm2.bias"] = _n2p(w[f"{bp}LayerNorm_2/bias"])
    for r in range(2):
      sd[b + f"mlp.fc{r + 1}.weight"] = _n2p(w[f"{bp}MlpBlock_3/Dense_{r}/kernel"])
      sd[b + f"mlp.fc{r + 1}.bias"] = _n2p(w[f"{bp}MlpBlock_3/Dense_{r}/bias"])
  sd["norm.weight"] = _n2p(w["Transformer/encoder_norm/scale"])
  sd["norm.bias"] = _n2p(w["Transformer/encoder_norm/bias"])
  return collections.OrderedDict((k, v.to(dt).contiguous()) for k, v in sd.items())


class _LoadedViT(nn.Module):
  """Holds the converted weights; the official code only calls `state_dict()` on it."""

  def __init__(self, sd: dict[str, torch.Tensor]):
    super().__init__()
    self._sd = sd

  def state_dict(self, *args, **kwargs):
    return collections.OrderedDict((k, v.clone()) for k, v in self._sd.items())


def create_model(name: str, pretrained: bool = False, num_classes: int = 1000, **kwargs):
  if not pretrained or num_classes != 0 or kwargs:
    raise NotImplementedError(
      "stand-in timm: only create_model(name, pretrained=True, num_classes=0)"
    )
  if name not in ("vit_base_patch16_224", "vit_base_patch16_224_in21k"):
    raise NotImplementedError(f"stand-in timm: unknown model {name!r}")
  if _CHECKPOINT["path"] is None:
    raise RuntimeError("stand-in timm: call timm.set_checkpoint(<AugReg .npz>) first")
  with np.load(_CHECKPOINT["path"], allow_pickle=False) as f:
    w = {k: f[k] for k in f.files}
  return _LoadedViT(augreg_to_timm_state_dict(w))
