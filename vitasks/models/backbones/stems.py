"""Stems: image (B, in_channels, H, W) -> token map (B, embed_dim, H/stride, W/stride).

A config chooses one under ``model.backbone.stem`` by ``type``. The backbone passes
``in_channels`` and ``embed_dim`` (and ``patch_size`` to stems that take it); each stem exposes
``stride``, its total downsampling factor.

- :class:`PatchEmbed`: ViT's patchify conv (p x p, stride p).
- :class:`ConvStem`: stacked 3x3 conv-BN-ReLU layers, then a 1x1 conv (Xiao et al. 2021,
  "Early Convolutions Help Transformers See Better"); :class:`ConvStem3D`, the same on clips
  (B, in_channels, T, H, W), for the video ViT.
- :class:`ResNetStem`: the ResNet (BiT, ResNetV2-style) part of the hybrid R50+ViT-B/16 of
  Dosovitskiy et al. 2021, then a 1x1 conv projection.
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vitasks.checks import ListOf, OneOf, OrNone, PositiveInt, checked, config_key, divisible, not_both, one_of
from vitasks.errors import ConfigError
from vitasks.models.layers.conv import ConvBNReLU, check_norm
from vitasks.registry import MODELS

STEM_KEY = "model.backbone.stem"


def _where() -> str:
    """The stem's config key (``model.backbone.stem`` under the backbone being built)."""
    return config_key(default=STEM_KEY)


#: Forms of weight standardisation: ``"var"`` (w - mean) / sqrt(var + eps), as timm and BiT's
#: PyTorch code; ``"std"`` (w - mean) / (std + eps), as Google's JAX ViT hybrid.
WS_FORMS = ("var", "std")


def _check_ws_form(ws_form, stem: str) -> str:
    return one_of(ws_form, WS_FORMS, f"{_where()}.ws_form of {stem}")


# --------------------------------------------------------------------------------------------
# Patch embedding


def init_patchify(proj: nn.Module) -> nn.Module:
    """A patchify (or tubelet) conv initialised as MAE / timm do: like a linear layer on the
    flattened patches (Xavier uniform), bias zero."""
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)
    return proj


@MODELS.register_module()
class PatchEmbed(nn.Module):
    """Split the image into non-overlapping p x p patches and project each linearly (a p x p
    convolution with stride p), as in ViT.

    Args:
        in_channels: image channels.
        embed_dim: token width.
        patch_size: patch side p (the stride).
        bias: whether the projection has a bias.

    State dict: ``proj.{weight,bias}``.
    """

    config_key = STEM_KEY

    @checked
    def __init__(self, in_channels: int = 3, embed_dim: int = 768, patch_size: PositiveInt = 16,
                 bias: bool = True) -> None:
        super().__init__()
        self.stride = patch_size
        self.proj = init_patchify(nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


# --------------------------------------------------------------------------------------------
# Convolutional stem (Xiao et al. 2021)

#: The stems of the paper's ViTC models (its Table/appendix settings): 3x3 convs with these output
#: channels and strides, each followed by BN and ReLU, then a 1x1 conv to the model width.
#: ViTC-1GF/4GF (widths 192/384): four stride-2 convs; ViTC-18GF/36GF (widths 768/1024): six
#: convs where the stride is 2 whenever the channel count changes.
CONV_STEM_PRESETS: Dict[str, Dict[str, Tuple[int, ...]]] = {
    "1GF": dict(channels=(24, 48, 96, 192), strides=(2, 2, 2, 2)),
    "4GF": dict(channels=(48, 96, 192, 384), strides=(2, 2, 2, 2)),
    "18GF": dict(channels=(64, 128, 128, 256, 256, 512), strides=(2, 2, 1, 2, 1, 2)),
    "36GF": dict(channels=(64, 128, 128, 256, 256, 512), strides=(2, 2, 1, 2, 1, 2)),
}
# The paper pairs each stem with one model width; used when neither preset nor channels is given.
_PRESET_FOR_WIDTH = {192: "1GF", 384: "4GF", 768: "18GF", 1024: "36GF"}


@MODELS.register_module()
class ConvStem(nn.Module):
    """Stacked 3x3 conv-BN-ReLU layers whose strides multiply to the patch size, then a 1x1 conv
    to ``embed_dim`` (Xiao et al. 2021).

    Args:
        in_channels: image channels.
        embed_dim: token width.
        preset: one of :data:`CONV_STEM_PRESETS` (``"1GF"``, ``"4GF"``, ``"18GF"``, ``"36GF"``).
        channels: explicit output channels of the 3x3 convs (instead of ``preset``).
        strides: explicit strides of the 3x3 convs, one per entry of ``channels``.
        kernel_size: kernel of the stacked convs (odd; padded to keep ceil(size / stride)).
        bn_eps: epsilon of the normalisation.
        norm: ``"BN"`` (the paper's BatchNorm), ``"LN"`` or ``"GN"``: see
            :class:`~vitasks.models.layers.conv.ConvBNReLU`. A stem shared by several tasks
            (``MultiTaskModel``) may prefer LN or GN, which keep no running statistics.
        downsample: how a conv with stride s > 1 reduces the resolution: ``"conv"`` (the paper's
            strided conv) or ``"maxpool"`` (an s x s max-pool, then the conv at stride 1, as plain
            VGG-style CNNs do). Max-pooling keeps the strongest response in each window, which
            makes a small stem learn objects over cluttered backgrounds (photographs) much faster
            (docs/demos.md, "Classification"). Parameter-free: the state dict is the same.
        proj: the paper's final 1x1 conv to ``embed_dim``. ``False``: none; the last conv's
            channels must be ``embed_dim``, and its BN-ReLU outputs are the tokens. On a few
            hundred images the linear 1x1 after the last ReLU slows learning markedly (two
            linear maps in a row, each scaling the other's gradient: docs/demos.md,
            "Classification"); without it the stem learns as the plain CNN does. State dict: no ``proj.*``.

    With neither ``preset`` nor ``channels``, the paper's stem for ``embed_dim`` is used
    (192 -> 1GF, 384 -> 4GF, 768 -> 18GF, 1024 -> 36GF).

    State dict: ``convs.{i}.conv.weight``, ``convs.{i}.bn.*``, ``proj.{weight,bias}``.
    """

    config_key = STEM_KEY

    #: Spatial dimensions of the input: 2 for images; :class:`ConvStem3D` takes clips (3).
    dims = 2

    @checked
    def __init__(
        self,
        in_channels: int = 3,
        embed_dim: int = 768,
        preset: Optional[str] = None,
        channels: OrNone(ListOf(PositiveInt)) = None,
        strides: OrNone(ListOf(PositiveInt)) = None,
        kernel_size: PositiveInt = 3,
        bn_eps: float = 1e-5,
        norm: str = "BN",
        downsample: OneOf("conv", "maxpool") = "conv",
        proj: bool = True,
    ) -> None:
        super().__init__()
        self._build(in_channels, embed_dim, preset, channels, strides, kernel_size, bn_eps, norm, downsample, proj)

    def _build(self, in_channels, embed_dim, preset, channels, strides, kernel_size, bn_eps, norm, downsample,
               proj) -> None:
        """The layers (shared with :class:`ConvStem3D`, which sets its temporal settings first)."""
        name = type(self).__name__
        channels, strides = self._resolve(embed_dim, preset, channels, strides)
        check_norm(norm, f"{_where()}.norm of {name}")
        if self.dims == 3 and norm == "LN":
            raise ConfigError(f"{_where()}.norm of {name}: LN is for image stems; use BN or GN")
        if kernel_size % 2 == 0:
            raise ConfigError(f"{_where()}.kernel_size of {name} must be odd, got {kernel_size}")
        self.channels = channels
        self.strides = strides
        self.stride = math.prod(strides)
        self.downsample = downsample
        # Each conv's stride and kernel per input dimension: (s, s) on images, (time, s, s) on clips.
        if self.dims == 2:
            self.conv_strides = tuple((s, s) for s in strides)
            kernels = [kernel_size] * len(strides)
        else:
            self.conv_strides = tuple((t, s, s) for t, s in zip(self.temporal_strides, strides))
            kernels = [(t, kernel_size, kernel_size) for t in self.temporal_kernel_sizes]
        pool = downsample == "maxpool"
        layers: List[nn.Module] = []
        prev = in_channels
        for c, s, kernel in zip(channels, self.conv_strides, kernels):
            layers.append(ConvBNReLU(prev, c, kernel, stride=1 if pool else s, bn_eps=bn_eps, norm=norm,
                                     dims=self.dims))
            prev = c
        self.convs = nn.Sequential(*layers)
        if not proj and prev != embed_dim:
            raise ConfigError(f"{_where()}: {name} with proj: false gives the last conv's {prev} channels as tokens; "
                              f"set its last `channels` entry to embed_dim ({embed_dim}) or proj: true")
        conv = nn.Conv2d if self.dims == 2 else nn.Conv3d
        self.proj = conv(prev, embed_dim, kernel_size=1) if proj else nn.Identity()

    @staticmethod
    def _resolve(embed_dim, preset, channels, strides) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        not_both(f"{_where()}: ConvStem", preset=preset, **{"channels + strides": channels or strides})
        if preset is not None or (channels is None and strides is None):
            # The preset named, or the paper's stem for this width.
            key = _PRESET_FOR_WIDTH.get(embed_dim) if preset is None else str(preset).upper().replace("VITC-", "")
            if key not in CONV_STEM_PRESETS:
                problem = (f"unknown preset {preset!r}" if preset is not None else
                           f"none given, and the paper has no default stem for embed_dim {embed_dim}")
                names = sorted(CONV_STEM_PRESETS, key=lambda k: int(k[:-2]))
                raise ConfigError(f"{_where()}.preset of ConvStem: {problem}; expected one of {names} (or `channels` "
                                  "and `strides`)")
            p = CONV_STEM_PRESETS[key]
            return p["channels"], p["strides"]
        if channels is None or strides is None or len(channels) != len(strides):
            raise ConfigError(f"{_where()}: ConvStem needs both `channels` and `strides`, one stride per conv; got "
                              f"channels={channels!r}, strides={strides!r}")
        return channels, strides

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last activations: the layout oneDNN's and cuDNN's convolutions run fastest in
        # (the demos' 8-conv stem trains about a fifth faster on the CPU). The tokens' flatten
        # and transpose that follow are then a free view.
        x = x.contiguous(memory_format=torch.channels_last if self.dims == 2 else torch.channels_last_3d)
        if self.downsample == "conv":
            return self.proj(self.convs(x))
        max_pool = F.max_pool2d if self.dims == 2 else F.max_pool3d
        for conv, stride in zip(self.convs, self.conv_strides):
            if max(stride) > 1:  # ceil_mode: ceil(size / stride) positions, as the strided conv gives
                x = max_pool(x, stride, ceil_mode=True)
            x = conv(x)
        return self.proj(x)


@MODELS.register_module()
class ConvStem3D(ConvStem):
    """:class:`ConvStem` for clips (B, in_channels, T, H, W): k x k x k conv-BN-ReLU layers
    (Conv3d, BatchNorm3d), then a 1x1x1 conv to ``embed_dim`` (or none), giving a token grid
    (B, embed_dim, T / temporal_stride, H / stride, W / stride): the stem of a hybrid video ViT,
    as C3D's layers under a transformer (the video analogue of the image hybrid).

    Args: those of :class:`ConvStem` (``strides`` downsample space; a max-pool with
    ``downsample: maxpool`` pools time and space together), and

        temporal_strides: each conv's temporal stride, one per entry of ``channels`` (default
            1 for all: no temporal downsampling). Their product is ``temporal_stride``, which
            the :class:`~vitasks.models.backbones.VideoVisionTransformer` checks against its
            ``tubelet_size``.
        temporal_kernel_sizes: each conv's kernel size in time (odd; default ``kernel_size``).
            1 makes a conv look at each frame alone: 1 in the early convs and 3 later is
            SlowFast's Slow pathway (appearance first, motion on coarser features).

    State dict: as :class:`ConvStem` with 5-dimensional kernels.
    """

    dims = 3

    @checked
    def __init__(
        self,
        in_channels: int = 3,
        embed_dim: int = 768,
        preset: Optional[str] = None,
        channels: OrNone(ListOf(PositiveInt)) = None,
        strides: OrNone(ListOf(PositiveInt)) = None,
        temporal_strides: OrNone(ListOf(PositiveInt)) = None,
        temporal_kernel_sizes: OrNone(ListOf(PositiveInt)) = None,
        kernel_size: PositiveInt = 3,
        bn_eps: float = 1e-5,
        norm: str = "BN",
        downsample: OneOf("conv", "maxpool") = "conv",
        proj: bool = True,
    ) -> None:
        nn.Module.__init__(self)
        spatial = self._resolve(embed_dim, preset, channels, strides)[1]
        if temporal_strides is None:
            temporal_strides = [1] * len(spatial)
        if len(temporal_strides) != len(spatial):
            raise ConfigError(f"{_where()}: ConvStem3D needs one temporal stride per conv ({len(spatial)}), got "
                              f"temporal_strides={list(temporal_strides)!r}")
        if temporal_kernel_sizes is None:  # (an even kernel_size is reported by _build)
            temporal_kernel_sizes = [kernel_size] * len(spatial)
        elif len(temporal_kernel_sizes) != len(spatial) or any(k % 2 == 0 for k in temporal_kernel_sizes):
            raise ConfigError(f"{_where()}: ConvStem3D needs one odd temporal kernel size per conv ({len(spatial)}), "
                              f"got temporal_kernel_sizes={list(temporal_kernel_sizes)!r}")
        self.temporal_strides = tuple(temporal_strides)
        self.temporal_stride = math.prod(temporal_strides)
        self.temporal_kernel_sizes = tuple(temporal_kernel_sizes)
        self._build(in_channels, embed_dim, preset, channels, strides, kernel_size, bn_eps, norm, downsample, proj)


# --------------------------------------------------------------------------------------------
# ResNet hybrid stem (ViT paper's R50+ViT-B/16)


def same_padding(size: int, kernel_size: int, stride: int, dilation: int = 1) -> Tuple[int, int]:
    """TensorFlow's "SAME" padding (before, after) for one spatial dimension.

    The output has ceil(size / stride) positions; the total padding is split with the extra
    pixel (if odd) after, as TensorFlow does.
    """
    total = max((math.ceil(size / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel_size: Tuple[int, int], stride: Tuple[int, int], dilation: Tuple[int, int] = (1, 1), value: float = 0.0) -> torch.Tensor:
    """Pad a (B, C, H, W) tensor as TensorFlow's "SAME" padding would for this window."""
    top, bottom = same_padding(x.shape[-2], kernel_size[0], stride[0], dilation[0])
    left, right = same_padding(x.shape[-1], kernel_size[1], stride[1], dilation[1])
    if top or bottom or left or right:
        x = F.pad(x, [left, right, top, bottom], value=value)
    return x


class StdConv2dSame(nn.Conv2d):
    """Conv2d with weight standardisation (each filter to zero mean, unit variance, as BiT) and
    TensorFlow "SAME" padding.

    The padding is static (symmetric, inside the conv) when it does not depend on the input size
    (stride 1 with an odd kernel, or a 1x1 kernel) and computed per input otherwise.

    Args:
        eps: the standardisation epsilon (1e-8 in timm's ViT hybrid, 1e-5 in Google's).
        ws_form: where ``eps`` goes: ``"var"`` (w - mean) / sqrt(var + eps) (timm) or ``"std"``
            (w - mean) / (std + eps) (Google's JAX code); variance and std are the population ones.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        bias: bool = False,
        eps: float = 1e-8,
        ws_form: str = "var",
    ) -> None:
        _check_ws_form(ws_form, "StdConv2dSame")
        static = kernel_size == 1 or (stride == 1 and kernel_size % 2 == 1)
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride,
            padding=(kernel_size - 1) // 2 if static and stride == 1 else 0, bias=bias,
        )
        self.eps = eps
        self.ws_form = ws_form
        self.dynamic_pad = not static

    def standardized_weight(self) -> torch.Tensor:
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), correction=0, keepdim=True)
        if self.ws_form == "std":
            return (self.weight - mean) / (var.sqrt() + self.eps)
        return (self.weight - mean) * torch.rsqrt(var + self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}, ws_form={self.ws_form}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class MaxPool2dSame(nn.Module):
    """Max pooling with TensorFlow "SAME" padding (padded positions never win: padded with -inf)."""

    def __init__(self, kernel_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.kernel_size = (kernel_size, kernel_size)
        self.stride = (stride, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size, self.stride, value=float("-inf"))
        return F.max_pool2d(x, self.kernel_size, self.stride)


class GroupNormReLU(nn.Module):
    """GroupNorm, optionally followed by ReLU; state dict ``weight``, ``bias`` (as a GroupNorm)."""

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5, act: bool = True) -> None:
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.act = act
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.relu(x, inplace=True) if self.act else x

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, groups={self.num_groups}, eps={self.eps}, act={self.act}"


class ResNetRoot(nn.Module):
    """7x7/2 weight-standardised conv (SAME) -> GroupNorm -> ReLU -> 3x3/2 max-pool (SAME)."""

    def __init__(
        self, in_channels: int, out_channels: int, num_groups: int, ws_eps: float, gn_eps: float, ws_form: str = "var"
    ) -> None:
        super().__init__()
        self.conv = StdConv2dSame(in_channels, out_channels, 7, stride=2, eps=ws_eps, ws_form=ws_form)
        self.norm = GroupNormReLU(out_channels, num_groups, gn_eps)
        self.pool = MaxPool2dSame(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.norm(self.conv(x)))


class Downsample(nn.Module):
    """Projection shortcut: 1x1 weight-standardised conv (with the block's stride) -> GroupNorm."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, num_groups: int, ws_eps: float, gn_eps: float,
        ws_form: str = "var",
    ) -> None:
        super().__init__()
        self.conv = StdConv2dSame(in_channels, out_channels, 1, stride=stride, eps=ws_eps, ws_form=ws_form)
        self.norm = GroupNormReLU(out_channels, num_groups, gn_eps, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """Non-pre-activation bottleneck (conv -> GN -> ReLU, as the ViT hybrid uses): 1x1, 3x3
    (carrying the stride), 1x1 to ``out_channels``, GN, add the shortcut, ReLU.

    ``downsample`` adds the projection shortcut; as in BiT/timm, every stage's first block has
    one (whatever its stride and widths), so checkpoints map one to one."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        num_groups: int,
        ws_eps: float,
        gn_eps: float,
        downsample: bool = False,
        ws_form: str = "var",
    ) -> None:
        super().__init__()
        mid = out_channels // 4
        if downsample:
            self.downsample = Downsample(in_channels, out_channels, stride, num_groups, ws_eps, gn_eps, ws_form)
        else:
            self.downsample = None
        ws = dict(eps=ws_eps, ws_form=ws_form)
        self.conv1 = StdConv2dSame(in_channels, mid, 1, **ws)
        self.norm1 = GroupNormReLU(mid, num_groups, gn_eps)
        self.conv2 = StdConv2dSame(mid, mid, 3, stride=stride, **ws)
        self.norm2 = GroupNormReLU(mid, num_groups, gn_eps)
        self.conv3 = StdConv2dSame(mid, out_channels, 1, **ws)
        self.norm3 = GroupNormReLU(out_channels, num_groups, gn_eps, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut, inplace=True)


class ResNetStage(nn.Module):
    """``depth`` bottlenecks; the first one carries the stride and the projection shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, depth: int, **kwargs) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[
            Bottleneck(
                in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1,
                downsample=i == 0, **kwargs,
            )
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResNetV2Body(nn.Module):
    """Root block and bottleneck stages; total stride 4 * 2 ** (len(layers) - 1)."""

    def __init__(
        self,
        in_channels: int,
        layers: Sequence[int],
        widths: Sequence[int],
        stem_channels: int,
        num_groups: int,
        ws_eps: float,
        gn_eps: float,
        ws_form: str = "var",
    ) -> None:
        super().__init__()
        kw = dict(num_groups=num_groups, ws_eps=ws_eps, gn_eps=gn_eps, ws_form=ws_form)
        self.stem = ResNetRoot(in_channels, stem_channels, **kw)
        stages = []
        prev = stem_channels
        for i, (depth, width) in enumerate(zip(layers, widths)):
            stages.append(ResNetStage(prev, width, 1 if i == 0 else 2, depth, **kw))
            prev = width
        self.stages = nn.Sequential(*stages)
        self.out_channels = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


@MODELS.register_module()
class ResNetStem(nn.Module):
    """The ResNet part of the ViT paper's hybrid (R50+ViT-B/16): a ResNetV2/BiT-style network with
    weight-standardised convs, GroupNorm and TensorFlow "SAME" padding, using non-pre-activation
    bottlenecks, then a 1x1 conv projection to ``embed_dim``.

    Args:
        in_channels: image channels.
        embed_dim: token width.
        layers: bottlenecks per stage; (3, 4, 9) is the hybrid's R50 (stride 16).
        widths: output channels per stage (default 256, 512, 1024, 2048 truncated to len(layers)).
        stem_channels: channels of the 7x7 root conv.
        num_groups: GroupNorm groups.
        ws_eps: weight-standardisation epsilon (1e-8 as timm's ViT hybrid; 1e-5 in Google's).
        gn_eps: GroupNorm epsilon (1e-5 as timm; 1e-6 in Google's flax code).
        ws_form: ``"var"``: (w - mean) / sqrt(var + ws_eps), timm's; ``"std"``: (w - mean) /
            (std + ws_eps), Google's JAX code (use with ws_eps 1e-5, gn_eps 1e-6 for its weights).

    State dict: ``backbone.stem.{conv,norm}``, ``backbone.stages.{s}.blocks.{b}.{conv1,norm1,
    conv2,norm2,conv3,norm3}``, ``backbone.stages.{s}.blocks.0.downsample.{conv,norm}``,
    ``proj.{weight,bias}`` (timm's ``patch_embed.*`` names minus the prefix).
    """

    config_key = STEM_KEY

    @checked
    def __init__(
        self,
        in_channels: int = 3,
        embed_dim: int = 768,
        layers: ListOf(PositiveInt) = (3, 4, 9),
        widths: OrNone(ListOf(PositiveInt)) = None,
        stem_channels: PositiveInt = 64,
        num_groups: PositiveInt = 32,
        ws_eps: float = 1e-8,
        gn_eps: float = 1e-5,
        ws_form: str = "var",
    ) -> None:
        super().__init__()
        _check_ws_form(ws_form, "ResNetStem")
        if widths is None:
            widths = (256, 512, 1024, 2048)[: len(layers)]
        if len(widths) != len(layers):
            raise ConfigError(f"{_where()}: ResNetStem `widths` has {len(widths)} entries but `layers` has "
                              f"{len(layers)} stages; give `widths`, one per stage (the default has 4)")
        for key, c in [("stem_channels", stem_channels)] + [("widths", w) for w in widths] + [("widths / 4", w // 4) for w in widths]:
            divisible(f"{_where()} (ResNetStem)", **{key: c, "num_groups": num_groups})
        self.layers = layers
        self.stride = 4 * 2 ** (len(layers) - 1)
        self.backbone = ResNetV2Body(in_channels, layers, widths, stem_channels, num_groups, ws_eps, gn_eps, ws_form)
        self.proj = nn.Conv2d(self.backbone.out_channels, embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(x))
