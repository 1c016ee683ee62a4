"""The shipped tiny ViT checkpoint (`ntkcl_jax/assets/tiny_vit_fmnist.npz`).

Produced by `python experiments/pretrain_tiny.py --out ntkcl_jax/assets/tiny_vit_fmnist.npz`
(see that module's docstring). Measured accuracy of the stored backbone + `head/*` classifier:
83.52 % on the full Fashion-MNIST test set (10,000 images) and 84.35 % on the first 2,000 test
images. The accuracy test uses the first 2,000 (to stay fast) and asserts more than 84.35 - 1 =
83.35 %: the figure must hold after loading through the strict AugReg loader, so a layout, loader
or forward-pass change that alters the features fails it.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkcl_jax
from experiments.pretrain_tiny import TINY_VIT_SPEC, augment, write_npz
from ntkcl_jax.models.vit import (
  CheckpointMismatchError,
  VisionTransformer,
  ViTSpec,
  expected_shapes,
  load_augreg,
)

CKPT = pathlib.Path(ntkcl_jax.__file__).parent / "assets" / "tiny_vit_fmnist.npz"
FMNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
ACC_FULL_TEST = 0.8352  # 10,000 test images (informational)
ACC_FIRST_2000 = 0.8435  # first 2,000 test images, what the test below measures
NUM_BACKBONE_PARAMS = 140_416  # width 64, depth 4, mlp 128, 50 tokens, patch 4x4x3
MAX_BYTES = 3_000_000

SPEC = ViTSpec(**TINY_VIT_SPEC)


def test_spec_is_the_documented_geometry():
  assert TINY_VIT_SPEC == dict(
    image_size=28, patch_size=4, width=64, depth=4, num_heads=4, mlp_dim=128
  )
  assert SPEC.num_tokens == 50


def test_checkpoint_size_and_exact_augreg_layout():
  assert CKPT.exists(), f"{CKPT} is missing; run experiments/pretrain_tiny.py to create it."
  assert CKPT.stat().st_size <= MAX_BYTES
  with np.load(CKPT, allow_pickle=False) as npz:
    arrays = {k: npz[k] for k in npz.files}
  want = expected_shapes(SPEC)
  assert set(arrays) == set(want) | {"head/kernel", "head/bias"}
  for key, shape in want.items():
    assert arrays[key].shape == shape, key
    assert arrays[key].dtype == np.float32, key
    assert np.all(np.isfinite(arrays[key])), key
  assert arrays["head/kernel"].shape == (SPEC.width, 10)
  assert arrays["head/bias"].shape == (10,)
  params = load_augreg(CKPT, SPEC)  # strict: raises on any missing/extra key or shape
  assert "head" not in params
  assert sum(a.size for a in jax.tree.leaves(params)) == NUM_BACKBONE_PARAMS
  # Trained, not freshly initialised: the zero-initialised CLS token and head have moved.
  assert np.abs(params["cls"]).max() > 1e-3
  assert np.abs(arrays["head/kernel"]).max() > 1e-2


def test_checkpoint_rejects_another_geometry():
  with pytest.raises(CheckpointMismatchError, match=r"is \(64,\) in .* but \(48,\) in the model"):
    load_augreg(CKPT, ViTSpec(**{**TINY_VIT_SPEC, "width": 48, "num_heads": 4, "mlp_dim": 96}))


@pytest.mark.skipif(
  not FMNIST_DIR.exists(),
  reason=f"Fashion-MNIST not installed at {FMNIST_DIR} (apt-get install dataset-fashion-mnist)",
)
def test_loaded_classifier_accuracy_on_first_2000_test_images():
  from ntkcl_jax.data.sources import fashion_mnist

  test = fashion_mnist("test")
  n = 2000
  images = test.images(np.arange(n)).astype(np.float32) / 255.0  # (n, 28, 28, 3) in [0, 1]
  labels = test.labels[:n]
  params = load_augreg(CKPT, SPEC)
  with np.load(CKPT, allow_pickle=False) as npz:
    kernel, bias = npz["head/kernel"], npz["head/bias"]
  model = VisionTransformer(SPEC)
  classify = jax.jit(
    lambda x: jnp.argmax(model.apply({"params": params}, x) @ kernel + bias, axis=-1)
  )
  pred = np.concatenate([np.asarray(classify(images[i : i + 500])) for i in range(0, n, 500)])
  acc = float(np.mean(pred == labels))
  assert acc > ACC_FIRST_2000 - 0.01, f"accuracy {acc:.4f} on the first {n} test images"


def test_augment_is_a_padded_crop_with_optional_flip():
  x = jax.random.uniform(jax.random.key(0), (16, 28, 28, 3))
  y = np.asarray(augment(jax.random.key(1), x, pad=2))
  padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)))
  flipped = 0
  for i in range(16):
    crops = [padded[i, a : a + 28, b : b + 28] for a in range(5) for b in range(5)]
    plain = any(np.array_equal(y[i], c) for c in crops)
    flip = any(np.array_equal(y[i], c[:, ::-1]) for c in crops)
    assert plain or flip, f"image {i} is not a crop of the padded input"
    flipped += flip and not plain
  assert 0 < flipped < 16  # both branches occur for this key


def test_write_npz_is_byte_reproducible_and_loadable(tmp_path):
  arrays = {"b/x": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones(4, np.float32)}
  write_npz(tmp_path / "1.npz", arrays)
  write_npz(tmp_path / "2.npz", dict(reversed(arrays.items())))
  assert (tmp_path / "1.npz").read_bytes() == (tmp_path / "2.npz").read_bytes()
  with np.load(tmp_path / "1.npz", allow_pickle=False) as npz:
    assert sorted(npz.files) == ["a", "b/x"]
    np.testing.assert_array_equal(npz["b/x"], arrays["b/x"])
