"""Building blocks shared by the backbones: attention, MLP, stochastic depth, LayerScale,
transformer block and position-embedding resampling."""

from .attention import Attention
from .block import TransformerBlock
from .drop_path import DropPath, drop_path
from .layer_scale import LayerScale
from .mlp import Mlp
from .pos_embed import resample_abs_pos_embed

__all__ = [
    "Attention",
    "DropPath",
    "LayerScale",
    "Mlp",
    "TransformerBlock",
    "drop_path",
    "resample_abs_pos_embed",
]
