"""Top-k classification accuracy (percent), named ``accuracy/top1``, ``accuracy/top5``."""

from typing import List, Optional, Sequence

import torch
from mmengine.evaluator import BaseMetric

from vitasks.errors import ConfigError
from vitasks.registry import METRICS


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, topk: Sequence[int]) -> List[float]:
    """Percent of samples whose label is among the ``k`` highest scores, for each ``k``.

    ``k`` larger than the number of classes counts every sample (the label is always among all
    classes), so ``top5`` stays defined for datasets with fewer than 5 classes.
    """
    num_classes = scores.shape[1]
    maxk = min(max(topk), num_classes)
    top = scores.topk(maxk, dim=1).indices  # (N, maxk)
    hit = top == labels.view(-1, 1)
    out = []
    for k in topk:
        correct = hit[:, : min(k, num_classes)].any(dim=1).float().sum()
        out.append(float(correct) * 100.0 / max(len(labels), 1))
    return out


def parse_topk(topk: int | Sequence[int], key: str) -> tuple[int, ...]:
    """A metric's ``topk``: one positive int or a non-empty list of them."""
    values = (topk,) if isinstance(topk, int) else tuple(topk)
    if not values or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in values):
        raise ConfigError(f"{key} must be positive integers, got {topk!r}")
    return values


@METRICS.register_module()
class Accuracy(BaseMetric):
    """Top-k accuracy from the samples' ``pred_score`` and ``gt_label``.

    Args:
        topk: The k values; the metric names are ``top{k}``.
        prefix: Name prefix (``accuracy`` -> ``accuracy/top1``).
        collect_device: ``cpu`` or ``gpu`` for gathering results across processes.
    """

    default_prefix: Optional[str] = "accuracy"

    def __init__(
        self,
        topk: Sequence[int] = (1, 5),
        prefix: Optional[str] = None,
        collect_device: str = "cpu",
    ) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.topk = parse_topk(topk, f"{type(self).__name__}.topk")

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for sample in data_samples:
            if "pred_score" not in sample or "gt_label" not in sample:
                raise ValueError(f"{type(self).__name__} needs `pred_score` and `gt_label` in each data sample")
            self.results.append(
                {
                    "pred_score": sample["pred_score"].detach().float().cpu().reshape(-1),
                    "gt_label": int(sample["gt_label"].reshape(-1)[0]),
                }
            )

    @staticmethod
    def stacked(results: list) -> tuple:
        """The results' scores (N, K) and labels (N,)."""
        scores = torch.stack([r["pred_score"] for r in results])
        return scores, torch.tensor([r["gt_label"] for r in results], dtype=torch.long)

    def compute_metrics(self, results: list) -> dict:
        scores, labels = self.stacked(results)
        return {f"top{k}": v for k, v in zip(self.topk, topk_accuracy(scores, labels, self.topk))}
