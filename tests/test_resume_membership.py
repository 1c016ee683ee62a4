"""Defect 6: the checkpoint records the data's split membership, and a resume on other data stops.

`data.membership` (examples and manifest sha256 per split) goes into every checkpoint's meta; a run
whose config is unchanged but whose data is not (a file list edited, an image removed) must refuse
to resume rather than continue training on other examples. Checkpoints written before the
membership was recorded still resume.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from ntkcl_jax import data, run_state, train
from tests import tiny_configs as tc


def _files(folder: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _membership_of(train_labels, test_labels):
  names = ["a", "b"]
  imgs = np.zeros((len(train_labels), 2, 2), np.uint8)
  tr = data.ArraySource(imgs, np.asarray(train_labels), names, name="tr")
  te = data.ArraySource(imgs[: len(test_labels)], np.asarray(test_labels), names, name="te")
  return data.membership(tr, te)


def test_check_membership_names_the_changed_split():
  saved = _membership_of([0, 1, 1], [0, 1])
  data.check_membership(saved, _membership_of([0, 1, 1], [0, 1]), "wd")  # same data
  data.check_membership(None, saved, "wd")  # a checkpoint from before membership was recorded
  changed = _membership_of([0, 1, 1, 0], [0, 1])
  with pytest.raises(ValueError, match=r"train: 3 examples .* now 4 .*new --workdir") as info:
    data.check_membership(saved, changed, "wd")
  assert "test:" not in str(info.value)  # only the split that changed is named
  relabelled = _membership_of([1, 1, 1], [0, 1])
  with pytest.raises(
    ValueError, match=r"train: 3 examples \(sha256 \w+…\) at the checkpoint, now 3"
  ):
    data.check_membership(saved, relabelled, "wd")


def test_resume_refuses_changed_membership_and_keeps_checkpoints(tmp_path, monkeypatch):
  config = tc.tiny_config(train__max_tasks=1)
  workdir = tmp_path / "run"
  train.run(config, workdir)
  ckpt_dir = workdir / "checkpoints"
  ckpts_before, metrics_before = _files(ckpt_dir), (workdir / "metrics.jsonl").read_bytes()

  # Same config, other data: the train split loses its first image (as when a file disappears
  # from an ImageFolder tree), so the capped split takes the next image of that class instead.
  real_make_source = run_state.make_source

  def make_source_without_first(name, split, data_dir=None):
    source = real_make_source(name, split, data_dir)
    if split != "train":
      return source
    return data.SubsetSource(source, np.arange(1, len(source)))

  monkeypatch.setattr(run_state, "make_source", make_source_without_first)
  with pytest.raises(ValueError, match=r"(?is)other data.*train: .*restore the original data"):
    train.run(config, workdir)
  assert _files(ckpt_dir) == ckpts_before  # nothing written, nothing removed
  assert (workdir / "metrics.jsonl").read_bytes() == metrics_before
  monkeypatch.undo()
  metas = sorted(ckpt_dir.glob("*/meta/metadata"))
  assert metas and all("data_membership" in json.loads(p.read_text()) for p in metas)

  # A checkpoint written before membership was recorded (no key in its meta) still resumes.
  for path in metas:
    meta = json.loads(path.read_text())
    del meta["data_membership"]
    path.write_text(json.dumps(meta))
  first = json.loads((workdir / "summary.json").read_text())
  assert train.run(config, workdir)["accuracy_matrix"] == first["accuracy_matrix"]
