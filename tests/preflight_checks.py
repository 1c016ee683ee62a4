"""Checks every preflight report of the tiny run shares, whatever the target (TPU or GPU)."""

from __future__ import annotations

from typing import Any


def check_run_report(report: dict[str, Any], seeds: str) -> dict[str, Any]:
  """The report of `tiny_config(seeds=seeds)` compiled with every function; returns its train
  step's entry (for the target-specific checks)."""
  assert report["stacked"] == bool(seeds) and report["fits"] is True
  by_name = {r["function"]: r for r in report["functions"]}
  assert sorted(by_name) == ["features", "predict", "train_step"]
  train_step = by_name["train_step"]
  m = train_step["memory_per_device"]
  assert (
    m["peak_bytes"]
    == m["argument_bytes"] + m["output_bytes"] - m["aliased_bytes"] + m["temp_bytes"]
  )
  assert m["aliased_bytes"] > 0  # the train state and health are donated
  assert train_step["images_per_call"] == (2 if seeds else 1) * 16
  assert train_step["flops_per_device"] > 0 and train_step["margin_bytes"] > 0
  return train_step
