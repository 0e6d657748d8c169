"""Multi-level neck for dense heads: a pyramid from single-stride ViT feature maps.

A plain ViT gives maps at one stride (16 for 16-pixel patches). BEiT's and MAE's semantic
segmentation fine-tuning turn the maps of four blocks into strides 4, 8, 16 and 32 with
transposed convolutions (up) and max pooling (down), which UperNet then fuses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vitasks.checks import PositiveInt, checked, config_key, feature_maps
from vitasks.errors import ConfigError
from vitasks.registry import MODELS


RESCALES = (4, 2, 1, 0.5, 0.25)


def _rescale_module(scale: float, channels: int) -> nn.Module:
    """The module changing a map's resolution by ``scale`` (one of :data:`RESCALES`)."""
    if scale == 4:
        # Two stride-2 deconvs with BN + GELU between them (BEiT/MAE's fpn1).
        return nn.Sequential(
            nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2),
            nn.BatchNorm2d(channels),
            nn.GELU(),
            nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2),
        )
    if scale == 2:
        return nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2)
    if scale == 1:
        return nn.Identity()
    if scale == 0.5:
        return nn.MaxPool2d(kernel_size=2, stride=2)
    return nn.MaxPool2d(kernel_size=4, stride=4)


@MODELS.register_module()
class Feature2Pyramid(nn.Module):
    """Rescale same-stride maps into a pyramid (BEiT/MAE segmentation neck).

    With a stride-16 backbone and the default ``rescales`` the outputs have strides 4, 8, 16
    and 32; channels are unchanged.

    Args:
        embed_dim: channels of the input maps (the backbone's ``embed_dim``).
        rescales: resolution factor per input map, in input order.
    """

    config_key = "model.neck"

    @checked
    def __init__(self, embed_dim: PositiveInt, rescales: Sequence[float] = (4, 2, 1, 0.5)) -> None:
        super().__init__()
        self.config_path = config_key(default=self.config_key)  # for errors at run time too
        if not rescales or any(s not in RESCALES for s in rescales):
            raise ConfigError(f"{self.config_path}.rescales must be among {', '.join(map(str, RESCALES))} "
                              f"(one per input map); got {rescales!r}")
        self.embed_dim = int(embed_dim)
        self.rescales = tuple(float(s) for s in rescales)
        self.ops = nn.ModuleList(_rescale_module(s, self.embed_dim) for s in self.rescales)

    def forward(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        feature_maps(inputs, len(self.ops), self.config_path, f"rescales {list(self.rescales)}")
        return tuple(op(x) for op, x in zip(self.ops, inputs))
