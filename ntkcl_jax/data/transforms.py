"""Image transforms in NumPy + PIL (SPEC 2.5), deterministic given a ``np.random.Generator``.

Train: torchvision ``RandomResizedCrop(size, scale=(0.05, 1), ratio=(3/4, 4/3))`` (antialiased
bilinear) -> horizontal flip with p = 0.5 -> ÷255. Test: short side to ``resize_size`` (bicubic,
antialiased) -> centre crop ``size`` -> ÷255. PIL's resampling filters are antialiased when
downscaling, like torchvision's ``antialias=True``; exact pixel values may differ from
torchvision's tensor kernels (a permitted deviation, SPEC 0: "image resampling kernels").

Images in: uint8 (H, W, 3). Images out: float32 (size, size, 3) in [0, 1] (``value_range="0_1"``)
or [-1, 1] (``"-1_1"``: ``x / 255 * 2 - 1``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = [
  "VALUE_RANGES",
  "center_crop",
  "hflip",
  "random_resized_crop",
  "random_resized_crop_params",
  "resize_short_side",
  "test_transform",
  "test_transform_batch",
  "test_transform_uint8",
  "to_float",
  "train_transform",
  "train_transform_uint8",
]

VALUE_RANGES = ("0_1", "-1_1")


def _check_image(img: np.ndarray) -> np.ndarray:
  img = np.asarray(img)
  if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
    raise ValueError(f"expected a uint8 (H, W, 3) image, got {img.shape} {img.dtype}.")
  return img


def random_resized_crop_params(
  height: int,
  width: int,
  rng: np.random.Generator,
  scale: tuple[float, float] = (0.05, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
  """torchvision ``RandomResizedCrop.get_params``, drawing from ``rng``.

  Up to 10 tries: area ``A·U(scale)`` and aspect ratio ``exp(U(log ratio))``;
  ``w = int(round(sqrt(area·r)))``, ``h = int(round(sqrt(area/r)))``; accept when
  ``0 < w <= W`` and ``0 < h <= H``, then ``top ~ U{0..H-h}``, ``left ~ U{0..W-w}``. Otherwise the
  fallback: the largest centred crop whose ratio is clamped into ``ratio`` (whole image when the
  image's own ratio lies inside). Each try draws two uniforms, then two integers on success.

  Returns:
    (top, left, h, w) in pixels.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
  img: np.ndarray,
  size: int,
  rng: np.random.Generator,
  scale: tuple[float, float] = (0.05, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
  """Crop with `random_resized_crop_params` and resize to (size, size), bilinear, antialiased.

  Args:
    img: uint8 (H, W, 3).
  Returns:
    uint8 (size, size, 3).
  """
  img = _check_image(img)
  top, left, h, w = random_resized_crop_params(img.shape[0], img.shape[1], rng, scale, ratio)
  pil = Image.fromarray(img)
  out = pil.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
  return np.asarray(out, dtype=np.uint8)


def hflip(img: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
  """Mirror left-right when ``rng.random() < p`` (one uniform drawn always).

  Args:
    img: (H, W, C) array.
  Returns:
    the same shape and dtype.
  """
  if rng.random() < p:
    return img[:, ::-1]
  return img


def resize_short_side(img: np.ndarray, resize_size: int) -> np.ndarray:
  """torchvision ``Resize(int)``: short side -> resize_size, long side ``int(resize_size·L/S)``.

  Bicubic, antialiased (PIL). uint8 (H, W, 3) -> uint8 (H', W', 3).
  """
  img = _check_image(img)
  height, width = img.shape[:2]
  if width <= height:
    new_w, new_h = resize_size, int(resize_size * height / width)
  else:
    new_h, new_w = resize_size, int(resize_size * width / height)
  if (new_h, new_w) == (height, width):
    return img
  out = Image.fromarray(img).resize((new_w, new_h), Image.Resampling.BICUBIC)
  return np.asarray(out, dtype=np.uint8)


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
  """torchvision ``CenterCrop(size)`` without padding: top = ``int(round((H - size) / 2))``.

  (H, W, C) with H, W >= size -> (size, size, C).
  """
  height, width = img.shape[:2]
  if height < size or width < size:
    raise ValueError(f"center_crop({size}) needs an image at least that large, got {img.shape}.")
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  return img[top : top + size, left : left + size]


def to_float(images: np.ndarray, value_range: str = "0_1") -> np.ndarray:
  """uint8 -> float32: ``x / 255`` ("0_1") or ``x / 255 * 2 - 1`` ("-1_1"). Any shape."""
  if value_range not in VALUE_RANGES:
    raise ValueError(f"value_range must be one of {VALUE_RANGES}, got {value_range!r}.")
  out = np.asarray(images).astype(np.float32) / np.float32(255.0)
  if value_range == "-1_1":
    out = out * np.float32(2.0) - np.float32(1.0)
  return out


def train_transform_uint8(
  img: np.ndarray,
  size: int,
  rng: np.random.Generator,
  scale: tuple[float, float] = (0.05, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
  """RandomResizedCrop then horizontal flip (p = 0.5): uint8 (H, W, 3) -> uint8 (size, size, 3)."""
  return hflip(random_resized_crop(img, size, rng, scale, ratio), rng)


def train_transform(
  img: np.ndarray,
  size: int,
  rng: np.random.Generator,
  scale: tuple[float, float] = (0.05, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
  value_range: str = "0_1",
) -> np.ndarray:
  """SPEC 2.5 train transform: uint8 (H, W, 3) -> float32 (size, size, 3)."""
  return to_float(train_transform_uint8(img, size, rng, scale, ratio), value_range)


def test_transform_uint8(img: np.ndarray, size: int, resize_size: int) -> np.ndarray:
  """Short side to resize_size (bicubic) then centre crop: uint8 -> uint8 (size, size, 3)."""
  if resize_size < size:
    raise ValueError(f"resize_size ({resize_size}) must be >= size ({size}).")
  return center_crop(resize_short_side(img, resize_size), size)


def test_transform(img: np.ndarray, size: int, resize_size: int, value_range: str = "0_1"):
  """SPEC 2.5 test transform: uint8 (H, W, 3) -> float32 (size, size, 3)."""
  return to_float(test_transform_uint8(img, size, resize_size), value_range)


def test_transform_batch(
  images: Sequence[np.ndarray], size: int, resize_size: int, value_range: str = "0_1"
) -> np.ndarray:
  """`test_transform` over n images: -> float32 (n, size, size, 3)."""
  out = np.empty((len(images), size, size, 3), dtype=np.uint8)
  for k, img in enumerate(images):
    out[k] = test_transform_uint8(img, size, resize_size)
  return to_float(out, value_range)


# Not pytest tests, despite the names (keeps `pytest ntkcl_jax/...` from collecting them).
test_transform.__test__ = False
test_transform_uint8.__test__ = False
test_transform_batch.__test__ = False
