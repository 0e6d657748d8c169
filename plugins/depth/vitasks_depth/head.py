"""The depth head and its loss."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from vitasks.errors import ConfigError
from vitasks.models.heads.decode_head import resize
from vitasks.models.heads.seg_heads import FCNHead
from vitasks.registry import MODELS
from vitasks.structures import DataSample


def stack_depths(data_samples: Sequence[DataSample]) -> torch.Tensor:
    """``(N, H, W)`` float depths in metres from the samples' ``gt_depth`` (0 = invalid)."""
    try:
        depths = [s.gt_depth.data for s in data_samples]
    except AttributeError as e:
        raise ValueError("the depth loss needs `gt_depth` in every data sample "
                         "(PackDepthInputs after LoadDepth)") from e
    return torch.stack([d.reshape(d.shape[-2:]) for d in depths]).float()


@MODELS.register_module()
class SILogLoss(nn.Module):
    """Scale-invariant log loss (Eigen et al., 2014) over the valid pixels (depth > 0):

    ``g = log(pred) - log(gt)``,  ``loss = mean(g^2) - lambd * mean(g)^2``.

    ``lambd = 1`` ignores the global scale entirely, ``0`` is the plain squared log error; Eigen
    et al. train with 0.5. Takes log depth predictions (what the head outputs).

    Args:
        lambd: the weight of the scale term, in [0, 1].
        loss_weight: multiplies the loss.
    """

    def __init__(self, lambd: float = 0.5, loss_weight: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= lambd <= 1.0:
            raise ConfigError(f"SILogLoss: lambd must be in [0, 1], got {lambd}")
        self.lambd = float(lambd)
        self.loss_weight = float(loss_weight)

    def forward(self, log_pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        valid = gt > 0
        if not valid.any():  # a batch without depth: no signal, but keep the graph
            return log_pred.sum() * 0.0
        g = log_pred[valid] - torch.log(gt[valid])
        return self.loss_weight * (g.pow(2).mean() - self.lambd * g.mean().pow(2))


@MODELS.register_module()
class DepthHead(FCNHead):
    """A dense regression head: the FCN head with one output channel, read as log depth.

    Predicting log depth keeps depth positive and makes errors relative, as the loss and AbsRel
    are. Arguments as :class:`~vitasks.models.heads.seg_heads.FCNHead` without ``num_classes``;
    ``loss_decode`` defaults to :class:`SILogLoss` (lambda 0.5); ``init_depth`` (metres) is
    the prediction the head starts from.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        in_index: int = -1,
        num_convs: int = 2,
        kernel_size: int = 3,
        concat_input: bool = True,
        dilation: int = 1,
        dropout_ratio: float = 0.0,
        loss_decode: dict | Sequence[dict] | None = None,
        align_corners: bool = False,
        init_depth: float = 3.0,
    ) -> None:
        if init_depth <= 0:
            raise ConfigError(f"DepthHead: init_depth must be positive, got {init_depth}")
        super().__init__(
            in_channels, channels, num_classes=1, in_index=in_index, num_convs=num_convs,
            kernel_size=kernel_size, concat_input=concat_input, dilation=dilation,
            dropout_ratio=dropout_ratio,
            loss_decode=loss_decode if loss_decode is not None else dict(type="SILogLoss"),
            align_corners=align_corners,
        )
        # start from a plausible depth everywhere (log of it), not 1 m: the loss's scale term
        # (lambda < 1) then has little to correct
        nn.init.constant_(self.conv_seg.bias, math.log(init_depth))

    def loss_by_logits(self, logits: torch.Tensor, data_samples: Sequence[DataSample]) -> dict:
        gt = stack_depths(data_samples).to(logits.device)
        log_pred = resize(logits, gt.shape[-2:], self.align_corners)[:, 0].float()
        return {name: loss(log_pred, gt) for name, loss in zip(self.loss_names, self.loss_decode)}
