"""Command-line helpers shared by the entry points (`main`, `preflight`): absl flag parsing with
one `error: ...` line per problem (exit 2), and unknown `--config.<key>` overrides named with the
valid keys. Defines no flags (each entry point defines its own)."""

from __future__ import annotations

import difflib
import sys
from typing import NoReturn

from absl import flags

__all__ = ["fail", "parse_flags", "unknown_config_keys", "valid_keys_text"]


def fail(message: str) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def unknown_config_keys(argv: list[str]) -> list[str]:
  """The `--config.<key>` overrides in argv whose key is not in the config schema."""
  from ntkcl_jax.config import base_config, flat_config

  known = set(flat_config(base_config()))
  keys = [a[len("--config.") :].partition("=")[0] for a in argv if a.startswith("--config.")]
  return [k for k in keys if k not in known]


def valid_keys_text(key: str) -> str:
  from ntkcl_jax.config import base_config, flat_config

  known = sorted(flat_config(base_config()))
  section = key.rpartition(".")[0]
  near = difflib.get_close_matches(key, known, n=3)
  hint = f" Did you mean {' or '.join(repr(k) for k in near)}?" if near else ""
  same = [k for k in known if k.rpartition(".")[0] == section]
  if section and same:
    return f"{hint} Valid keys under '{section}': {', '.join(same)}."
  tops = sorted({k.partition(".")[0] + ("" if "." not in k else ".*") for k in known})
  return f"{hint} Valid top-level keys: {', '.join(tops)}."


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one `error: ...` line per problem (exit 2) instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f"{e}\nPass --helpfull to see the flags.")
  except OSError as e:  # the config file is missing or failed to load
    fail(str(e))
  except (AttributeError, KeyError):  # ml_collections: an override names a key the config lacks
    unknown = unknown_config_keys(argv)
    if not unknown:
      raise
    fail(
      "; ".join(f"unknown config key '{k}' (--config.{k}).{valid_keys_text(k)}" for k in unknown)
    )
