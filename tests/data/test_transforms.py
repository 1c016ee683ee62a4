"""SPEC 2.5 transforms: torchvision RandomResizedCrop sampling, flip, test transform, ranges."""

import math

import numpy as np
import pytest

from ntkcl_jax.data import transforms as T


class ScriptedRng:
  """Stands in for np.random.Generator, replaying fixed draws and counting calls."""

  def __init__(self, uniforms=(), integers=(), randoms=()):
    self._u, self._i, self._r = list(uniforms), list(integers), list(randoms)
    self.calls = {"uniform": [], "integers": [], "random": 0}

  def uniform(self, low, high):
    self.calls["uniform"].append((low, high))
    return low + self._u.pop(0) * (high - low)  # scripted values are fractions of the range

  def integers(self, low, high):
    self.calls["integers"].append((low, high))
    return self._i.pop(0)

  def random(self):
    self.calls["random"] += 1
    return self._r.pop(0)


def test_rrc_params_accepts_first_valid_try():
  # area 100*100, scale fraction 0.25 of (0.05,1) -> 0.05+0.2375=0.2875; log-ratio at the middle
  rng = ScriptedRng(uniforms=[0.25, 0.5], integers=[7, 3])
  top, left, h, w = T.random_resized_crop_params(100, 100, rng)
  target = 10000 * (0.05 + 0.25 * 0.95)
  aspect = math.exp(0.5 * (math.log(3 / 4) + math.log(4 / 3)))  # = 1
  assert (h, w) == (int(round(math.sqrt(target / aspect))), int(round(math.sqrt(target * aspect))))
  assert (top, left) == (7, 3)
  # torchvision draws top in [0, H-h], left in [0, W-w] (integers' high is exclusive)
  assert rng.calls["integers"] == [(0, 100 - h + 1), (0, 100 - w + 1)]
  assert rng.calls["uniform"][1] == pytest.approx((math.log(3 / 4), math.log(4 / 3)))


def test_rrc_params_retries_then_accepts():
  # try 1: area fraction 1 (full area) with extreme ratio 4/3 -> w = round(sqrt(1e4*4/3)) = 115 > 100
  # try 2: area 0.05 + 0.0 -> 500 px, ratio 1 -> 22x22
  rng = ScriptedRng(uniforms=[1.0, 1.0, 0.0, 0.5], integers=[0, 78])
  assert T.random_resized_crop_params(100, 100, rng) == (0, 78, 22, 22)
  assert len(rng.calls["uniform"]) == 4


@pytest.mark.parametrize(
  "height,width,expected",
  [
    (100, 50, ((100 - 67) // 2, 0, 67, 50)),  # too tall: w = W, h = round(W / (3/4))
    (50, 100, (0, (100 - 67) // 2, 50, 67)),  # too wide: h = H, w = round(H * 4/3)
    (60, 70, (0, 0, 60, 70)),  # ratio inside [3/4, 4/3]: whole image
  ],
)
def test_rrc_params_fallback_after_ten_failed_tries(height, width, expected):
  # scale (2, 3) can never fit: every try fails, 20 uniforms, no integers, then the centre crop.
  rng = ScriptedRng(uniforms=[0.5] * 20)
  assert T.random_resized_crop_params(height, width, rng, scale=(2.0, 3.0)) == expected
  assert len(rng.calls["uniform"]) == 20 and rng.calls["integers"] == []


def test_rrc_params_statistics_with_real_generator():
  rng = np.random.default_rng(0)
  fracs, ratios = [], []
  for _ in range(500):
    top, left, h, w = T.random_resized_crop_params(200, 200, rng)
    assert 0 <= top <= 200 - h and 0 <= left <= 200 - w and h > 0 and w > 0
    fracs.append(h * w / 40000)
    ratios.append(w / h)
  assert min(fracs) >= 0.04 and max(fracs) <= 1.0
  assert 0.7 < min(ratios) and max(ratios) < 1.4
  assert 0.45 < np.mean(fracs) < 0.6  # E[U(0.05, 1)] = 0.525 (minus a few rejections)


def test_random_resized_crop_shape_and_determinism():
  img = np.random.default_rng(1).integers(0, 256, (28, 28, 3), dtype=np.uint8)
  a = T.random_resized_crop(img, 32, np.random.default_rng(5))
  b = T.random_resized_crop(img, 32, np.random.default_rng(5))
  c = T.random_resized_crop(img, 32, np.random.default_rng(6))
  assert a.shape == (32, 32, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_random_resized_crop_full_crop_of_constant_image_is_constant():
  img = np.full((20, 30, 3), 77, dtype=np.uint8)
  out = T.random_resized_crop(img, 16, np.random.default_rng(0))
  assert np.all(out == 77)


def test_hflip():
  img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
  np.testing.assert_array_equal(T.hflip(img, ScriptedRng(randoms=[0.49])), img[:, ::-1])
  np.testing.assert_array_equal(T.hflip(img, ScriptedRng(randoms=[0.5])), img)
  flips = [
    T.hflip(img, r)[0, 0, 0] != img[0, 0, 0] for r in [np.random.default_rng(s) for s in range(400)]
  ]
  assert 0.4 < np.mean(flips) < 0.6


def _gradient(height, width):
  col = np.arange(width, dtype=np.uint8)
  return np.broadcast_to(col[None, :, None], (height, width, 3)).copy()


@pytest.mark.parametrize("height,top", [(40, 10), (41, 10), (43, 12)])
def test_test_transform_center_crop_pixels(height, top):
  # top = int(round((H - 20) / 2)): 10, round(10.5) = 10 (half to even, as torchvision), 12.
  # The short side (height < width 60) already equals resize_size: only the centre crop acts.
  img = _gradient(height, 60)  # channel 0 encodes the column
  img[:, :, 1] = np.arange(height, dtype=np.uint8)[:, None]  # channel 1 encodes the row
  out = T.test_transform_uint8(img, 20, resize_size=height)
  left = int(round((60 - 20) / 2))
  np.testing.assert_array_equal(out[0, :, 0], np.arange(left, left + 20))
  np.testing.assert_array_equal(out[:, 0, 1], np.arange(top, top + 20))


def test_test_transform_resizes_short_side_then_crops():
  img = (_gradient(64, 96).astype(np.int32) * 2).astype(np.uint8)  # value = 2 * column
  assert T.resize_short_side(img, 32).shape == (32, 48, 3)
  assert T.resize_short_side(img.transpose(1, 0, 2), 32).shape == (48, 32, 3)
  out = T.test_transform(img, 24, resize_size=32)
  assert out.shape == (24, 24, 3) and out.dtype == np.float32
  # resized column j ~ original columns 2j, 2j+1 -> value 4j + 1; crop starts at column 12
  expected = (4 * np.arange(12, 36) + 1) / 255.0
  np.testing.assert_allclose(out[12, :, 0], expected, atol=2.5 / 255)
  with pytest.raises(ValueError, match="resize_size"):
    T.test_transform(img, 24, resize_size=20)


def test_value_ranges():
  img = np.array([[[0, 128, 255]]], dtype=np.uint8)
  np.testing.assert_allclose(T.to_float(img), [[[0.0, 128 / 255, 1.0]]], rtol=1e-7)
  np.testing.assert_allclose(T.to_float(img, "-1_1"), [[[-1.0, 128 / 255 * 2 - 1, 1.0]]], atol=1e-6)
  with pytest.raises(ValueError, match="value_range"):
    T.to_float(img, "0_255")
  big = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
  out = T.train_transform(big, 24, np.random.default_rng(0), value_range="-1_1")
  assert out.shape == (24, 24, 3) and out.dtype == np.float32
  assert out.min() >= -1.0 and out.max() <= 1.0


def test_batch_helpers_match_single_image_transforms():
  imgs = [
    np.random.default_rng(k).integers(0, 256, (30 + k, 28, 3), dtype=np.uint8) for k in range(3)
  ]
  test_batch = T.test_transform_batch(imgs, 16, 18)
  np.testing.assert_array_equal(test_batch[2], T.test_transform(imgs[2], 16, 18))
