"""Depth metrics: AbsRel, RMSE and delta < 1.25 over every valid pixel of the set."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from mmengine.evaluator import BaseMetric

from vitasks.models.heads.decode_head import resize
from vitasks.registry import METRICS


def depth_errors(pred: torch.Tensor, gt: torch.Tensor) -> tuple[float, float, float, int]:
    """Sums over the valid pixels (gt > 0): ``(sum |p-g|/g, sum (p-g)^2, count max(p/g, g/p) <
    1.25, pixels)``, to be pooled over a data set."""
    valid = gt > 0
    p, g = pred[valid].double().clamp(min=1e-6), gt[valid].double()
    return ((p - g).abs().div(g).sum().item(), (p - g).pow(2).sum().item(),
            (torch.maximum(p / g, g / p) < 1.25).sum().item(), int(valid.sum().item()))


@METRICS.register_module()
class DepthMetric(BaseMetric):
    """``depth/abs_rel`` = mean |p - g| / g, ``depth/rmse`` = sqrt(mean (p - g)^2) (metres) and
    ``depth/delta1`` = fraction of pixels with max(p/g, g/p) < 1.25, over all valid pixels of the
    set (pooled, not per image), predictions resized (bilinear) to the ground truth's size.

    Args:
        min_depth, max_depth: ground truth outside (min, max] counts as invalid (0: no bound).
        collect_device, prefix: as mmengine's ``BaseMetric`` (default prefix ``depth``).
    """

    default_prefix = "depth"

    def __init__(self, min_depth: float = 0.0, max_depth: float = 0.0,
                 collect_device: str = "cpu", prefix: str | None = None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.min_depth = float(min_depth)
        self.max_depth = float(max_depth)

    def process(self, data_batch: Any, data_samples: Sequence[Any]) -> None:
        for sample in data_samples:
            get = sample.get if isinstance(sample, dict) else lambda k: getattr(sample, k)
            pred = get("pred_depth")
            gt = get("gt_depth")
            pred = (pred["data"] if isinstance(pred, dict) else pred.data).float()
            gt = (gt["data"] if isinstance(gt, dict) else gt.data).float()
            gt = gt.reshape(gt.shape[-2:]).cpu()
            pred = pred.reshape(1, 1, *pred.shape[-2:]).cpu()
            if pred.shape[-2:] != gt.shape:
                pred = resize(pred, gt.shape)
            gt = torch.where(gt > self.min_depth, gt, torch.zeros_like(gt))
            if self.max_depth > 0:
                gt = torch.where(gt <= self.max_depth, gt, torch.zeros_like(gt))
            self.results.append(depth_errors(pred[0, 0], gt))

    def compute_metrics(self, results: list) -> dict:
        abs_rel, squared, within, pixels = (sum(r[i] for r in results) for i in range(4))
        if pixels == 0:
            return dict(abs_rel=float("nan"), rmse=float("nan"), delta1=float("nan"))
        return dict(abs_rel=abs_rel / pixels, rmse=math.sqrt(squared / pixels), delta1=within / pixels)
