"""DomainNet from the reference's ``domainnet_{train,test}.yaml`` split files (SPEC 6)."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import yaml

from ntkcl_jax.data.sources.files import FileSource, check_files_exist

DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")


def load_split_yaml(path: pathlib.Path) -> tuple[list[str], list[int]]:
  """(paths, targets) of a ``data:`` / ``targets:`` split file, read with PyYAML's safe loader.

  Raises ValueError naming the file, with the parser's line and column, when the YAML is malformed,
  and when it is not a mapping with a list of paths under ``data`` and a list of ints under
  ``targets`` of the same length.
  """
  loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader when libyaml is built in
  try:
    with open(path, encoding="utf-8") as f:  # a file object: the error marks name the file
      content = yaml.load(f, Loader=loader)
  except yaml.YAMLError as e:
    raise ValueError(f"{path} is not valid YAML: {e}") from e
  expected = "a mapping with keys 'data' (a list of image paths) and 'targets' (a list of ints)"
  if not isinstance(content, dict) or "data" not in content or "targets" not in content:
    found = sorted(map(str, content)) if isinstance(content, dict) else type(content).__name__
    raise ValueError(f"{path} must be {expected}; found {found}.")
  data, targets = content["data"], content["targets"]
  if not isinstance(data, list) or not isinstance(targets, list):
    raise ValueError(f"{path} must be {expected}; 'data' or 'targets' is not a list.")
  bad = [t for t in targets if isinstance(t, bool) or not isinstance(t, int)]
  if bad:
    raise ValueError(f"{path}: 'targets' must be ints; found {bad[:3]}.")
  if len(data) != len(targets):
    raise ValueError(f"{path}: {len(data)} paths but {len(targets)} targets.")
  return [str(p) for p in data], targets


def _rebase_domainnet_path(path: str, root: pathlib.Path) -> tuple[str, pathlib.PurePosixPath]:
  """Returns (absolute path under root, path relative to root)."""
  parts = pathlib.PurePosixPath(path.replace("\\", "/")).parts
  for k, part in enumerate(parts):
    if part in DOMAINNET_DOMAINS:
      rel = pathlib.PurePosixPath(*parts[k:])
      return str(root / rel), rel
  if pathlib.PurePosixPath(path).is_absolute():
    raise ValueError(
      f"DomainNet path {path!r} is absolute and has no domain folder ({', '.join(DOMAINNET_DOMAINS)})"
      " to rebase on the data root."
    )
  return str(root / path), pathlib.PurePosixPath(path)


def domainnet_yaml(
  yaml_path: str | os.PathLike,
  root: str | os.PathLike,
  *,
  num_classes: int = 345,
  check_files: bool = True,
) -> FileSource:
  """DomainNet from the reference's ``domainnet_{train,test}.yaml`` (SPEC 6).

  Keys ``data`` (image paths) and ``targets`` (int class ids). Paths are rebased on ``root``: the
  path from its first component naming a domain (``clipart``, ``infograph``, ``painting``,
  ``quickdraw``, ``real``, ``sketch``) onwards is joined to ``root``; a relative path without a
  domain component is joined to ``root`` as is. Class names are the folder after the domain
  (``<domain>/<class>/<file>``); every target must map to one name (else ValueError), and a class
  with no image gets the name ``"class_<id>"``.

  Args:
    yaml_path: the split file. root: the DomainNet root holding the six domain folders.
    num_classes: 345 for the benchmark; targets must lie in [0, num_classes).
    check_files: stat every file and raise listing missing ones.
  """
  yaml_path, root = pathlib.Path(yaml_path), pathlib.Path(root)
  if not yaml_path.exists():
    raise FileNotFoundError(f"DomainNet split file {yaml_path} does not exist.")
  data, targets = load_split_yaml(yaml_path)
  names: dict[int, str] = {}
  paths = []
  for p, t in zip(data, targets):
    full, rel = _rebase_domainnet_path(p, root)
    paths.append(full)
    if rel.parts and rel.parts[0] in DOMAINNET_DOMAINS and len(rel.parts) >= 3:
      cls = rel.parts[1]
      if names.setdefault(t, cls) != cls:
        raise ValueError(f"{yaml_path}: target {t} names both {names[t]!r} and {cls!r}.")
  class_names = [names.get(c, f"class_{c}") for c in range(num_classes)]
  if check_files:
    hint = f" root must hold {'/'.join(DOMAINNET_DOMAINS)} folders."
    check_files_exist(paths, f"DomainNet files from {yaml_path}", root, hint)
  return FileSource(
    paths,
    np.asarray(targets, dtype=np.int64),
    class_names,
    root=root,
    name=f"DomainNet({yaml_path})",
  )
