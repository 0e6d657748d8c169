"""The conv -> norm (BatchNorm by default) -> ReLU block shared by the convolutional stems (image
and clip) and the decode heads."""

from __future__ import annotations

from typing import Tuple, Union

import torch
from torch import nn

from vitasks.checks import one_of
from vitasks.models.layers.norm import LayerNorm2d

__all__ = ["ConvBNReLU", "conv_norm", "check_norm", "NORMS"]

# Before the stem and the heads shared this block, the heads' version was an ``nn.Sequential``
# whose state dict read ``0.weight`` (conv) and ``1.*`` (BatchNorm); such checkpoints still load.
_LEGACY_PREFIXES = {"0.": "conv.", "1.": "bn."}


NORMS = ("BN", "LN", "GN")


def check_norm(norm: str, key: str = "norm") -> str:
    """``norm`` if it names a normalisation of :class:`ConvBNReLU`; else a ConfigError at ``key``."""
    return one_of(norm, NORMS, key, listed=True)


def conv_norm(norm: str, channels: int, eps: float, dims: int = 2) -> nn.Module:
    """The normalisation layer named by ``norm`` (see :class:`ConvBNReLU`) for ``channels`` of a
    map with ``dims`` spatial dimensions (2: images, 3: clips; LN is for images only)."""
    check_norm(norm)
    if norm == "BN":
        return nn.BatchNorm2d(channels, eps=eps) if dims == 2 else nn.BatchNorm3d(channels, eps=eps)
    if norm == "LN":
        if dims != 2:
            raise ValueError(f"conv_norm: LN normalises images (dims 2), got dims {dims}; use BN or GN")
        return LayerNorm2d(channels, eps=eps)
    groups = max(1, min(32, channels // 8))  # GN
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=eps)


class ConvBNReLU(nn.Module):
    """k x k conv (no bias: the BatchNorm shifts) -> BatchNorm2d -> ReLU (k x k x k and
    BatchNorm3d on clips, ``dims=3``).

    The unit of :class:`~vitasks.models.backbones.ConvStem` (Xiao et al. 2021) and of the
    UperNet, FCN and SETR decode heads (mmcv's ``ConvModule`` with BN and ReLU). Padding is
    ``dilation * (kernel_size // 2)``, so an odd kernel keeps the size at stride 1 and gives
    ``ceil(size / stride)`` otherwise.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: square (cube) kernel size (odd), or one (odd) size per dimension.
        stride: convolution stride (an int, or one per dimension).
        dilation: convolution dilation.
        bn_eps: epsilon of the normalisation.
        norm: ``"BN"`` (BatchNorm2d, the default), ``"LN"`` (LayerNorm over the channels at each
            pixel, :class:`LayerNorm2d`) or ``"GN"`` (GroupNorm with one group per 8 channels,
            at most 32 groups). LN and GN keep no running statistics: a layer shared by inputs
            of several kinds (the stem of a multi-task model) normalises each the same way in
            training and inference.
        kaiming_init: initialise the conv with Kaiming normal (fan_out, ReLU), as mmcv's
            ``ConvModule`` does for the heads; ``False`` keeps PyTorch's default initialisation.
        dims: spatial dimensions of the input: 2 (images, (B, C, H, W)) or 3 (clips,
            (B, C, T, H, W): Conv3d and BatchNorm3d, as :class:`~vitasks.models.backbones.ConvStem3D`).

    State dict: ``conv.weight``, ``bn.{weight,bias,running_mean,running_var,num_batches_tracked}``
    (mmcv's ``ConvModule`` names; LN and GN have ``bn.{weight,bias}`` only).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, Tuple[int, ...]],
        stride: Union[int, Tuple[int, ...]] = 1,
        dilation: int = 1,
        bn_eps: float = 1e-5,
        kaiming_init: bool = False,
        norm: str = "BN",
        dims: int = 2,
    ) -> None:
        super().__init__()
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
        padding = (tuple(dilation * (k // 2) for k in kernel_size) if isinstance(kernel_size, tuple)
                   else dilation * (kernel_size // 2))
        self.conv = conv(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=False,
        )
        self.bn = conv_norm(norm, out_channels, bn_eps, dims)
        self.act = nn.ReLU(inplace=True)
        if kaiming_init:
            nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Rename the heads' former nn.Sequential keys (``<prefix>0.weight`` -> ``<prefix>conv.weight``).
        for key in [k for k in state_dict if k.startswith(prefix)]:
            rest = key[len(prefix):]
            for old, new in _LEGACY_PREFIXES.items():
                if rest.startswith(old) and prefix + new + rest[len(old):] not in state_dict:
                    state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
                    break
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
