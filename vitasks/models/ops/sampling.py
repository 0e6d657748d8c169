"""Matching predictions (anchors, proposals) to ground-truth boxes, and balanced sampling of the
matched labels: detectron2's ``Matcher`` and ``subsample_labels``, in plain torch.

Matching: each prediction (a column of the IoU matrix) takes the ground truth it overlaps most,
and a label from the interval its best IoU falls in. With thresholds ``(0.3, 0.7)`` and labels
``(0, -1, 1)`` (the RPN's): IoU < 0.3 -> 0 (background), 0.3 <= IoU < 0.7 -> -1 (ignored),
IoU >= 0.7 -> 1 (foreground). With ``allow_low_quality_matches`` every ground truth also makes
foreground the prediction(s) it overlaps most, ties included, even below the top threshold, so
that no object is left without a positive anchor (Faster R-CNN's rule).

Sampling: at most ``num_samples * positive_fraction`` foreground labels are kept, the rest of the
budget is filled with background; both are drawn uniformly without replacement with
``torch.randperm`` on torch's global generator, which the runner re-seeds every iteration (so a
run is reproducible and a resumed run draws what the uninterrupted one drew).
"""

from typing import Sequence, Tuple

import torch


class Matcher:
    """Assigns each prediction to its best ground truth and labels the match by its IoU.

    Args:
        thresholds: increasing IoU thresholds splitting [0, 1] into ``len(thresholds) + 1``
            intervals, each closed below and open above.
        labels: the label of each interval (``len(thresholds) + 1`` values among -1 (ignore),
            0 (background), 1 (foreground)).
        allow_low_quality_matches: also label 1 each ground truth's best prediction(s) (the
            predictions whose IoU with it equals its largest IoU). Differs from detectron2 only
            where a ground truth overlaps no prediction at all: detectron2 would then make every
            prediction of IoU 0 foreground; here such a ground truth adds no match.
    """

    def __init__(
        self,
        thresholds: Sequence[float],
        labels: Sequence[int],
        allow_low_quality_matches: bool = False,
    ) -> None:
        thresholds = [float(t) for t in thresholds]
        if any(b < a for a, b in zip(thresholds, thresholds[1:])):
            raise ValueError(f"Matcher thresholds must be increasing, got {thresholds}")
        if len(labels) != len(thresholds) + 1:
            raise ValueError(
                f"Matcher needs one label per IoU interval: {len(thresholds)} thresholds make "
                f"{len(thresholds) + 1} intervals, got labels {list(labels)}"
            )
        if any(label not in (-1, 0, 1) for label in labels):
            raise ValueError(f"Matcher labels must be -1, 0 or 1, got {list(labels)}")
        self.thresholds = thresholds
        self.labels = [int(label) for label in labels]
        self.allow_low_quality_matches = bool(allow_low_quality_matches)

    def __repr__(self) -> str:
        return (
            f"Matcher(thresholds={self.thresholds}, labels={self.labels}, "
            f"allow_low_quality_matches={self.allow_low_quality_matches})"
        )

    def __call__(self, iou: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Match the predictions of an IoU matrix ``(num_gt, num_predictions)``.

        Returns:
            matched_idxs: (num_predictions,) int64, the ground truth each prediction overlaps most
                (0 when there is no ground truth; meaningful only where the label is 1).
            match_labels: (num_predictions,) int8 labels (-1, 0, 1).
        """
        if iou.dim() != 2:
            raise ValueError(f"Matcher expects an IoU matrix (num_gt, num_predictions), got {tuple(iou.shape)}")
        num_predictions = iou.shape[1]
        if iou.shape[0] == 0:
            # No ground truth: everything gets the label of the lowest interval (background).
            matched_idxs = iou.new_zeros((num_predictions,), dtype=torch.long)
            match_labels = iou.new_full((num_predictions,), self.labels[0], dtype=torch.int8)
            return matched_idxs, match_labels
        best_iou, matched_idxs = iou.max(dim=0)
        match_labels = torch.full_like(matched_idxs, self.labels[-1], dtype=torch.int8)
        bounds = [float("-inf")] + self.thresholds + [float("inf")]
        for label, low, high in zip(self.labels, bounds[:-1], bounds[1:]):
            match_labels[(best_iou >= low) & (best_iou < high)] = label
        if self.allow_low_quality_matches:
            best_per_gt = iou.max(dim=1, keepdim=True).values
            is_best = (iou == best_per_gt) & (best_per_gt > 0)
            match_labels[is_best.any(dim=0)] = 1
        return matched_idxs, match_labels


def subsample_labels(
    labels: torch.Tensor,
    num_samples: int,
    positive_fraction: float,
    background_label: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices of a random, balanced subset of foreground and background labels.

    Args:
        labels: (N,) labels: -1 ignored, ``background_label`` background, anything else
            foreground (the RPN's 0/1 labels with ``background_label=0``; class indices with
            ``background_label=num_classes`` in the RoI heads).
        num_samples: the total number of indices returned at most.
        positive_fraction: at most ``int(num_samples * positive_fraction)`` of them foreground;
            background fills the rest (when there is enough of it).

    Returns:
        (foreground indices, background indices), int64, drawn from torch's global generator.
    """
    positive = ((labels != -1) & (labels != background_label)).nonzero().squeeze(1)
    negative = (labels == background_label).nonzero().squeeze(1)
    num_positive = min(positive.numel(), int(num_samples * positive_fraction))
    num_negative = min(negative.numel(), num_samples - num_positive)
    # randperm on the CPU generator (then moved): the same draws on every device, and the one
    # generator the runner seeds per iteration.
    positive_order = torch.randperm(positive.numel())[:num_positive].to(labels.device)
    negative_order = torch.randperm(negative.numel())[:num_negative].to(labels.device)
    return positive[positive_order], negative[negative_order]
