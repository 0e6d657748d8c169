"""Backbones and their stems (registered in MODELS)."""

from .stems import ConvStem, PatchEmbed, ResNetStem
from .vit import VisionTransformer
from .video_vit import VideoVisionTransformer  # (video helper)

__all__ = ["ConvStem", "PatchEmbed", "ResNetStem", "VideoVisionTransformer", "VisionTransformer"]
