"""Official NTK-CL parameter names ↔ the ntkcl-jax parameter tree: the ONE table.

Official names are those of `PromptNet.named_parameters()` (`models/inc_net.py` at 24de712, with
`frozen_prompt_list_num=1`); project paths are `/`-joined paths in the trees ntkcl-jax uses
(`train_step.loss_fn`: params {"peft": {"current", "ema"}, "fusion"}, trainable "proxy_head",
aux "reg_snapshot" {"peft", "fusion"}). `{l}` is the block index.

Transform: "T" = transpose (PyTorch Linear weight (out, in) ↔ Flax kernel (in, out); the prompt
mixer's (n_prompts, N) ↔ (N, n_prompts)); "id" = same array; "squeeze" = PyTorch (1,) ↔ scalar ().

Not in the table, mapped elsewhere:
  * the frozen backbone (`backbone.patch_embed/cls_token/pos_embed/blocks.*/norm`): both sides load
    the same AugReg `.npz` (ntkcl-jax with `models.vit.load_augreg`, the official code through the
    timm stand-in, `experiments/parity/standin/timm`), so its mapping is timm's own `_load_weights`;
  * `fc.weight` (C_seen, D): the first C_seen rows of aux "prototypes"; `fc.sigma` stays 1 (the
    project's prototype logits use σ = 1);
  * the official `Attention.q_proj/k_proj/v_proj` split of timm's fused qkv (done by the official
    `vit_base_patch16_224*` functions, or their width-generic copy for the tiny geometry).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

# Official module prefix → project subtree. Banks: the trained bank, the EMA bank (the official
# "pre_" lists, updated only by `update_ema`) and the L_reg snapshot (the official "reg_" copies).
# The fusion and its snapshot; the per-task proxy head.
# fmt: off
TABLE: tuple[tuple[str, str, str], ...] = (
  # (official name, project path, transform); {B} ∈ BANKS, {F} ∈ FUSIONS.
  ("{B}channel_prompt_list.{l}.down_proj.weight",           "{b}/adapter_{l}/down/kernel", "T"),
  ("{B}channel_prompt_list.{l}.down_proj.bias",             "{b}/adapter_{l}/down/bias",   "id"),
  ("{B}channel_prompt_list.{l}.up_proj.weight",             "{b}/adapter_{l}/up/kernel",   "T"),
  ("{B}channel_prompt_list.{l}.up_proj.bias",               "{b}/adapter_{l}/up/bias",     "id"),
  ("{B}patch_prompt_list.{l}.global_patch_prompt.weight",   "{b}/prompt_{l}/mix/kernel",   "T"),
  ("{B}patch_prompt_list.{l}.global_patch_prompt.bias",     "{b}/prompt_{l}/mix/bias",     "id"),
  ("{B}patch_prompt_list.{l}.prompt_norm.weight",           "{b}/prompt_{l}/norm/scale",   "id"),
  ("{B}patch_prompt_list.{l}.prompt_norm.bias",             "{b}/prompt_{l}/norm/bias",    "id"),
  ("{F}.{qkv}.weight",                                      "{f}/{qkv}/kernel",            "T"),
  ("{F}.{qkv}.bias",                                        "{f}/{qkv}/bias",              "id"),
  ("proxy_fc.weight",                                       "proxy_head/kernel",           "T"),
  ("proxy_fc.sigma",                                        "proxy_head/sigma",            "squeeze"),
)
BANKS = {  # official {B} → project {b}
  "backbone.": "peft/current",
  "backbone.pre_": "peft/ema",
  "reg_": "reg_snapshot/peft",
}
FUSIONS = {"fusion_model": "fusion", "reg_fusion_model": "reg_snapshot/fusion"}  # {F} → {f}
QKV = ("query", "key", "value")  # official AttentionFusion Linear names = project Dense names
# fmt: on


def _rules() -> list[tuple[re.Pattern, str, str]]:
  rules = []
  for off, proj, tf in TABLE:
    pat = (
      re.escape(off)
      .replace(r"\{l\}", r"(?P<l>\d+)")
      .replace(r"\{qkv\}", "(?P<qkv>query|key|value)")
    )
    if "{B}" in off:
      subs = [(re.escape(k), v, "{b}") for k, v in BANKS.items()]
      pat_key = re.escape("{B}")
    elif "{F}" in off:
      subs = [(re.escape(k), v, "{f}") for k, v in FUSIONS.items()]
      pat_key = re.escape("{F}")
    else:
      rules.append((re.compile(pat + "$"), proj, tf))
      continue
    for o, p, key in subs:
      rules.append((re.compile("^" + pat.replace(pat_key, o) + "$"), proj.replace(key, p), tf))
  return rules


_RULES = _rules()


def project_path(official_name: str) -> tuple[str, str] | None:
  """(project path, transform) of an official parameter name; None if not in the table."""
  for pat, proj, tf in _RULES:
    m = pat.match(official_name)
    if m:
      return proj.format(**m.groupdict()), tf
  return None


def _to_project(x: np.ndarray, tf: str) -> np.ndarray:
  x = np.asarray(x)
  return x.T if tf == "T" else (x.reshape(()) if tf == "squeeze" else x)


def _to_official(x: np.ndarray, tf: str) -> np.ndarray:
  x = np.asarray(x)
  return x.T if tf == "T" else (x.reshape((1,)) if tf == "squeeze" else x)


def set_path(tree: dict, path: str, value: Any) -> None:
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def get_path(tree: Mapping, path: str) -> Any:
  for p in path.split("/"):
    tree = tree[p]
  return tree


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    p = f"{prefix}/{k}" if prefix else k
    out.update(flatten(v, p) if isinstance(v, Mapping) else {p: v})
  return out


def official_to_project(named: Mapping[str, np.ndarray], strict: bool = True) -> dict[str, Any]:
  """{official name: array} → nested project tree (only names in the table)."""
  tree: dict[str, Any] = {}
  for name, value in named.items():
    hit = project_path(name)
    if hit is None:
      if strict:
        raise KeyError(f"Official parameter {name!r} is not in the mapping table.")
      continue
    set_path(tree, hit[0], _to_project(value, hit[1]))
  return tree


def project_to_official(
  tree: Mapping[str, Any], official_names: list[str]
) -> dict[str, np.ndarray]:
  """Project tree → {official name: array} for each of `official_names` (all must map)."""
  out = {}
  for name in official_names:
    hit = project_path(name)
    if hit is None:
      raise KeyError(f"Official parameter {name!r} is not in the mapping table.")
    out[name] = _to_official(get_path(tree, hit[0]), hit[1])
  return out
