"""Semantic segmentation decode heads: UperNet, FCN, SETR-PUP and Segmenter (linear, mask).

Each takes the backbone/neck tuple of NCHW maps and returns logits ``(N, K, h, w)``; the
configuration names follow mmsegmentation (``in_channels``, ``channels``, ``in_index``,
``pool_scales``, ``num_convs``, ``loss_decode``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitasks.checks import ListOf, NonNegativeInt, PositiveInt, checked, config_key, divisible
from vitasks.errors import ConfigError
from vitasks.models.heads.decode_head import BaseDecodeHead, resize
from vitasks.models.layers import ConvBNReLU, TransformerBlock
from vitasks.registry import MODELS


def conv_block(in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> ConvBNReLU:
    """A head's conv + BN + ReLU, Kaiming-initialised (fan_out) as mmcv's ``ConvModule``."""
    return ConvBNReLU(in_channels, out_channels, kernel_size, dilation=dilation, kaiming_init=True)


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: average-pool to each scale, 1x1 conv, upsample back."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int, align_corners: bool) -> None:
        super().__init__()
        self.align_corners = align_corners
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), conv_block(in_channels, channels, 1))
            for scale in pool_scales
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [resize(stage(x), x.shape[-2:], self.align_corners) for stage in self.stages]


@MODELS.register_module()
class UPerHead(BaseDecodeHead):
    """UperNet (Xiao et al., 2018): pyramid pooling on the last level, FPN top-down fusion,
    then all levels upsampled to the finest, concatenated and fused.

    Args:
        in_channels: channels of each input level (fine to coarse), e.g. ``[768] * 4``.
        channels: width of the head (768 in BEiT/MAE's ADE20K recipe, 512 in mmseg's).
        num_classes: number of classes.
        in_index: the input levels used, e.g. ``[0, 1, 2, 3]``.
        pool_scales: output sizes of the pyramid pooling.
        dropout_ratio, loss_decode, ignore_index, align_corners: as :class:`BaseDecodeHead`.
    """

    @checked
    def __init__(
        self,
        in_channels: ListOf(PositiveInt),
        channels: int,
        num_classes: int,
        in_index: Sequence[int] = (0, 1, 2, 3),
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        **kwargs,
    ) -> None:
        super().__init__(in_channels, channels, num_classes, in_index=list(in_index), **kwargs)
        self.psp = PyramidPooling(pool_scales, self.in_channels[-1], self.channels, self.align_corners)
        self.bottleneck = conv_block(self.in_channels[-1] + len(pool_scales) * self.channels, self.channels, 3)
        self.lateral_convs = nn.ModuleList(conv_block(c, self.channels, 1) for c in self.in_channels[:-1])
        self.fpn_convs = nn.ModuleList(conv_block(self.channels, self.channels, 3) for _ in self.in_channels[:-1])
        self.fpn_bottleneck = conv_block(len(self.in_channels) * self.channels, self.channels, 3)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        feats = self._select(inputs)
        top = feats[-1]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, feats[:-1])]
        laterals.append(self.bottleneck(torch.cat([top, *self.psp(top)], dim=1)))
        # Top-down: add each coarser level, upsampled, to the next finer one.
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:], self.align_corners)
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([resize(x, size, self.align_corners) for x in outs], dim=1))
        return self.cls_seg(fused)


@MODELS.register_module()
class FCNHead(BaseDecodeHead):
    """Fully convolutional head (Long et al., 2015): ``num_convs`` conv blocks on one level,
    optionally concatenated with the input and fused; used as UperNet's auxiliary head.

    Args:
        in_channels: input channels.
        channels: conv width.
        num_classes: number of classes.
        in_index: the input level, e.g. 2 (stride 16 in the pyramid).
        num_convs: conv blocks (0: classify the input directly; then channels must equal
            in_channels).
        kernel_size: kernel of the conv blocks.
        concat_input: concatenate the input with the convs' output and fuse with one more conv.
        dilation: dilation of the conv blocks.
        dropout_ratio, loss_decode, ignore_index, align_corners: as :class:`BaseDecodeHead`.
    """

    @checked
    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        in_index: int = -1,
        num_convs: NonNegativeInt = 2,
        kernel_size: int = 3,
        concat_input: bool = True,
        dilation: int = 1,
        **kwargs,
    ) -> None:
        if num_convs == 0 and channels != in_channels:
            raise ConfigError(f"{config_key(default=self.config_key)}: with num_convs=0 channels ({channels}) "
                              f"must equal in_channels ({in_channels})")
        super().__init__(in_channels, channels, num_classes, in_index=in_index, **kwargs)
        self.convs = nn.Sequential(*(
            conv_block(self.in_channels if i == 0 else self.channels, self.channels, kernel_size, dilation)
            for i in range(num_convs)
        ))
        self.concat_input = bool(concat_input)
        if self.concat_input:
            self.conv_cat = conv_block(self.in_channels + self.channels, self.channels, kernel_size)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self._select(inputs)
        out = self.convs(x)
        if self.concat_input:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.cls_seg(out)


@MODELS.register_module()
class SETRPUPHead(BaseDecodeHead):
    """SETR's progressive upsampling head (Zheng et al., 2021): LayerNorm over the tokens, then
    ``num_convs`` times (conv block, bilinear upsample by ``up_scale``), then the classifier.

    SETR-PUP uses 4 convs of x2 (stride 16 -> 1) for the main head and 2 convs of x4 for the
    auxiliary heads on earlier blocks.

    Args:
        in_channels: input channels (the ViT width).
        channels: conv width (256 in SETR).
        num_classes: number of classes.
        in_index: the input map.
        num_convs: conv + upsample stages.
        up_scale: upsampling factor of each stage.
        kernel_size: conv kernel (3 in SETR-PUP).
        norm_eps: epsilon of the input LayerNorm.
        dropout_ratio, loss_decode, ignore_index, align_corners: as :class:`BaseDecodeHead`
            (SETR uses no dropout).
    """

    @checked
    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        in_index: int = -1,
        num_convs: PositiveInt = 4,
        up_scale: PositiveInt = 2,
        kernel_size: int = 3,
        norm_eps: float = 1e-6,
        dropout_ratio: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(in_channels, channels, num_classes, in_index=in_index, dropout_ratio=dropout_ratio, **kwargs)
        self.norm = nn.LayerNorm(self.in_channels, eps=norm_eps)
        self.up_scale = int(up_scale)
        self.up_convs = nn.ModuleList(
            conv_block(self.in_channels if i == 0 else self.channels, self.channels, kernel_size)
            for i in range(num_convs)
        )

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self._select(inputs)
        # LayerNorm over channels of every position (the tokens).
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        for conv in self.up_convs:
            x = conv(x)
            x = F.interpolate(x, scale_factor=self.up_scale, mode="bilinear", align_corners=self.align_corners)
        return self.cls_seg(x)


@MODELS.register_module()
class SegmenterLinearHead(BaseDecodeHead):
    """Segmenter's linear decoder (Strudel et al., 2021): a linear layer on each patch token.

    Args:
        in_channels: token width.
        num_classes: number of classes.
        in_index: the input map (the last block's).
        dropout_ratio: dropout before the classifier (0 in Segmenter).
        loss_decode, ignore_index, align_corners: as :class:`BaseDecodeHead`.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        in_index: int = -1,
        dropout_ratio: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(in_channels, in_channels, num_classes, in_index=in_index, dropout_ratio=dropout_ratio,
                         **kwargs)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.cls_seg(self._select(inputs))


@MODELS.register_module()
class SegmenterMaskHead(BaseDecodeHead):
    """Segmenter's mask transformer (Strudel et al., 2021).

    ``K`` learnable class embeddings are appended to the projected patch tokens and processed
    jointly by transformer blocks; patch and class outputs are projected and L2-normalised, the
    masks are their dot products (``(N, HW, K)``), LayerNorm-ed over classes, reshaped to
    ``(N, K, H, W)``.

    Args:
        in_channels: token width of the backbone.
        num_classes: number of classes K.
        embed_dims: width of the decoder (the backbone's in Segmenter).
        num_layers: transformer blocks (2 in Segmenter).
        num_heads: attention heads.
        mlp_ratio: MLP width ratio of the blocks.
        drop_path_rate: stochastic depth, linearly increasing over the blocks.
        attn_drop_rate: attention dropout.
        drop_rate: dropout in the blocks.
        in_index: the input map.
        dropout_ratio, loss_decode, ignore_index, align_corners: as :class:`BaseDecodeHead`.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        embed_dims: int = 768,
        num_layers: int = 2,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        attn_drop_rate: float = 0.0,
        drop_rate: float = 0.0,
        in_index: int = -1,
        dropout_ratio: float = 0.0,
        **kwargs,
    ) -> None:
        divisible(config_key(default=self.config_key), embed_dims=embed_dims, num_heads=num_heads)
        super().__init__(in_channels, embed_dims, num_classes, in_index=in_index, with_conv_seg=False,
                         dropout_ratio=dropout_ratio, **kwargs)
        self.dec_proj = nn.Linear(self.in_channels, embed_dims)
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, embed_dims))
        nn.init.trunc_normal_(self.cls_emb, std=0.02)
        rates = torch.linspace(0, drop_path_rate, num_layers).tolist() if num_layers else []
        self.layers = nn.ModuleList(
            TransformerBlock(
                embed_dims, num_heads, mlp_ratio=mlp_ratio, proj_drop=drop_rate,
                attn_drop=attn_drop_rate, drop_path=rate, norm_eps=1e-5,
            )
            for rate in rates
        )
        self.decoder_norm = nn.LayerNorm(embed_dims)
        self.patch_proj = nn.Linear(embed_dims, embed_dims, bias=False)
        self.classes_proj = nn.Linear(embed_dims, embed_dims, bias=False)
        self.mask_norm = nn.LayerNorm(num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """Segmenter's initialisation: every Linear trunc_normal(std 0.02) with zero bias,
        every LayerNorm weight 1 and bias 0 (the class embeddings are drawn above)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self._select(inputs)
        batch, _, height, width = x.shape
        tokens = self.dec_proj(x.flatten(2).transpose(1, 2))
        tokens = torch.cat([tokens, self.cls_emb.expand(batch, -1, -1)], dim=1)
        for layer in self.layers:
            tokens = layer(tokens)
        tokens = self.decoder_norm(tokens)
        patches = F.normalize(self.patch_proj(tokens[:, : height * width]), dim=-1)
        classes = F.normalize(self.classes_proj(tokens[:, height * width:]), dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (N, HW, K)
        return masks.transpose(1, 2).reshape(batch, self.num_classes, height, width)
