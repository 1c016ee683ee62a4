"""Load and drive the official NTK-CL code (`Programmergg/NTK-CL`, an extracted checkout) on CPU.

Requires PyTorch (`pip install torch==2.13.0`, a CPU wheel); never imported by the package.
Everything here is a stand-in or a patch applied from outside; no official file is edited. Each
one, and why:

1. `timm` → `experiments/parity/standin/timm` (timm 0.6.12 imports torchvision, which cannot be
   imported here, and downloads weights): `create_model(..., pretrained=True, num_classes=0)`
   returns the state dict timm 0.6.12's `_load_weights` builds from an AugReg `.npz`;
   `PatchEmbed`, `DropPath` as in timm 0.6.12.
2. `easydict` → a 5-line dict-with-attributes, only if the package is not installed.
3. `main.get_parser` is read from `main.py` with `ast` and run alone (importing `main` would import
   `trainer` → `dataloader` → torchvision). Its defaults and per-dataset overrides are the official
   ones; the parity cases then override the task geometry (init_cls, increment, batch size).
4. Tiny geometry only (`ViT` other than ViT-B/16): `inc_net.get_backbone` is replaced by
   `tiny_get_backbone`, the same statements with the width, depth, heads and image size as
   arguments (the official one hard-codes ViT-B/16, `d_model=768` and splits the fused qkv at
   768), and `CosineLinear.forward_reweight`'s default `out_dim=768` becomes the width (SPEC §4:
   at other widths it would mix sections). ViT-B/16 runs the unmodified functions.
5. Token count ≠ 197 only (the demo's 28 px geometry has 50 tokens): `models/prompt_vit.py`
   hard-codes 197 (quirk Q8); its source is loaded with the literal `197` replaced by the token
   count. The parity fixtures use 197-token geometries and so run the file as released.
6. Dropout: for deterministic comparisons the dropout *rates* are set to 0 on the instances
   (`Channel_Prompt.dropout`, `AttentionFusion.dropout.p`); the network stays in train mode, so
   every other train-mode path (and Q9's EMA-pass dropout call) runs as released.
7. Instrumentation (records, changes nothing): forward hooks on `backbone.norm` (per-pass CLS
   features), on `PromptNet` (proxy logits, c, p, m, L_orth) and on `nce_loss` (L_MI);
   `torch.randperm` and `torch.linalg.svd` are wrapped during the step to record the L_MI row
   subset and the orthogonality basis; `F.cross_entropy` in `models.learner` is wrapped to record
   the three CE terms. L_reg is recomputed afterwards by the same loop as `_init_train`.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import importlib.util
import pathlib
import sys
import types
from typing import Any

STANDIN = pathlib.Path(__file__).resolve().parent / "standin"


@dataclasses.dataclass(frozen=True)
class Geometry:
  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072

  @property
  def num_tokens(self) -> int:
    return 1 + (self.image_size // self.patch_size) ** 2

  @property
  def is_vit_b16(self) -> bool:
    return self == Geometry()


def _easydict_standin() -> None:
  try:
    import easydict  # noqa: F401
  except ImportError:
    mod = types.ModuleType("easydict")

    class EasyDict(dict):
      def __getattr__(self, k):
        try:
          return self[k]
        except KeyError:
          raise AttributeError(k) from None

      def __setattr__(self, k, v):
        self[k] = v

    mod.EasyDict = EasyDict
    sys.modules["easydict"] = mod


def load(official_dir: str | pathlib.Path, num_tokens: int = 197) -> types.SimpleNamespace:
  """Imports the official `models.{prompt_vit, inc_net, learner}` with the stand-ins (1-2, 5)."""
  official_dir = pathlib.Path(official_dir).resolve()
  if not (official_dir / "models" / "learner.py").exists():
    raise FileNotFoundError(f"{official_dir} is not an NTK-CL checkout (no models/learner.py).")
  for p in (str(official_dir), str(STANDIN)):
    if p not in sys.path:
      sys.path.insert(0, p)
  _easydict_standin()
  import timm  # the stand-in (STANDIN is first on sys.path)

  if not hasattr(timm, "set_checkpoint"):
    raise ImportError(f"A real timm ({timm.__file__}) shadows the stand-in.")
  if num_tokens != 197:  # patch 5
    src = (official_dir / "models" / "prompt_vit.py").read_text()
    spec = importlib.util.spec_from_loader("models.prompt_vit", loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__file__ = str(official_dir / "models" / "prompt_vit.py")
    import models  # the official package

    exec(compile(src.replace("197", str(num_tokens)), mod.__file__, "exec"), mod.__dict__)
    sys.modules["models.prompt_vit"] = mod
    models.prompt_vit = mod
  import models.inc_net as inc_net
  import models.learner as learner
  import models.prompt_vit as prompt_vit

  return types.SimpleNamespace(
    dir=official_dir, timm=timm, prompt_vit=prompt_vit, inc_net=inc_net, learner=learner
  )


def official_args(official_dir: pathlib.Path, dataset: str, **overrides) -> argparse.Namespace:
  """The official `main.get_parser()` defaults for `--dataset dataset`, then `overrides` (3)."""
  import torch

  tree = ast.parse((pathlib.Path(official_dir) / "main.py").read_text())
  fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_parser")
  ns: dict[str, Any] = {"argparse": argparse}
  exec(compile(ast.Module([fn], []), "main.py", "exec"), ns)
  argv = sys.argv
  try:
    sys.argv = ["main.py", "--dataset", dataset]
    args = ns["get_parser"]()
  finally:
    sys.argv = argv
  for k, v in overrides.items():
    setattr(args, k, v)
  args.device = [torch.device("cpu")]  # what trainer._set_device does, for CPU
  return args


def tiny_get_backbone(off: types.SimpleNamespace, geo: Geometry):
  """`inc_net.get_backbone` + `prompt_vit.vit_base_patch16_224_in21k` with `geo` instead of the
  hard-coded ViT-B/16 (patch 4): same statements, 768 → width."""
  from easydict import EasyDict
  from torch import nn

  def get_backbone(args):
    w = geo.width
    tuning_config = EasyDict(
      ffn=True,
      ffn_scalar="0.1",
      ffn_num=args.ffn_num,
      d_model=w,
      num_prompt_tokens=args.num_prompt_tokens,
      hidden_size=args.hidden_size,
      frozen_prompt_list_num=args.frozen_prompt_list_num,
      prompt_mode=args.model_name,
      _device=args.device[0],
      dataset=args.dataset,
    )
    model = off.prompt_vit.VisionTransformer_Prompt(
      img_size=geo.image_size,
      patch_size=geo.patch_size,
      embed_dim=w,
      depth=geo.depth,
      num_heads=geo.num_heads,
      mlp_ratio=geo.mlp_dim / w,
      qkv_bias=True,
      norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
      num_classes=0,
      drop_path_rate=0.0,
      tuning_config=tuning_config,
    )
    state_dict = off.timm.create_model(
      "vit_base_patch16_224_in21k", pretrained=True, num_classes=0
    ).state_dict()
    for key in list(state_dict.keys()):
      if "qkv.weight" in key or "qkv.bias" in key:
        t = state_dict.pop(key)
        kind = key.split(".")[-1]
        for j, n in enumerate(("q_proj", "k_proj", "v_proj")):
          state_dict[key.replace(f"qkv.{kind}", f"{n}.{kind}")] = t[j * w : (j + 1) * w]
    for key in list(state_dict.keys()):
      if "mlp.fc" in key:
        state_dict[key.replace("mlp.", "")] = state_dict.pop(key)
    msg = model.load_state_dict(state_dict, strict=False)
    for name, p in model.named_parameters():
      p.requires_grad = name in msg.missing_keys
    for i in range(model.frozen_prompt_list_num, 0, -1):
      for kind in ("patch", "channel"):
        v = getattr(model, f"{'pre_' * i}{kind}_prompt_list")
        if isinstance(v, nn.ModuleList):
          v.requires_grad_(False)
    model.out_dim = w
    return model.eval()

  return get_backbone


def patch_geometry(off: types.SimpleNamespace, geo: Geometry) -> None:
  """Patch 4 (tiny geometry only; ViT-B/16 keeps the official functions)."""
  if geo.is_vit_b16:
    return
  off.inc_net.get_backbone = tiny_get_backbone(off, geo)
  fr = off.inc_net.CosineLinear.forward_reweight
  d = list(fr.__defaults__)
  d[fr.__code__.co_varnames[: fr.__code__.co_argcount].index("out_dim") - 2] = geo.width
  fr.__defaults__ = tuple(d)


def set_dropout(net, rate: float) -> None:
  """Patch 6: adapter and fusion dropout rates on the instances (train mode stays on)."""
  for name in ("channel_prompt_list", "pre_channel_prompt_list"):
    for m in getattr(net.backbone, name):
      m.dropout = rate
  net.fusion_model.dropout.p = rate


@contextlib.contextmanager
def recording(off, net):
  """Instrumentation 7: yields a dict filled during one training step."""
  import torch

  rec: dict[str, Any] = {"cls": [], "ce": [], "randperm": [], "svd_u": [], "mi": [], "forward": []}

  def keep(
    key, fn
  ):  # a forward hook that records and returns None (a value would replace the output)
    return lambda m, i, o: rec[key].append(fn(o)) and None

  hooks = [
    net.backbone.norm.register_forward_hook(keep("cls", lambda o: o[:, 0].detach())),
    net.nce_loss.register_forward_hook(keep("mi", lambda o: o.detach())),
    net.register_forward_hook(keep("forward", lambda o: o)),
  ]
  orig_randperm, orig_svd = torch.randperm, torch.linalg.svd
  orig_f = off.learner.F

  def randperm(*a, **k):
    out = orig_randperm(*a, **k)
    rec["randperm"].append(out.clone())
    return out

  def svd(*a, **k):
    out = orig_svd(*a, **k)
    rec["svd_u"].append(out[0].detach().clone())
    return out

  class RecordingF(types.SimpleNamespace):
    def __getattr__(self, name):
      return getattr(orig_f, name)

    @staticmethod
    def cross_entropy(*a, **k):
      out = orig_f.cross_entropy(*a, **k)
      rec["ce"].append(out.detach())
      return out

  torch.randperm, torch.linalg.svd, off.learner.F = randperm, svd, RecordingF()
  try:
    yield rec
  finally:
    torch.randperm, torch.linalg.svd, off.learner.F = orig_randperm, orig_svd, orig_f
    for h in hooks:
      h.remove()


def reg_loss(net):
  """L_reg by the same loop as the official `_init_train` (it is not returned by it)."""
  import torch

  reg = torch.tensor(0.0)
  pairs = list(zip(net.reg_channel_prompt_list, net.backbone.channel_prompt_list))
  pairs += list(zip(net.reg_patch_prompt_list, net.backbone.patch_prompt_list))
  f, rf = net.fusion_model, net.reg_fusion_model
  pairs += [(rf.key, f.key), (rf.value, f.value), (rf.query, f.query)]
  for pre_module, module in pairs:
    for (_, pre_param), (name, param) in zip(
      pre_module.named_parameters(), module.named_parameters()
    ):
      if param.requires_grad and "weight" in name:
        reg = reg + (param - pre_param).pow(2).sum()
  return reg
