"""Nearest class mean on the frozen backbone: a method outside the package, in one file.

Run it by import path (README "Adding a method"):

  python -m ntkcl_jax.main --config experiments/configs/demo.py --workdir workdirs/ncm \
    --config.method=experiments.custom_methods.ncm:NearestClassMean

No training: each class's prototype is the mean of the pre-trained ViT's CLS feature over its
training images (the trainer's default end of task), and an image goes to the nearest prototype
in Euclidean distance among the classes seen so far.
"""

from __future__ import annotations

import jax.numpy as jnp

from ntkcl_jax.evaluate import predictions
from ntkcl_jax.methods import Method
from ntkcl_jax.models.vit import VisionTransformer


class NearestClassMean(Method):
  takes_steps = False  # every task: no gradient steps, then prototypes and evaluation

  @property
  def feature_dim(self) -> int:  # the prototype rows hold CLS features, (C, d)
    return self.spec.vit.width

  def feature_fn(self, model):
    vit = VisionTransformer(self.spec.vit, dtype=self.spec.dtype)
    return lambda params, images: vit.apply({"params": params["backbone"]}, images)

  def predict_fn(self, model):
    features = self.feature_fn(model)

    def predict(params, prototypes, num_seen, images):
      f = features(params, images)  # (b, d)
      sq_dist = (
        jnp.sum(f * f, -1, keepdims=True) - 2 * f @ prototypes.T + jnp.sum(prototypes**2, -1)
      )  # (b, C)
      return predictions(-sq_dist, num_seen)  # top-1 (b,), top-k (b, k) over classes < num_seen

    return predict
