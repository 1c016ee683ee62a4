"""ntkcl_jax.evaluate: the one prediction rule and top-5 over seen classes (SPEC 1.6, 3)."""

import jax.numpy as jnp
import numpy as np

from ntkcl_jax import evaluate, sharding
from ntkcl_jax.data.class_order import class_order
from ntkcl_jax.data.stream import TaskStream
from ntkcl_jax.models.heads import section_weighted_logits
from ntkcl_jax.seed_stack import SeedStack
from tests.data.test_stream import NUM_CLASSES, _source


def test_predictions_mask_unseen_classes():
  logits = jnp.asarray([[0.1, 0.2, 0.9, 0.8], [0.5, 0.4, 0.3, 0.95]])
  top1, topk = evaluate.predictions(logits, 2)
  np.testing.assert_array_equal(top1, [1, 0])
  assert topk.shape == (2, 4)
  np.testing.assert_array_equal(np.asarray(topk)[:, :2], [[1, 0], [0, 1]])


def test_predict_fn_is_section_weighted_cosine():
  rng = np.random.default_rng(0)
  feats = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
  protos = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
  predict = evaluate.make_predict_fn(lambda p, x: x, (0.3, 0.1))
  top1, _ = predict(None, protos, 4, feats)
  logits = np.asarray(section_weighted_logits(feats, protos, (0.3, 0.1)))[:, :4]
  np.testing.assert_array_equal(top1, logits.argmax(-1))


def test_top5_only_once_five_classes_are_seen():
  """With < 5 seen classes the −inf rows would fill the top 5 (a 100 % "top-5"): not reported."""
  train, test = _source([4] * NUM_CLASSES, 0, "train"), _source([2] * NUM_CLASSES, 1, "test")
  order = class_order(1, NUM_CLASSES)
  stream = TaskStream(
    train, test, order=order, init_cls=2, increment=2, image_size=8, resize_size=9
  )
  mesh = sharding.make_mesh()
  seen = []

  def predict(images):  # top-1 a fixed class; top-5 holds rows 0..4
    n = images.shape[0]
    return jnp.full((n,), 5), jnp.tile(jnp.arange(5), (n, 1))

  for t in range(3):
    stage = evaluate.evaluate_stage(predict, stream, t, 8, mesh)
    seen.append("top5" in stage)
  assert seen == [False, False, True]  # 2, 4, 6 classes seen
  labels = stream.labels("test")[stream.test_indices(2)]
  np.testing.assert_allclose(stage["top5"], 100.0 * np.mean(labels < 5))
  # SPEC 3: no top-5 at all on EuroSAT, PlantVillage, Kvasir (the trainer passes top5=False)
  stacked = SeedStack.single(mesh)
  (stage,) = evaluate.evaluate_stages(predict, [stream], 2, 8, stacked, top5=False)
  assert (
    "top5" not in stage and stage["A"] == evaluate.evaluate_stage(predict, stream, 2, 8, mesh)["A"]
  )
  assert evaluate.NO_TOP5_DATASETS == ("eurosat", "plantvillage", "kvasir")
