"""The video classification head: dropout + linear on the pooled clip feature, and multi-view
testing (several clips and crops of one video averaged into one prediction, as mmaction2)."""

from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitasks.checks import InRange, OneOf, checked
from vitasks.registry import MODELS
from vitasks.structures import DataSample

from .cls_heads import Feats, LinearClsHead, _last

#: How the views of a video are combined: 'prob' averages their softmax probabilities, 'score'
#: their logits (mmaction2's ``average_clips``).
AVERAGE_CLIPS = ("prob", "score")


def views_per_sample(data_samples: Sequence[Optional[DataSample]], num_rows: int) -> List[int]:
    """How many consecutive rows of a (N * V, ...) batch belong to each of the N samples.

    Each sample's metainfo ``num_views`` (set by the video data preprocessor when it stacks the
    views) says it; samples without it share the rows left equally.
    """
    counts = []
    for sample in data_samples:
        value = None if sample is None else sample.metainfo.get("num_views", sample.get("num_views"))
        counts.append(None if value is None else int(value))
    unknown = [i for i, c in enumerate(counts) if c is None]
    if unknown:
        left = num_rows - sum(c for c in counts if c is not None)
        if left < 0 or left % len(unknown):
            raise ValueError(
                f"{num_rows} clips for {len(data_samples)} samples, {len(unknown)} of them without num_views: "
                "cannot split the views evenly; set num_views in each sample's metainfo"
            )
        for i in unknown:
            counts[i] = left // len(unknown)
    if sum(counts) != num_rows or min(counts, default=1) < 1:
        raise ValueError(
            f"the samples' num_views {counts} add up to {sum(counts)}, but the batch has {num_rows} clips"
        )
    return counts


@MODELS.register_module()
class VideoClsHead(LinearClsHead):
    """Dropout then one linear layer ``fc`` (zero-initialised) on the pooled clip feature.

    The model input holds V views (clips x crops) of each video stacked along the batch, so the
    head sees (N * V, C). Training treats every view as an example of its video's label.
    ``predict`` combines a video's views into one ``pred_score`` (K,): the mean of their softmax
    probabilities (``average_clips="prob"``) or of their logits (``"score"``), and
    ``pred_label`` = its argmax.

    Args:
        dropout_ratio: dropout before ``fc`` (training only).
        average_clips: ``"prob"`` or ``"score"``.
        num_classes, in_channels, loss (label smoothing goes here), init_cfg: as :class:`LinearClsHead`.
    """

    @checked
    def __init__(self, num_classes: int, in_channels: int, dropout_ratio: InRange(0, 1, high_open=True) = 0.0,
                 average_clips: OneOf(*AVERAGE_CLIPS) = "prob", **kwargs) -> None:
        super().__init__(num_classes, in_channels, **kwargs)
        self.average_clips = average_clips
        self.dropout = nn.Dropout(dropout_ratio) if dropout_ratio > 0 else nn.Identity()

    def forward(self, feats: Feats) -> torch.Tensor:
        return self.fc(self.dropout(_last(feats)))

    def loss(self, feats: Feats, data_samples: Sequence[DataSample]) -> dict:
        """``{"loss": ...}``; each view is trained on its video's label (or soft target)."""
        logits = self(feats)
        targets = self._targets(data_samples, logits.device)
        counts = views_per_sample(data_samples, logits.shape[0])
        if any(c != 1 for c in counts):
            targets = targets.repeat_interleave(torch.tensor(counts, device=targets.device), dim=0)
        return {"loss": self.loss_module(logits, targets)}

    def average_views(self, logits: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """(N * V, K) view logits -> (N, K) video scores by ``average_clips``."""
        scores = logits.float()
        if self.average_clips == "prob":
            scores = F.softmax(scores, dim=1)
        return torch.stack([chunk.mean(dim=0) for chunk in scores.split(list(counts), dim=0)])

    def predict(
        self, feats: Feats, data_samples: Optional[List[Optional[DataSample]]] = None
    ) -> List[DataSample]:
        """Each sample with ``pred_score`` (K,) averaged over its views and ``pred_label`` (1,)."""
        logits = self(feats).detach()
        samples = [None] * logits.shape[0] if data_samples is None else data_samples
        return self._with_predictions(samples, self.average_views(logits, views_per_sample(samples, logits.shape[0])))
