"""SPEC 1.1: AugReg layout, strict loading, geometry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkcl_jax.models.vit import (
  VIT_B16,
  CheckpointMismatchError,
  VisionTransformer,
  ViTSpec,
  expected_shapes,
  load_augreg,
  save_augreg,
)
from tests.fakes import TINY_VIT, fake_augreg_arrays, write_fake_augreg


def test_vit_b16_layout_matches_augreg():
  shapes = expected_shapes(VIT_B16)
  assert shapes["embedding/kernel"] == (16, 16, 3, 768)
  assert shapes["cls"] == (1, 1, 768)
  assert shapes["Transformer/posembed_input/pos_embedding"] == (1, 197, 768)
  blk = "Transformer/encoderblock_11/"
  assert shapes[blk + "MultiHeadDotProductAttention_1/query/kernel"] == (768, 12, 64)
  assert shapes[blk + "MultiHeadDotProductAttention_1/query/bias"] == (12, 64)
  assert shapes[blk + "MultiHeadDotProductAttention_1/out/kernel"] == (12, 64, 768)
  assert shapes[blk + "MlpBlock_3/Dense_0/kernel"] == (768, 3072)
  assert shapes["Transformer/encoder_norm/scale"] == (768,)
  assert len(shapes) == 2 + 1 + 1 + 2 + 12 * 16  # embedding, cls, posemb, encoder_norm, blocks
  # ViT-B/16 without head: 85,798,656 parameters.
  assert sum(int(np.prod(s)) for s in shapes.values()) == 85_798_656


@pytest.mark.parametrize("image_size,tokens", [(224, 197), (384, 577), (32, 5)])
def test_token_count_follows_image_size(image_size, tokens):
  spec = ViTSpec(image_size=image_size, patch_size=16)
  assert spec.num_tokens == tokens
  assert expected_shapes(spec)["Transformer/posembed_input/pos_embedding"] == (1, tokens, 768)


def test_indivisible_image_size_is_rejected():
  with pytest.raises(ValueError, match="not divisible by patch_size"):
    ViTSpec(image_size=30, patch_size=16)


def test_fake_checkpoint_round_trip_and_forward(tmp_path):
  path = write_fake_augreg(tmp_path, TINY_VIT)
  params = load_augreg(path, TINY_VIT)
  arrays = fake_augreg_arrays(TINY_VIT)
  np.testing.assert_array_equal(params["embedding"]["kernel"], arrays["embedding/kernel"])
  np.testing.assert_array_equal(
    params["Transformer"]["encoderblock_2"]["MlpBlock_3"]["Dense_1"]["bias"],
    arrays["Transformer/encoderblock_2/MlpBlock_3/Dense_1/bias"],
  )
  assert "head" not in params
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
  z = VisionTransformer(TINY_VIT).apply({"params": params}, x)
  assert z.shape == (2, 16) and bool(jnp.all(jnp.isfinite(z)))
  # save_augreg writes the same layout back.
  out = tmp_path / "again.npz"
  save_augreg(out, params)
  again = load_augreg(out, TINY_VIT)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, again)


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
  path = write_fake_augreg(tmp_path, TINY_VIT)
  wider = ViTSpec(image_size=16, patch_size=8, width=32, depth=3, num_heads=2, mlp_dim=32)
  # The first key in the loader's (sorted) order, with both shapes.
  with pytest.raises(
    CheckpointMismatchError,
    match=r"Key 'Transformer/encoder_norm/bias' is \(16,\) in .* but \(32,\) in the model",
  ):
    load_augreg(path, wider)


def test_missing_and_extra_keys(tmp_path):
  deeper = ViTSpec(image_size=16, patch_size=8, width=16, depth=4, num_heads=2, mlp_dim=32)
  path = write_fake_augreg(tmp_path, TINY_VIT)
  with pytest.raises(CheckpointMismatchError, match="lacks key 'Transformer/encoderblock_3/"):
    load_augreg(path, deeper)
  shallower = ViTSpec(image_size=16, patch_size=8, width=16, depth=2, num_heads=2, mlp_dim=32)
  with pytest.raises(CheckpointMismatchError, match="unexpected"):
    load_augreg(path, shallower)


def test_pre_logits_layout_is_rejected(tmp_path):
  path = write_fake_augreg(tmp_path, TINY_VIT, **{"pre_logits/kernel": np.zeros((16, 16))})
  with pytest.raises(CheckpointMismatchError, match="pre_logits"):
    load_augreg(path, TINY_VIT)


def test_missing_file_says_how_to_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="checkpoint_path"):
    load_augreg(tmp_path / "nope.npz", TINY_VIT)
