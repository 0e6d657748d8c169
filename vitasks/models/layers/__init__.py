"""Building blocks shared by the backbones and heads: attention, MLP, stochastic depth, LayerScale,
transformer block, position-embedding resampling and the conv + BN + ReLU block."""

from .attention import Attention
from .block import TransformerBlock
from .conv import ConvBNReLU
from .drop_path import DropPath, drop_path
from .layer_scale import LayerScale
from .mlp import MLP_ACTS, Mlp, mlp_act_layer
from .pos_embed import resample_abs_pos_embed

__all__ = [
    "Attention",
    "ConvBNReLU",
    "DropPath",
    "LayerScale",
    "MLP_ACTS",
    "Mlp",
    "TransformerBlock",
    "drop_path",
    "mlp_act_layer",
    "resample_abs_pos_embed",
]
