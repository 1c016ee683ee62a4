"""SimpleCIL: no training; prototypes of the plain pre-trained ViT's CLS feature, one section."""

from __future__ import annotations

from ntkcl_jax.methods.base import Features, Method
from ntkcl_jax.models.ntkcl import NTKCL
from ntkcl_jax.models.vit import VisionTransformer


class SimpleCIL(Method):
  """Class means of the frozen backbone's CLS token (b, d), cosine classifier."""

  takes_steps = False

  @property
  def feature_dim(self) -> int:
    return self.spec.vit.width

  def feature_fn(self, model: NTKCL) -> Features:
    vit = VisionTransformer(self.spec.vit, dtype=self.spec.dtype)
    return lambda p, x: vit.apply({"params": p["backbone"]}, x)
