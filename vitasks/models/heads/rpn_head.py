"""Region proposal network (Ren et al. 2015) over a feature pyramid, as detectron2's ``RPN`` with
``StandardRPNHead`` sets it up for ViTDet.

Head: ``num_convs`` 3x3 convs (+ ReLU) shared by every level (ViTDet: two, "conv_dims [-1, -1]"),
then two 1x1 convs: an objectness logit and 4 box deltas per anchor. Anchors come from
:class:`~vitasks.models.ops.AnchorGenerator` (one size per level, 32-512 on p2-p6, ratios 0.5/1/2).

Training targets, per image: anchors are matched to the ground-truth boxes by IoU (< 0.3
background, >= 0.7 foreground, between ignored; every box's best anchors foreground too), then
256 of them are sampled with at most half foreground. Losses (detectron2's normalisation, both
divided by ``batch_size_per_image * num_images``, the number of anchors sampled in a full batch):
binary cross-entropy on the objectness of the sampled anchors, and L1 (detectron2's smooth-L1
with beta 0, what ViTDet trains with; ``smooth_l1_beta > 0`` gives smooth-L1) on the deltas of the
sampled foreground anchors, encoded with box-coder weights (1, 1, 1, 1).

Proposals, per image: on each level the ``pre_nms_topk`` anchors of highest objectness (2000 in
training, 1000 in testing) are decoded, clipped to the image (its size before padding) and those
with a side of ``min_box_size`` or less are dropped; NMS at IoU 0.7 runs per level and the
``post_nms_topk`` (1000) best survivors over all levels are kept, per image. Proposals carry no
gradient.
"""

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vitasks.checks import (
    InRange, ListOf, NonNegativeInt, PositiveInt, checked, config_errors, config_key, feature_maps, int_pair,
)
from vitasks.errors import ConfigError
from vitasks.models.ops import AnchorGenerator, BoxCoder, batched_nms, box_iou, clip_boxes, nonempty_boxes
from vitasks.models.ops.sampling import Matcher, subsample_labels
from vitasks.registry import MODELS

ImageSize = Tuple[int, int]


def box_regression_loss(
    predicted: torch.Tensor, target: torch.Tensor, smooth_l1_beta: float
) -> torch.Tensor:
    """Summed box-delta loss: L1 for ``smooth_l1_beta == 0`` (detectron2's smooth-L1 with beta 0,
    ViTDet's setting), else smooth-L1 with that beta."""
    if smooth_l1_beta <= 0:
        return (predicted - target).abs().sum()
    return F.smooth_l1_loss(predicted, target, beta=smooth_l1_beta, reduction="sum")


@MODELS.register_module()
class RPNHead(nn.Module):
    """Region proposal network: head, anchor targets and losses, proposals.

    Args:
        in_channels: channels of every input level (the neck's ``out_channels``, 256).
        num_convs: 3x3 conv + ReLU layers before the predictors (ViTDet: 2).
        anchor_sizes: per level, its anchor size(s) in pixels (sqrt of the area).
        aspect_ratios: anchor height / width ratios, on every level.
        strides: stride of each input level (p2-p6: 4, 8, 16, 32, 64).
        anchor_offset: anchor centre within a cell as a fraction of the stride (detectron2: 0).
        iou_thresholds: matching thresholds (background below the first, foreground from the
            second, ignored between).
        allow_low_quality_matches: each ground truth's best anchors are foreground too.
        batch_size_per_image: anchors sampled per image for the losses.
        positive_fraction: the largest fraction of foreground among them.
        pre_nms_topk: anchors kept per level before NMS, ``[train, test]``.
        post_nms_topk: proposals kept per image after NMS, ``[train, test]``.
        nms_threshold: IoU of the per-level NMS.
        min_box_size: proposals with a side of this many pixels or less are dropped (after clipping).
        box_coder_weights: (wx, wy, ww, wh) of the anchor-to-box deltas.
        smooth_l1_beta: 0 = L1 loss on the deltas (ViTDet), else smooth-L1 with this beta.
        loss_cls_weight, loss_bbox_weight: multiply ``loss_rpn_cls`` and ``loss_rpn_bbox``.

    Inputs are the pyramid maps ``(N, C, H_l, W_l)``, finest first, one per stride.
    """

    config_key = "model.rpn_head"

    @checked
    def __init__(
        self,
        in_channels: PositiveInt = 256,
        num_convs: NonNegativeInt = 2,
        anchor_sizes: Sequence = (32, 64, 128, 256, 512),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        strides: Sequence[int] = (4, 8, 16, 32, 64),
        anchor_offset: float = 0.0,
        iou_thresholds: ListOf(InRange(), length=2) = (0.3, 0.7),  # [background_below, foreground_from]
        allow_low_quality_matches: bool = True,
        batch_size_per_image: PositiveInt = 256,
        positive_fraction: InRange(0, 1, low_open=True) = 0.5,
        pre_nms_topk: Sequence[int] = (2000, 1000),
        post_nms_topk: Sequence[int] = (1000, 1000),
        nms_threshold: float = 0.7,
        min_box_size: float = 0.0,
        box_coder_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        smooth_l1_beta: float = 0.0,
        loss_cls_weight: float = 1.0,
        loss_bbox_weight: float = 1.0,
    ) -> None:
        super().__init__()
        where = self.config_path = config_key(default=self.config_key)  # for errors at run time too
        with config_errors(where):
            self.anchor_generator = AnchorGenerator(anchor_sizes, aspect_ratios, strides, anchor_offset)
        num_anchors = set(self.anchor_generator.num_anchors_per_location)
        if len(num_anchors) != 1:
            raise ConfigError(
                f"{where}: the head is shared by all levels, so every level needs the same number of "
                f"anchors per position; anchor_sizes {list(anchor_sizes)} give {sorted(num_anchors)}"
            )
        self.num_anchors = num_anchors.pop()
        self.strides = tuple(int(s) for s in strides)
        self.convs = nn.Sequential(*(
            layer
            for _ in range(num_convs)
            for layer in (nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.ReLU(inplace=True))
        ))
        self.objectness = nn.Conv2d(in_channels, self.num_anchors, 1)
        self.deltas = nn.Conv2d(in_channels, self.num_anchors * 4, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # detectron2's RPN initialisation
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)

        self.matcher = Matcher(iou_thresholds, (0, -1, 1), allow_low_quality_matches)
        self.box_coder = BoxCoder(box_coder_weights)
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)
        pair = "a positive integer or [train, test]"  # e.g. pre_nms_topk: [2000, 1000]
        self.pre_nms_topk = int_pair(pre_nms_topk, f"{where}.pre_nms_topk", pair)
        self.post_nms_topk = int_pair(post_nms_topk, f"{where}.post_nms_topk", pair)
        self.nms_threshold = float(nms_threshold)
        self.min_box_size = float(min_box_size)
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.loss_cls_weight = float(loss_cls_weight)
        self.loss_bbox_weight = float(loss_bbox_weight)

    # ------------------------------------------------------------------ head
    def _check_levels(self, features: Sequence[torch.Tensor]) -> None:
        feature_maps(features, len(self.strides), self.config_path, f"levels (strides {list(self.strides)})",
                     source="the neck")

    def forward(self, features: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Raw predictions per level: objectness logits ``(N, A, H, W)`` and deltas
        ``(N, 4A, H, W)`` (anchor-major: channels ``4a..4a+3`` are anchor ``a``'s dx, dy, dw, dh)."""
        self._check_levels(features)
        objectness, deltas = [], []
        for feature in features:
            hidden = self.convs(feature)
            objectness.append(self.objectness(hidden))
            deltas.append(self.deltas(hidden))
        return objectness, deltas

    @staticmethod
    def _flatten(
        objectness: List[torch.Tensor], deltas: List[torch.Tensor]
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Per level ``(N, H*W*A)`` logits and ``(N, H*W*A, 4)`` deltas, in the anchors' order
        (row, column, cell anchor)."""
        flat_objectness = [o.permute(0, 2, 3, 1).flatten(1) for o in objectness]
        flat_deltas = []
        for d in deltas:
            n, _, h, w = d.shape
            flat_deltas.append(d.view(n, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
        return flat_objectness, flat_deltas

    # ------------------------------------------------------------------ targets and losses
    @torch.no_grad()
    def anchor_targets(
        self, anchors: torch.Tensor, gt_boxes: Sequence[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sampled labels ``(N, num_anchors)`` (1 foreground, 0 background, -1 not sampled or
        ignored) and the matched ground-truth boxes ``(N, num_anchors, 4)`` of all anchors
        ``(num_anchors, 4)`` for each image's boxes."""
        labels, matched_boxes = [], []
        for boxes in gt_boxes:
            boxes = boxes.to(anchors)
            matched_idxs, image_labels = self.matcher(box_iou(boxes, anchors))
            image_labels = image_labels.long()
            foreground, background = subsample_labels(
                image_labels, self.batch_size_per_image, self.positive_fraction, background_label=0
            )
            sampled = torch.full_like(image_labels, -1)
            sampled[foreground] = 1
            sampled[background] = 0
            labels.append(sampled)
            matched_boxes.append(boxes[matched_idxs] if len(boxes) else torch.zeros_like(anchors))
        return torch.stack(labels), torch.stack(matched_boxes)

    def losses(
        self,
        anchors: torch.Tensor,
        objectness: List[torch.Tensor],
        deltas: List[torch.Tensor],
        gt_boxes: Sequence[torch.Tensor],
    ) -> Dict[str, torch.Tensor]:
        """``loss_rpn_cls`` and ``loss_rpn_bbox`` from the flattened predictions (see the module
        docstring for the normalisation)."""
        labels, matched_boxes = self.anchor_targets(anchors, gt_boxes)
        all_objectness = torch.cat(objectness, dim=1).float()
        all_deltas = torch.cat(deltas, dim=1).float()
        valid = labels >= 0
        positive = labels == 1
        normaliser = self.batch_size_per_image * len(gt_boxes)
        loss_cls = F.binary_cross_entropy_with_logits(
            all_objectness[valid], labels[valid].to(all_objectness.dtype), reduction="sum"
        )
        positive_image, positive_anchor = positive.nonzero(as_tuple=True)
        target_deltas = self.box_coder.encode(
            anchors[positive_anchor], matched_boxes[positive_image, positive_anchor]
        )
        loss_bbox = box_regression_loss(all_deltas[positive], target_deltas, self.smooth_l1_beta)
        return {
            "loss_rpn_cls": loss_cls * (self.loss_cls_weight / normaliser),
            "loss_rpn_bbox": loss_bbox * (self.loss_bbox_weight / normaliser),
        }

    # ------------------------------------------------------------------ proposals
    @torch.no_grad()
    def proposals(
        self,
        anchors_per_level: List[torch.Tensor],
        objectness: List[torch.Tensor],
        deltas: List[torch.Tensor],
        image_sizes: Sequence[ImageSize],
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per image ``(boxes (R, 4), objectness logits (R,))``, best first (see the module
        docstring); the top-k sizes are the training ones in ``train()`` mode."""
        pre_nms_topk = self.pre_nms_topk[0 if self.training else 1]
        post_nms_topk = self.post_nms_topk[0 if self.training else 1]
        num_images = len(image_sizes)
        level_boxes, level_scores, level_ids = [], [], []
        for level, (anchors, logits, level_deltas) in enumerate(zip(anchors_per_level, objectness, deltas)):
            logits = logits.detach().float()
            k = min(pre_nms_topk, logits.shape[1])
            top_logits, top_index = logits.topk(k, dim=1)  # (N, k), sorted
            top_deltas = level_deltas.detach()[torch.arange(num_images, device=logits.device)[:, None], top_index]
            top_anchors = anchors[top_index]  # (N, k, 4)
            boxes = self.box_coder.decode(top_deltas.reshape(-1, 4), top_anchors.reshape(-1, 4))
            level_boxes.append(boxes.view(num_images, k, 4))
            level_scores.append(top_logits)
            level_ids.append(torch.full((k,), level, dtype=torch.long, device=logits.device))
        boxes, scores, ids = torch.cat(level_boxes, dim=1), torch.cat(level_scores, dim=1), torch.cat(level_ids)
        results = []
        for image_boxes, image_scores, image_size in zip(boxes, scores, image_sizes):
            finite = torch.isfinite(image_boxes).all(dim=1) & torch.isfinite(image_scores)
            image_boxes, image_scores, image_ids = image_boxes[finite], image_scores[finite], ids[finite]
            image_boxes = clip_boxes(image_boxes, image_size)
            keep = nonempty_boxes(image_boxes, self.min_box_size)
            image_boxes, image_scores, image_ids = image_boxes[keep], image_scores[keep], image_ids[keep]
            keep = batched_nms(image_boxes, image_scores, image_ids, self.nms_threshold)[:post_nms_topk]
            results.append((image_boxes[keep], image_scores[keep]))
        return results

    def loss_and_proposals(
        self,
        features: Sequence[torch.Tensor],
        image_sizes: Sequence[ImageSize],
        gt_boxes: Sequence[torch.Tensor],
    ) -> Tuple[Dict[str, torch.Tensor], List[Tuple[torch.Tensor, torch.Tensor]]]:
        """Training step: the RPN losses and the proposals for the RoI head."""
        objectness, deltas = self(features)
        anchors_per_level = self.anchor_generator(features)
        flat_objectness, flat_deltas = self._flatten(objectness, deltas)
        losses = self.losses(torch.cat(anchors_per_level), flat_objectness, flat_deltas, gt_boxes)
        return losses, self.proposals(anchors_per_level, flat_objectness, flat_deltas, image_sizes)

    def proposals_from_outputs(
        self,
        features: Sequence[torch.Tensor],
        objectness: List[torch.Tensor],
        deltas: List[torch.Tensor],
        image_sizes: Sequence[ImageSize],
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Proposals per image ``(boxes, objectness logits)`` from the raw outputs of
        :meth:`forward` on ``features``."""
        flat_objectness, flat_deltas = self._flatten(objectness, deltas)
        return self.proposals(self.anchor_generator(features), flat_objectness, flat_deltas, image_sizes)

    def predict(
        self, features: Sequence[torch.Tensor], image_sizes: Sequence[ImageSize]
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Proposals per image ``(boxes, objectness logits)`` for inference."""
        objectness, deltas = self(features)
        return self.proposals_from_outputs(features, objectness, deltas, image_sizes)
