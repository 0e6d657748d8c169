"""Video recognition metric and prediction dumper.

:class:`VideoAccuracy` reports mmaction2's ``acc/top1``, ``acc/top5`` and ``acc/mean1`` (mean
class accuracy), in percent, from each video's ``pred_score`` (already averaged over its views
by the recognizer) and ``gt_label``. :class:`VideoPredictionDumper` is the classification
dumper (JSON lines ``{"file", "pred", "scores"}``) under a video name: the file is the video's
path relative to the data root, as in the list file.
"""

from typing import Dict, List, Optional

import torch

from vitasks.evaluation.accuracy import Accuracy
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
class VideoAccuracy(Accuracy):
    """Top-k and mean class accuracy (percent) of video predictions.

    Args:
        topk: The k values, reported as ``top{k}`` (k above the number of classes counts every
            video).
        prefix: Name prefix (``acc`` -> ``acc/top1``, ``acc/top5``, ``acc/mean1``).
        collect_device: ``cpu`` or ``gpu`` for gathering results across processes.
    """

    default_prefix: Optional[str] = "acc"

    def compute_metrics(self, results: List[dict]) -> Dict[str, float]:
        scores, labels = self.stacked(results)
        if int(labels.max()) >= scores.shape[1]:
            raise ValueError(
                f"VideoAccuracy: a label ({int(labels.max())}) is outside the {scores.shape[1]} "
                "predicted classes; check num_classes"
            )
        metrics = super().compute_metrics(results)
        metrics["mean1"] = mean_class_accuracy(scores, labels)
        return metrics


@METRICS.register_module()
class VideoPredictionDumper(ClsPredictionDumper):
    """:class:`~vitasks.evaluation.dump.ClsPredictionDumper` for videos (``test_dump: {type:
    VideoPredictionDumper}``): one JSON line ``{"file", "pred", "scores"}`` per video, ``file``
    being the sample's ``filename`` relative to the dataset's data root."""
