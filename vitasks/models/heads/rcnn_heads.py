"""The per-RoI heads of Mask R-CNN, as detectron2 builds them for ViTDet.

- :class:`ConvFCBoxHead`: pooled RoI features (R, 256, 7, 7) -> ``num_convs`` 3x3 convs (LN,
  ReLU) -> ``num_fcs`` fully connected layers (ReLU) -> class logits (R, K + 1; the last column is
  background) and box deltas (R, 4K class-specific, or R, 4 class-agnostic). ViTDet: 4 convs of
  256, 1 fc of 1024, "conv_norm LN" (detectron2's ``FastRCNNConvFCHead`` +
  ``FastRCNNOutputLayers``).
- :class:`MaskConvUpsampleHead`: pooled features (R, 256, 14, 14) -> ``num_convs`` 3x3 convs
  (LN, ReLU) -> 2x2 deconv stride 2 (ReLU) -> 1x1 conv: mask logits (R, K, 28, 28), one map per
  class (detectron2's ``MaskRCNNConvUpsampleHead``).

Initialisation follows detectron2: convs and the deconv Kaiming normal (fan_out), fcs Caffe2's
"xavier" (Kaiming uniform, a=1), the class scores normal(0.01), the box deltas and the mask
predictor normal(0.001), biases 0. Convs followed by a norm have no bias.
"""

from typing import Optional

import torch
from torch import nn

from vitasks.checks import NonNegativeInt, OneOf, PositiveInt, checked
from vitasks.models.layers.norm import LayerNorm2d
from vitasks.registry import MODELS

Norm = OneOf(None, "", "LN")  # channel LayerNorm, or none


def _conv_norm_relu(in_channels: int, out_channels: int, norm: Optional[str]) -> nn.Sequential:
    """3x3 conv (+ channel LayerNorm) + ReLU, Kaiming-initialised."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not norm)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    layers = [conv] + ([LayerNorm2d(out_channels)] if norm else []) + [nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class _ConvHead(nn.Module):
    """What the box and mask heads share: ``num_classes``, ``class_agnostic`` and ``convs``, the
    ``num_convs`` conv-norm-ReLU layers on the pooled features (``conv_out`` channels out)."""

    def __init__(self, num_classes: int, in_channels: int, num_convs: int, conv_channels: int,
                 norm: Optional[str], class_agnostic: bool) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.class_agnostic = bool(class_agnostic)
        self.convs = nn.Sequential(*(
            _conv_norm_relu(in_channels if i == 0 else conv_channels, conv_channels, norm)
            for i in range(num_convs)
        ))
        self.conv_out = conv_channels if num_convs else in_channels


@MODELS.register_module()
class ConvFCBoxHead(_ConvHead):
    """Box classification and regression head of a two-stage detector.

    Args:
        num_classes: K object classes (the logits have K + 1 columns, background last).
        in_channels: channels of the pooled features.
        pooled_size: side of the pooled features (7).
        num_convs: 3x3 conv layers (ViTDet: 4).
        conv_channels: their width (256).
        num_fcs: fully connected layers after the convs (ViTDet: 1).
        fc_channels: their width (1024).
        norm: ``"LN"`` (channel LayerNorm after each conv, ViTDet) or null.
        class_agnostic: one box per RoI (Cascade R-CNN) instead of one per class.
    """

    config_key = "model.roi_head.box_head"

    @checked
    def __init__(
        self,
        num_classes: PositiveInt,
        in_channels: PositiveInt = 256,
        pooled_size: PositiveInt = 7,
        num_convs: NonNegativeInt = 4,
        conv_channels: PositiveInt = 256,
        num_fcs: NonNegativeInt = 1,
        fc_channels: PositiveInt = 1024,
        norm: Norm = "LN",
        class_agnostic: bool = False,
    ) -> None:
        super().__init__(num_classes, in_channels, num_convs, conv_channels, norm, class_agnostic)
        features = self.conv_out * pooled_size * pooled_size
        fcs = []
        for i in range(num_fcs):
            fc = nn.Linear(features if i == 0 else fc_channels, fc_channels)
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)
            fcs += [fc, nn.ReLU(inplace=True)]
        self.fcs = nn.Sequential(*fcs)
        out_features = fc_channels if num_fcs else features
        self.cls_score = nn.Linear(out_features, num_classes + 1)
        self.bbox_pred = nn.Linear(out_features, 4 if self.class_agnostic else 4 * num_classes)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, pooled: torch.Tensor):
        """Class logits (R, K + 1) and box deltas (R, 4K) or (R, 4) for pooled RoI features."""
        hidden = self.fcs(self.convs(pooled).flatten(1))
        return self.cls_score(hidden), self.bbox_pred(hidden)


@MODELS.register_module()
class MaskConvUpsampleHead(_ConvHead):
    """Mask head of Mask R-CNN: mask logits at twice the pooled size, one map per class.

    Args:
        num_classes: K (one mask logit map per class; 1 with ``class_agnostic``).
        in_channels: channels of the pooled features.
        num_convs: 3x3 conv layers (4).
        conv_channels: their width and the deconv's (256).
        norm: ``"LN"`` (ViTDet) or null.
        class_agnostic: one mask per RoI instead of one per class.
    """

    config_key = "model.roi_head.mask_head"

    @checked
    def __init__(
        self,
        num_classes: PositiveInt,
        in_channels: PositiveInt = 256,
        num_convs: NonNegativeInt = 4,
        conv_channels: PositiveInt = 256,
        norm: Norm = "LN",
        class_agnostic: bool = False,
    ) -> None:
        super().__init__(num_classes, in_channels, num_convs, conv_channels, norm, class_agnostic)
        self.deconv = nn.ConvTranspose2d(self.conv_out, conv_channels, kernel_size=2, stride=2)
        nn.init.kaiming_normal_(self.deconv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.deconv.bias)
        self.predictor = nn.Conv2d(conv_channels, 1 if self.class_agnostic else num_classes, 1)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Mask logits (R, K, 2P, 2P) (K = 1 class-agnostic) for pooled features (R, C, P, P)."""
        return self.predictor(torch.relu(self.deconv(self.convs(pooled))))
