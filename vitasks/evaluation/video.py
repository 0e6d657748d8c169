"""Video recognition metric and prediction dumper.

:class:`VideoAccuracy` reports mmaction2's ``acc/top1``, ``acc/top5`` and ``acc/mean1`` (mean
class accuracy), in percent, from each video's ``pred_score`` (already averaged over its views
by the recognizer) and ``gt_label``. :class:`VideoPredictionDumper` is the classification
dumper (JSON lines ``{"file", "pred", "scores"}``) under a video name: the file is the video's
path relative to the data root, as in the list file.
"""

from typing import Dict, List, Optional, Sequence

import torch
from mmengine.evaluator import BaseMetric

from vitasks.evaluation.accuracy import parse_topk, topk_accuracy
from vitasks.evaluation.dump import ClsPredictionDumper
from vitasks.registry import METRICS

__all__ = ["VideoAccuracy", "VideoPredictionDumper", "mean_class_accuracy"]


def mean_class_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over the classes present in ``labels`` of the percent of their videos whose top
    score is the label (classes without videos are left out, as mmaction2 does).

    The top class is taken as top-1 accuracy takes it (``topk``), so that tied scores (an
    untrained model) count the same way in both."""
    pred = scores.topk(1, dim=1).indices[:, 0]
    classes = labels.unique()
    recalls = [(pred[labels == c] == c).double().mean() for c in classes]
    return float(torch.stack(recalls).mean()) * 100.0


@METRICS.register_module()
class VideoAccuracy(BaseMetric):
    """Top-k and mean class accuracy (percent) of video predictions.

    Args:
        topk: The k values, reported as ``top{k}`` (k above the number of classes counts every
            video).
        prefix: Name prefix (``acc`` -> ``acc/top1``, ``acc/top5``, ``acc/mean1``).
        collect_device: ``cpu`` or ``gpu`` for gathering results across processes.
    """

    default_prefix: Optional[str] = "acc"

    def __init__(
        self, topk: Sequence[int] = (1, 5), prefix: Optional[str] = None, collect_device: str = "cpu"
    ) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.topk = parse_topk(topk, "VideoAccuracy.topk")

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for sample in data_samples:
            if "pred_score" not in sample or "gt_label" not in sample:
                raise ValueError("VideoAccuracy needs `pred_score` and `gt_label` in each data sample")
            self.results.append({
                "pred_score": sample["pred_score"].detach().float().cpu().reshape(-1),
                "gt_label": int(sample["gt_label"].reshape(-1)[0]),
            })

    def compute_metrics(self, results: List[dict]) -> Dict[str, float]:
        scores = torch.stack([r["pred_score"] for r in results])
        labels = torch.tensor([r["gt_label"] for r in results], dtype=torch.long)
        if int(labels.max()) >= scores.shape[1]:
            raise ValueError(
                f"VideoAccuracy: a label ({int(labels.max())}) is outside the {scores.shape[1]} "
                "predicted classes; check num_classes"
            )
        metrics = {f"top{k}": v for k, v in zip(self.topk, topk_accuracy(scores, labels, self.topk))}
        metrics["mean1"] = mean_class_accuracy(scores, labels)
        return metrics


@METRICS.register_module()
class VideoPredictionDumper(ClsPredictionDumper):
    """:class:`~vitasks.evaluation.dump.ClsPredictionDumper` for videos (``test_dump: {type:
    VideoPredictionDumper}``): one JSON line ``{"file", "pred", "scores"}`` per video, ``file``
    being the sample's ``filename`` relative to the dataset's data root."""
