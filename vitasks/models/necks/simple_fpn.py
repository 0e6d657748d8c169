"""ViTDet's simple feature pyramid (Li et al. 2022, "Exploring Plain Vision Transformer
Backbones for Object Detection", section 3).

A plain ViT ends with one map at stride 16. The simple pyramid builds every level from that
last map alone, with no top-down or lateral fusion between levels: transposed convolutions up
to strides 4 and 8, the map itself at 16, max pooling down to 32; each level then goes through
a 1x1 conv and a 3x3 conv, both followed by a channel LayerNorm, to ``out_channels``; a sixth
level (stride 64) is the stride-32 level subsampled by a 1x1 max pool (detectron2's
``LastLevelMaxPool``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitasks.checks import PositiveInt, checked, config_key
from vitasks.errors import ConfigError
from vitasks.registry import MODELS

from ..layers.norm import LayerNorm2d

_SCALES = (4.0, 2.0, 1.0, 0.5)


class ConvNorm(nn.Sequential):
    """Conv2d without bias followed by a channel LayerNorm (detectron2's ``Conv2d(..., norm="LN")``);
    the conv gets detectron2's ``c2_xavier_fill`` (Kaiming uniform with a=1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm_eps: float = 1e-6) -> None:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.kaiming_uniform_(conv.weight, a=1)
        super().__init__()
        self.conv = conv
        self.norm = LayerNorm2d(out_channels, eps=norm_eps)


def _rescale(scale: float, channels: int, norm_eps: float) -> tuple[nn.Module, int]:
    """The resolution change for one level, and its output channels (halved per deconv, as
    detectron2, so the x4 branch stays cheap)."""
    if scale == 4.0:
        return (
            nn.Sequential(
                nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2),
                LayerNorm2d(channels // 2, eps=norm_eps),
                nn.GELU(),
                nn.ConvTranspose2d(channels // 2, channels // 4, kernel_size=2, stride=2),
            ),
            channels // 4,
        )
    if scale == 2.0:
        return nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2), channels // 2
    if scale == 1.0:
        return nn.Identity(), channels
    return nn.MaxPool2d(kernel_size=2, stride=2), channels  # scale 0.5


class PyramidLevel(nn.Module):
    """One level: ``rescale`` (deconvs / identity / max pool), then ``lateral`` (1x1 conv + LN)
    and ``output`` (3x3 conv + LN)."""

    def __init__(self, scale: float, in_channels: int, out_channels: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.rescale, mid_channels = _rescale(scale, in_channels, norm_eps)
        self.lateral = ConvNorm(mid_channels, out_channels, 1, norm_eps)
        self.output = ConvNorm(out_channels, out_channels, 3, norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.lateral(self.rescale(x)))


@MODELS.register_module()
class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid from the backbone's last map.

    Input: the backbone's output tuple (only the last map is used, (B, in_channels, H/s, W/s)
    with s = ``input_stride``) or that map alone. Output: a tuple of maps in order of
    increasing stride, each (B, out_channels, ...): with the defaults and a stride-16 ViT,
    ``(p2, p3, p4, p5, p6)`` at strides (4, 8, 16, 32, 64), as :attr:`strides` and
    :attr:`names` say. An input side that is not a multiple of 32 gives floor-sized pooled
    levels (as max pooling does).

    Args:
        in_channels: channels of the backbone's map (its ``embed_dim``); divisible by 4 when
            the x4 level is used (its deconvs halve the channels twice).
        out_channels: channels of every output level (256 in ViTDet).
        scale_factors: resolution factor of each level relative to the input map, from among
            4, 2, 1 and 0.5, in decreasing order (increasing stride).
        input_stride: stride of the input map (the ViT's patch size), for :attr:`strides`.
        top_block: add the extra level by max pooling (kernel 1, stride 2) the last level.
        norm_eps: epsilon of the channel LayerNorms (detectron2: 1e-6).
    """

    config_key = "model.neck"

    @checked
    def __init__(
        self,
        in_channels: PositiveInt = 768,
        out_channels: PositiveInt = 256,
        scale_factors: Sequence[float] = _SCALES,
        input_stride: PositiveInt = 16,
        top_block: bool = True,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        where = self.config_path = config_key(default=self.config_key)  # for errors at run time too
        scales = [float(s) for s in scale_factors] if isinstance(scale_factors, Sequence) else None
        if not scales or any(s not in _SCALES for s in scales) or scales != sorted(set(scales), reverse=True):
            raise ConfigError(
                f"{where}.scale_factors must be distinct values among {list(_SCALES)} in decreasing order, "
                f"got {scale_factors!r}"
            )
        if 4.0 in scales and in_channels % 4 or 2.0 in scales and in_channels % 2:
            raise ConfigError(
                f"{where}.in_channels {in_channels} must be divisible by 4 for the x4 level (by 2 for x2): "
                "its deconvolutions halve the channels"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.scale_factors = tuple(scales)
        self.top_block = bool(top_block)
        self.levels = nn.ModuleList(PyramidLevel(s, in_channels, out_channels, norm_eps) for s in scales)
        strides = [input_stride / s for s in scales]
        if self.top_block:
            strides.append(strides[-1] * 2)
        self.strides = tuple(int(s) if float(s).is_integer() else s for s in strides)
        self.names = tuple(f"p{int(math.log2(s))}" for s in self.strides)

    def forward(self, inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        x = inputs if isinstance(inputs, torch.Tensor) else inputs[-1]
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ConfigError(
                f"{self.config_path}: expected the backbone's last map (B, {self.in_channels}, H, W), got "
                f"{tuple(x.shape)}; set the backbone's out_indices (e.g. [-1]) and {self.config_path}.in_channels "
                "to its embed_dim"
            )
        outs = [level(x) for level in self.levels]
        if self.top_block:
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return tuple(outs)
