"""`timm.models` stand-in: the two submodules the official code imports."""

from . import layers, vision_transformer  # noqa: F401
