"""A hybrid ViT that also hands its stem's high-resolution maps to a dense head.

A ViT's token maps have the stem's total stride (8 or 16): too coarse to delineate thin
structures (a digit's stroke is 4 to 7 pixels of a 96-pixel image). Hybrid-ViT segmenters take
the convolutional stem's earlier, finer maps as skip connections into the decoder, as U-Net's
encoder does (TransUNet, Chen et al. 2021: the R50 stem's stride-2, 4 and 8 maps into a
cascaded upsampler; DPT-hybrid, Ranftl et al. 2021: the ResNet stem's stages as two of its four
reassembled levels).

:class:`StemSkipViT` is :class:`~vitasks.models.backbones.vit.VisionTransformer` (same
arguments, same weights: a ``VisionTransformer`` checkpoint loads into it and back) plus
``stem_skips``: names of the stem's submodules whose outputs ``forward`` returns, in that order,
before the block maps of ``out_indices``. The maps are taken with forward hooks held for one
call only (timm's ``FeatureHooks`` idea), so the stem runs once and nothing is kept between
calls. :class:`~vitasks.models.heads.skip_head.CascadedUpHead` is the decoder that fuses them.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from vitasks.errors import ConfigError
from vitasks.registry import MODELS

from .vit import VisionTransformer


@MODELS.register_module()
class StemSkipViT(VisionTransformer):
    """:class:`VisionTransformer` whose ``forward`` also returns maps of its stem.

    Args:
        stem_skips: the stem's submodules (dotted names relative to the stem) whose output maps
            are returned, in this order, before the block maps: ``convs.<i>`` for the i-th 3x3
            conv-BN-ReLU layer of a ``ConvStem`` (after its ReLU), ``stages.<i>`` for a
            ``ResNetStem`` stage. Each must return one NCHW tensor. Empty: exactly
            ``VisionTransformer``.
        **kwargs: the arguments of :class:`VisionTransformer`; ``out_indices`` is required
            (the skips go with dense outputs).

    ``forward(x)`` returns ``(*skip maps, *block maps)``. A ``ConvStem`` with channels
    ``[16, 16, 32, 32, 64, 64, 96]`` and strides ``[1, 2, 1, 2, 1, 2, 1]`` and
    ``stem_skips: [convs.2, convs.4]`` gives a (B, 32, H/2, W/2) and a (B, 64, H/4, W/4) map,
    then the (B, embed_dim, H/8, W/8) block maps. ``forward_intermediates`` and the other
    feature methods are :class:`VisionTransformer`'s (no skips).
    """

    def __init__(self, stem_skips: Sequence[str] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        key = self.key("stem_skips")
        if isinstance(stem_skips, str) or not isinstance(stem_skips, (list, tuple)):
            raise ConfigError(f"{key} must be a list of the stem's submodule names (e.g. [convs.2, convs.4]), "
                              f"got {stem_skips!r}")
        names = [str(n) for n in stem_skips]
        if len(set(names)) != len(names):
            raise ConfigError(f"{key} names a submodule twice: {names}")
        if names and self.out_indices is None:
            raise ConfigError(f"{key} needs {self.key('out_indices')}: the skips go with the block maps of a "
                              "dense head")
        modules: Dict[str, nn.Module] = dict(self.stem.named_modules())
        missing = [n for n in names if not n or n not in modules]
        if missing:
            layers = [n for n, m in self.stem.named_modules() if n and n.count(".") <= 1]
            raise ConfigError(f"{key}: the {type(self.stem).__name__} stem has no submodule {missing}; "
                              f"its layers: {layers}")
        self.stem_skips: Tuple[str, ...] = tuple(names)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        if not self.stem_skips:
            return super().forward(x)
        maps: Dict[str, torch.Tensor] = {}
        modules = dict(self.stem.named_modules())

        def keeper(name: str):
            def hook(_module: nn.Module, _inputs, output) -> None:
                if not isinstance(output, torch.Tensor) or output.ndim != 4:
                    raise ConfigError(f"{self.key('stem_skips')}: stem submodule {name!r} returned "
                                      f"{type(output).__name__} {getattr(output, 'shape', '')}, not one NCHW map")
                maps[name] = output
            return hook

        handles: List[torch.utils.hooks.RemovableHandle] = [
            modules[name].register_forward_hook(keeper(name)) for name in self.stem_skips
        ]
        try:
            feats = super().forward(x)
        finally:
            for handle in handles:
                handle.remove()
        return tuple(maps[name] for name in self.stem_skips) + tuple(feats)
