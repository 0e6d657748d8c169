"""Backbones and their stems (registered in MODELS)."""

from .stems import ConvStem, PatchEmbed, ResNetStem
from .vit import VisionTransformer

__all__ = ["ConvStem", "PatchEmbed", "ResNetStem", "VisionTransformer"]
