"""Backbones and their stems (registered in MODELS)."""

from .stems import ConvStem, ConvStem3D, PatchEmbed, ResNetStem
from .vit import VisionTransformer
from .stem_skips import StemSkipViT  # (segmentation: the stem's maps as skips)
from .video_vit import VideoVisionTransformer  # (video helper)

__all__ = ["ConvStem", "ConvStem3D", "PatchEmbed", "ResNetStem", "StemSkipViT", "VideoVisionTransformer", "VisionTransformer"]
