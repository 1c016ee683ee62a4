"""ntkcl_jax.prototypes against plain NumPy (SPEC 1.6, quirk Q6)."""

import numpy as np
import pytest

from ntkcl_jax import prototypes as P


def _data(n=40, d=6, classes=4, seed=0):
  rng = np.random.default_rng(seed)
  feats = rng.normal(size=(n, d)).astype(np.float32)
  labels = np.arange(n) % classes
  return feats, labels


def test_class_means_match_numpy():
  feats, labels = _data()
  got = P.class_means(feats, labels + 3, range(3, 7))
  want = np.stack([feats[labels == k].astype(np.float64).mean(0) for k in range(4)])
  assert got.dtype == np.float32 and got.shape == (4, 6)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  with pytest.raises(ValueError, match="Class 8 has no training images"):
    P.class_means(feats, labels, range(8, 10))


def test_drift_compensation_matches_numpy_loops():
  rng = np.random.default_rng(1)
  protos = rng.normal(size=(3, 5)).astype(np.float32)
  old = rng.normal(size=(7, 5)).astype(np.float32)
  new = old + rng.normal(scale=0.1, size=(7, 5)).astype(np.float32)
  sigma = 0.3
  want = np.zeros((3, 5))
  for k in range(3):
    mu = protos[k] / np.linalg.norm(protos[k])
    w = np.array([np.exp(-np.sum((o / np.linalg.norm(o) - mu) ** 2) / (2 * sigma**2)) for o in old])
    want[k] = protos[k] + (w[:, None] * (new - old)).sum(0) / w.sum()
  np.testing.assert_allclose(P.drift_compensation(protos, old, new, sigma), want, rtol=1e-5)
  # no drift, no shift; no old rows, nothing to do
  np.testing.assert_allclose(P.drift_compensation(protos, old, old), protos, rtol=1e-6)
  assert P.drift_compensation(protos[:0], old, new).shape == (0, 5)


@pytest.mark.parametrize("refresh", ["never", "drift_compensation", "oracle"])
def test_update_after_task(refresh):
  feats, labels = _data(n=24, classes=2, seed=2)
  before = np.zeros((6, 6), np.float32)
  before[:2] = np.arange(12, dtype=np.float32).reshape(2, 6)  # rows of task 0 (classes 0, 1)
  old_feats = feats - 0.5
  seen = _data(n=10, classes=2, seed=3)
  calls = []

  def old():
    calls.append("old")
    return old_feats

  def seen_feats():
    calls.append("seen")
    return seen

  out = P.update_after_task(
    before, 2, 2, feats, labels + 2, refresh=refresh, old_feats=old, seen_feats=seen_feats
  )
  np.testing.assert_allclose(out[2:4], P.class_means(feats, labels + 2, range(2, 4)))
  np.testing.assert_array_equal(out[4:], 0)
  assert before[2:].sum() == 0  # the input is not modified
  if refresh == "never":
    np.testing.assert_array_equal(out[:2], before[:2])
    assert calls == []
  elif refresh == "drift_compensation":
    np.testing.assert_allclose(out[:2], P.drift_compensation(before[:2], old_feats, feats))
    assert not np.allclose(out[:2], before[:2]) and calls == ["old"]
  else:
    np.testing.assert_allclose(out[:2], P.class_means(*seen, range(2)))
    assert calls == ["seen"]


def test_first_task_never_refreshes():
  feats, labels = _data(n=8, classes=2)
  out = P.update_after_task(np.zeros((4, 6), np.float32), 0, 2, feats, labels, refresh="oracle")
  np.testing.assert_allclose(out[:2], P.class_means(feats, labels, range(2)))
  with pytest.raises(ValueError, match="refresh"):
    P.update_after_task(out, 2, 2, feats, labels + 2, refresh="sometimes")
