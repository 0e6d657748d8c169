"""A decoder that fuses finer skip maps into a ViT's coarse map: TransUNet's cascaded upsampler.

The ViT's token map (stride 8 or 16) carries the context, the convolutional stem's earlier maps
(stride 2, 4: see :class:`~vitasks.models.backbones.stem_skips.StemSkipViT`) the detail. Starting
from the coarsest map, each step upsamples the running map 2x (bilinear) to the next finer
level, concatenates that level's map and fuses them with conv-BN-ReLU blocks; the classifier
reads the finest fused map (Chen et al. 2021, TransUNet's "CUP" decoder; U-Net's expanding path).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vitasks.checks import ListOf, OrNone, PositiveInt, checked, config_key
from vitasks.errors import ConfigError
from vitasks.models.heads.decode_head import BaseDecodeHead, resize
from vitasks.models.heads.seg_heads import conv_block
from vitasks.registry import MODELS


@MODELS.register_module()
class CascadedUpHead(BaseDecodeHead):
    """Cascaded upsampling decoder with skip connections (TransUNet's CUP).

    Args:
        in_channels: channels of the input levels, fine to coarse (e.g. ``[32, 64, 96]`` for a
            stride-2 and a stride-4 stem map and the ViT's stride-8 map).
        channels: width of the finest fused map (the classifier's input).
        num_classes: number of classes.
        in_index: the input levels, fine to coarse, in the backbone/neck tuple (e.g.
            ``[0, 1, 2]``: :class:`StemSkipViT` returns its skips first).
        level_channels: width of the fused map at each level, fine to coarse (one per level;
            the first must equal ``channels``). Default: ``channels`` at every level.
        num_convs: conv-BN-ReLU blocks at each level (the coarsest level's read its input alone,
            the others the upsampled running map concatenated with the level's input).
        kernel_size: kernel of the conv blocks (odd).
        dropout_ratio, loss_decode, ignore_index, align_corners: as :class:`BaseDecodeHead`.

    ``forward`` returns logits at the finest level's stride; at least two levels.
    """

    @checked
    def __init__(
        self,
        in_channels: ListOf(PositiveInt),
        channels: PositiveInt,
        num_classes: PositiveInt,
        in_index: ListOf(int),
        level_channels: OrNone(ListOf(PositiveInt)) = None,
        num_convs: PositiveInt = 1,
        kernel_size: PositiveInt = 3,
        **kwargs,
    ) -> None:
        where = config_key(default=self.config_key)
        if len(in_channels) < 2:
            raise ConfigError(f"{where}.in_channels: CascadedUpHead fuses at least two levels (fine to coarse), "
                              f"got {list(in_channels)}")
        if kernel_size % 2 == 0:
            raise ConfigError(f"{where}.kernel_size must be odd, got {kernel_size}")
        widths = [int(channels)] * len(in_channels) if level_channels is None else [int(c) for c in level_channels]
        if len(widths) != len(in_channels):
            raise ConfigError(f"{where}.level_channels: one width per level ({len(in_channels)}, fine to coarse), "
                              f"got {list(widths)}")
        if widths[0] != channels:
            raise ConfigError(f"{where}.level_channels[0] ({widths[0]}) is the classifier's input and must equal "
                              f"channels ({channels})")
        super().__init__(list(in_channels), channels, num_classes, in_index=list(in_index), **kwargs)
        self.level_channels = widths

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(*(conv_block(cin if i == 0 else cout, cout, kernel_size) for i in range(num_convs)))

        top = len(widths) - 1
        # fuse[i] makes level i's map: the coarsest from its input alone, each finer one from the
        # upsampled running map and its input.
        self.fuse = nn.ModuleList(
            stage(self.in_channels[i] if i == top else widths[i + 1] + self.in_channels[i], widths[i])
            for i in range(len(widths))
        )

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        feats = self._select(inputs)
        x = self.fuse[-1](feats[-1])
        for i in range(len(feats) - 2, -1, -1):
            skip = feats[i]
            x = resize(x, skip.shape[-2:], self.align_corners)
            x = self.fuse[i](torch.cat([x, skip], dim=1))
        return self.cls_seg(x)
