"""mmsegmentation's ``MultiLevelNeck`` (the "MLN" of its ViT + UperNet ADE20K models): same-stride
ViT maps -> a pyramid by 1x1 convs, bilinear resizing and 3x3 convs.

Each input map goes through a 1x1 conv (with bias) to ``out_channels``; map ``i`` is then
resized bilinearly by ``scales[i]`` (``F.interpolate`` with ``scale_factor``,
``align_corners=False``, as mmseg's ``resize``) and goes through a 3x3 conv (with bias). No
normalisation and no activation (mmseg's defaults ``norm_cfg=None``, ``act_cfg=None``). A single
input map is used for every scale.

State dict: ``lateral_convs.{i}.{weight,bias}`` and ``convs.{i}.{weight,bias}`` (mmseg's
``lateral_convs.{i}.conv.*`` and ``convs.{i}.conv.*`` without the ConvModule level).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitasks.checks import InRange, ListOf, PositiveInt, checked, config_key, feature_maps
from vitasks.errors import ConfigError
from vitasks.registry import MODELS


@MODELS.register_module()
class MultiLevelNeck(nn.Module):
    """1x1 conv, bilinear rescale by ``scales[i]``, 3x3 conv, per level (see the module docstring).

    Args:
        in_channels: channels of each input map (one entry per input).
        out_channels: channels of every output map.
        scales: resize factor of each output level (mmseg's ViT: [4, 2, 1, 0.5]).
    """

    config_key = "model.neck"

    @checked
    def __init__(self, in_channels: ListOf(PositiveInt), out_channels: PositiveInt,
                 scales: ListOf(InRange(0, low_open=True)) = (0.5, 1, 2, 4)) -> None:
        super().__init__()
        where = self.config_path = config_key(default=self.config_key)  # for errors at run time too
        if len(in_channels) not in (1, len(scales)):
            raise ConfigError(
                f"{where}: {len(in_channels)} in_channels for {len(scales)} scales (one input, or one per scale)"
            )
        self.in_channels = [int(c) for c in in_channels]
        self.out_channels = int(out_channels)
        self.scales = tuple(float(s) for s in scales)
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, self.out_channels, 1) for c in self.in_channels)
        self.convs = nn.ModuleList(
            nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1) for _ in self.scales
        )
        for conv in [*self.lateral_convs, *self.convs]:  # mmseg: xavier_init(distribution="uniform")
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        feature_maps(inputs, len(self.lateral_convs), self.config_path, "in_channels")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        if len(laterals) == 1:
            laterals = laterals * len(self.scales)
        outs = []
        for conv, x, scale in zip(self.convs, laterals, self.scales):
            if scale != 1:
                x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
            outs.append(conv(x))
        return tuple(outs)
