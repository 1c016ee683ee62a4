"""`timm.models.vision_transformer.PatchEmbed` (timm 0.6.12 `layers/patch_embed.py`), 2-D images."""

from torch import nn


class PatchEmbed(nn.Module):
  """Conv(in_chans → embed_dim, kernel = stride = patch_size), flattened to (B, N, C)."""

  def __init__(
    self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None, flatten=True
  ):
    super().__init__()
    img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    patch_size = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    self.img_size, self.patch_size = img_size, patch_size
    self.grid_size = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
    self.num_patches = self.grid_size[0] * self.grid_size[1]
    self.flatten = flatten
    self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
    self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

  def forward(self, x):
    _, _, h, w = x.shape
    assert h == self.img_size[0] and w == self.img_size[1], f"input {h}x{w} != {self.img_size}"
    x = self.proj(x)
    if self.flatten:
      x = x.flatten(2).transpose(1, 2)  # BCHW -> BNC
    return self.norm(x)
