"""LayerNorm over the channels of NCHW maps (detectron2's "LN" for conv layers, ConvNeXt's
LayerNorm2d): each pixel's C values are normalised on their own, then scaled and shifted per
channel. ``nn.LayerNorm`` would normalise over the last dimension, i.e. over W."""

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """``nn.LayerNorm(num_channels)`` applied to (B, C, H, W) maps at every pixel.

    Parameters are ``weight`` and ``bias`` of shape (C,), as detectron2's ``LayerNorm``, so its
    checkpoints map key by key. The epsilon defaults to detectron2's 1e-6.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels last for the fused layer_norm kernel, then back to NCHW.
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)
