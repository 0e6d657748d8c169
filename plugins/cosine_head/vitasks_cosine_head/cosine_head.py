"""A cosine classifier head: logits are scaled cosine similarities between the features and one
learned prototype per class (as in cosine-softmax / normalised-softmax classifiers).

Normalising both sides bounds every logit by ``scale``; it is often steadier than a plain linear
head when fine-tuning with few samples per class.
"""

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitasks.errors import ConfigError
from vitasks.models.heads.cls_heads import BaseClsHead
from vitasks.registry import MODELS


@MODELS.register_module()
class CosineClsHead(BaseClsHead):
    """``scale * cos(feature, prototype_k)`` for each class k.

    Args:
        num_classes: Number of classes K.
        in_channels: Feature width C.
        scale: Temperature multiplying the cosines (logits lie in [-scale, scale]).
        learnable_scale: Train the scale too (stored as its logarithm, so it stays positive).
        loss: Loss config (default cross-entropy).
        init_cfg: mmengine initialisation config.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        scale: float = 16.0,
        learnable_scale: bool = False,
        loss: Optional[dict] = None,
        init_cfg: Optional[dict] = None,
    ) -> None:
        super().__init__(num_classes, loss=loss, init_cfg=init_cfg)
        if scale <= 0:
            raise ConfigError(f"CosineClsHead: scale must be positive, got {scale!r}")
        self.in_channels = in_channels
        # Named `fc` like the built-in heads, so checkpoint rules for `head.fc.*` apply.
        self.fc = nn.Linear(in_channels, num_classes, bias=False)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        log_scale = torch.tensor(float(scale)).log()
        if learnable_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def forward(self, feats: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
        if isinstance(feats, (tuple, list)):
            feats = feats[-1]
        cosine = F.linear(F.normalize(feats, dim=-1), F.normalize(self.fc.weight, dim=-1))
        return self.log_scale.exp() * cosine
