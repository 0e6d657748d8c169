"""Backbones and their stems (registered in MODELS)."""

from .stems import ConvStem, PatchEmbed, ResNetStem
from .vit import VisionTransformer
from .stem_skips import StemSkipViT  # (segmentation: the stem's maps as skips)
from .video_vit import VideoVisionTransformer  # (video helper)

__all__ = ["ConvStem", "PatchEmbed", "ResNetStem", "StemSkipViT", "VideoVisionTransformer", "VisionTransformer"]
