"""SPEC 3 metrics on hand-made matrices, and the JSON-lines writer (SPEC 8)."""

import json
import logging
import math
import pathlib
import struct
import sys

import numpy as np
import pytest

from ntkcl_jax import metrics

NAN = np.nan
# R[l, i]: accuracy on task i after training task l (T = 3).
R3 = np.array(
  [
    [90.0, NAN, NAN],
    [80.0, 85.0, NAN],
    [70.0, 88.0, 75.0],
  ]
)


def test_average_and_last_accuracy():
  A = [90.0, 82.5, 77.0]
  assert metrics.average_accuracy(A) == pytest.approx((90.0 + 82.5 + 77.0) / 3)
  assert metrics.last_accuracy(A) == 77.0
  with pytest.raises(ValueError, match="non-empty"):
    metrics.average_accuracy([])


def test_forgetting_by_hand():
  # task 0: max(R[0,0], R[1,0]) - R[2,0] = 90 - 70 = 20
  # task 1: max(R[1,1]) - R[2,1] = 85 - 88 = -3
  assert metrics.forgetting(R3) == pytest.approx((20.0 - 3.0) / 2)


def test_forgetting_uses_max_over_intermediate_stages():
  R = np.array(
    [
      [60.0, NAN, NAN, NAN],
      [70.0, 50.0, NAN, NAN],  # task 0 improves after task 1
      [65.0, 55.0, 40.0, NAN],
      [50.0, 45.0, 30.0, 90.0],
    ]
  )
  # task 0: max(60, 70, 65) - 50 = 20; task 1: max(50, 55) - 45 = 10; task 2: 40 - 30 = 10
  assert metrics.forgetting(R) == pytest.approx(40.0 / 3)
  # BWT: (50-60 + 45-50 + 30-40) / 3
  assert metrics.backward_transfer(R) == pytest.approx(-25.0 / 3)


def test_backward_transfer_by_hand():
  # (70 - 90 + 88 - 85) / 2
  assert metrics.backward_transfer(R3) == pytest.approx(-8.5)


def test_single_task_gives_zero():
  R = np.array([[93.0]])
  assert metrics.forgetting(R) == 0.0
  assert metrics.backward_transfer(R) == 0.0


def test_upper_triangle_is_ignored_but_lower_must_be_finite():
  R = R3.copy()
  R[0, 2] = 1e9
  assert metrics.forgetting(R) == metrics.forgetting(R3)
  R[2, 0] = NAN
  with pytest.raises(ValueError, match="non-finite"):
    metrics.forgetting(R)
  with pytest.raises(ValueError, match="square"):
    metrics.backward_transfer(np.zeros((2, 3)))


def test_prediction_helpers():
  # 3 tasks of 2 classes; stage t = 1 has seen labels 0..3 (k_1 = 2).
  task_of_label = np.array([0, 0, 1, 1, 2, 2])
  label = np.array([0, 0, 1, 1, 2, 2, 3, 3, 3, 3])
  pred = np.array([0, 1, 1, 2, 2, 3, 3, 0, 3, 2])
  # task 0 samples (labels 0,1): correct = 0,?,1,? -> pred==label at rows 0, 2 -> 2/4
  # task 1 samples: rows 4..9: correct rows 4, 6, 8 -> 3/6
  np.testing.assert_allclose(metrics.accuracy_row(pred, label, task_of_label, 1), [50.0, 50.0])
  assert metrics.accuracy(pred, label) == pytest.approx(50.0)
  old, new = metrics.old_new_accuracy(pred, label, k_t=2)
  assert (old, new) == (pytest.approx(50.0), pytest.approx(50.0))
  # task of pred: rows 0..9 -> [0,0,0,1,1,1,1,0,1,1]; of label [0,0,0,0,1,1,1,1,1,1]
  # equal at rows 0,1,2,4,5,6,8,9 -> 8/10
  assert metrics.task_id_accuracy(pred, label, task_of_label) == pytest.approx(80.0)
  top2 = np.stack([pred, np.array([5, 0, 0, 1, 0, 0, 0, 3, 0, 3])], axis=1)
  # hits: rows 0,1,2,3,4,6,7,8,9 (row 5: label 2 vs {3, 0} miss) -> 9/10
  assert metrics.topk_accuracy(top2, label) == pytest.approx(90.0)
  out = metrics.stage_metrics(pred, label, task_of_label, 1, 2, topk_pred=top2)
  assert out["R_row"] == [50.0, 50.0]
  assert out["A"] == 50.0 and out["top5"] == 90.0 and out["task_id"] == 80.0


def test_stage_accuracy_is_sample_weighted_not_task_mean():
  task_of_label = np.array([0, 1])
  label = np.array([0, 1, 1, 1])
  pred = np.array([0, 0, 0, 0])
  row = metrics.accuracy_row(pred, label, task_of_label, 1)
  np.testing.assert_allclose(row, [100.0, 0.0])
  assert metrics.accuracy(pred, label) == pytest.approx(25.0)  # not mean(row) = 50


def test_old_is_nan_at_task0_and_row_rejects_unseen_labels():
  old, new = metrics.old_new_accuracy(np.array([0, 1]), np.array([0, 0]), k_t=0)
  assert math.isnan(old) and new == 50.0
  with pytest.raises(ValueError, match="task 1"):
    metrics.accuracy_row(np.array([0]), np.array([1]), np.array([0, 1]), 0)


def test_seed_mean_std_ddof0():
  mean, std = metrics.seed_mean_std([1.0, 2.0, 3.0, 4.0])
  assert mean == 2.5
  assert std == pytest.approx(math.sqrt((1.5**2 + 0.5**2) * 2 / 4))  # ddof=0: sqrt(1.25)
  assert std != pytest.approx(np.std([1.0, 2.0, 3.0, 4.0], ddof=1))


def test_final_metrics_values():
  out = metrics.final_metrics(R3, [90.0, 82.0, 78.0])
  assert out["avg_acc"] == pytest.approx(250.0 / 3)
  assert out["last_acc"] == 78.0
  assert out["forgetting"] == pytest.approx(8.5)
  assert out["bwt"] == pytest.approx(-8.5)
  assert math.isnan(out["R"][0][1]) and out["R"][2][1] == 88.0


def test_metric_writer_appends_plain_json(tmp_path):
  path = tmp_path / "sub" / "metrics.jsonl"
  with metrics.MetricWriter(path) as writer:
    writer.write(
      {"kind": "eval", "task": np.int64(1), "A": np.float32(0.5), "row": np.array([1.0, 2.0])}
    )
    # flushed on each write: the line is on disk before close
    assert json.loads(path.read_text().splitlines()[0])["task"] == 1
  with metrics.MetricWriter(path) as writer:  # a resumed run appends
    writer.write(metrics.final_metrics(R3, [90.0, 82.0, 78.0]))
  lines = path.read_text().splitlines()
  assert len(lines) == 2
  first, second = (json.loads(line) for line in lines)
  assert first == {"kind": "eval", "task": 1, "A": 0.5, "row": [1.0, 2.0]}
  assert second["R"][0] == [90.0, None, None]  # NaN -> null, valid JSON
  assert metrics.read_jsonl(path)[1]["bwt"] == pytest.approx(-8.5)


def test_metric_writer_disabled_writes_nothing(tmp_path):
  path = tmp_path / "metrics.jsonl"
  writer = metrics.MetricWriter(path, enabled=False)
  writer.write({"kind": "train", "loss": 1.0})
  writer.close()
  assert not path.exists()


def _tensorboard_events(logdir) -> list:
  """Every `Event` proto of the TFRecord event files under `logdir`, in file then write order."""
  from tensorboardX.proto import event_pb2

  events = []
  for path in sorted(pathlib.Path(logdir).glob("events.out.tfevents.*")):
    data, pos = path.read_bytes(), 0
    while pos < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      events.append(event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length]))
      pos += 12 + length + 4
  return events


def tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} of the scalar summaries under `logdir` that TensorBoard shows:
  a session START event at step s (a resumed run's purge marker) hides earlier points at >= s."""
  from tensorboardX.proto.event_pb2 import SessionLog

  out: dict[str, list[tuple[int, float]]] = {}
  for event in _tensorboard_events(logdir):
    if event.session_log.status == SessionLog.START:
      out = {tag: [(s, v) for s, v in pts if s < event.step] for tag, pts in out.items()}
    for value in event.summary.value:
      out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def test_metric_writer_tensorboard_scalars_at_the_given_step(tmp_path):
  pytest.importorskip("tensorboardX")
  tb = tmp_path / "tb"
  with metrics.MetricWriter(tmp_path / "m.jsonl", tensorboard_dir=tb) as writer:
    assert writer.tensorboard
    writer.write({"kind": "train", "task": 0, "total": np.float32(2.5), "lr": 0.01}, step=3)
    writer.write({"kind": "eval", "A": 75.0, "R_row": [75.0], "old": None, "ok": True}, step=4)
    writer.write({"kind": "train", "total": 9.0})  # no step: JSON only
  scalars = tensorboard_scalars(tb)
  assert scalars == {
    "train/task": [(3, 0.0)],
    "train/total": [(3, 2.5)],
    "train/lr": [(3, pytest.approx(0.01))],
    "eval/A": [(4, 75.0)],
  }
  assert len(metrics.read_jsonl(tmp_path / "m.jsonl")) == 3


def test_metric_writer_tensorboard_purge_step_marks_the_restart(tmp_path):
  pytest.importorskip("tensorboardX")
  from tensorboardX.proto.event_pb2 import SessionLog

  tb = tmp_path / "tb"
  with metrics.MetricWriter(tmp_path / "m.jsonl", tensorboard_dir=tb, purge_step=7) as writer:
    writer.write({"kind": "train", "total": 1.0}, step=8)
  starts = [e.step for e in _tensorboard_events(tb) if e.session_log.status == SessionLog.START]
  assert starts == [7]  # TensorBoard hides this run's older events at steps >= 7


def test_metric_writer_without_tensorboardx_writes_json_only(tmp_path, monkeypatch, caplog):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails as if not installed
  with caplog.at_level(logging.INFO, logger="ntkcl_jax.metrics"):
    writer = metrics.MetricWriter(tmp_path / "m.jsonl", tensorboard_dir=tmp_path / "tb")
  assert not writer.tensorboard
  assert "tensorboardX is not installed" in caplog.text
  writer.write({"kind": "train", "total": 1.0}, step=1)
  writer.close()
  assert metrics.read_jsonl(tmp_path / "m.jsonl") == [{"kind": "train", "total": 1.0}]
  assert not (tmp_path / "tb").exists()
