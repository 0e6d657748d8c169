"""RoI heads of Mask R-CNN and Cascade Mask R-CNN (detectron2's ``StandardROIHeads`` and
``CascadeROIHeads`` with ViTDet's settings).

Training, per image (:meth:`StandardRoIHead.loss`): the ground-truth boxes are appended to the
RPN's proposals, every proposal is matched to the ground truth it overlaps most (IoU >= 0.5:
that object's class, below: background) and 512 are sampled with at most 25 % foreground. The
sampled boxes are pooled from p2-p5 (aligned RoIAlign 7 x 7, adaptive sampling, FPN's level
rule) into the box head. Losses:

- ``loss_cls``: softmax cross-entropy over K + 1 classes, averaged over the sampled RoIs;
- ``loss_bbox``: L1 (detectron2's smooth-L1 with beta 0, ViTDet's setting) between the deltas
  of the foreground RoIs (for their ground-truth class) and the targets encoded with weights
  (10, 10, 5, 5), summed and divided by the number of sampled RoIs (detectron2's normalisation);
- ``loss_mask``: the foreground RoIs are pooled at 14 x 14 into the mask head; binary
  cross-entropy between the logits of their class and the 28 x 28 targets, each the matched
  object's mask cut out along the RoI by the same aligned RoIAlign and thresholded at 0.5
  (detectron2's ``crop_and_resize`` of bitmasks), averaged over all target pixels.

Inference (:meth:`StandardRoIHead.predict`): softmax scores, class-specific boxes decoded from
the proposals and clipped to the image, pairs (box, class) with a score above 0.05 kept, NMS at
IoU 0.5 per class, the 100 best per image; the mask head then runs on those boxes and returns
sigmoid probabilities of the predicted class (28 x 28 per box), to be pasted into the image by
the detector.

Cascade (:class:`CascadeRoIHead`, Cai & Vasconcelos 2018): three box heads with class-agnostic
regression, trained in sequence: stage 0 on the sampled proposals (IoU 0.5), stage k on the
boxes stage k - 1 predicts for them (detached, clipped, empty ones dropped), relabelled at IoU
0.6 and 0.7 without resampling, with coder weights (10, 10, 5, 5), (20, 20, 10, 10),
(30, 30, 15, 15). Each stage's pooled features pass their gradient on scaled by 1/3, so the
backbone gets the mean of the stages' gradients (detectron2). Losses are ``s{k}.loss_cls`` and
``s{k}.loss_bbox`` per stage, and one ``loss_mask`` on the stage-0 foreground RoIs. At test time
the proposals are refined by each stage in turn; the class scores are the mean of the three
stages' softmax scores and the boxes are the last stage's.

Ground truth crowd regions (``ignored_instances``) are not used, as in detectron2, which drops
crowd annotations from training.
"""

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitasks.checks import InRange, PositiveInt, building, checked, config_errors, config_key, feature_maps
from vitasks.errors import ConfigError
from vitasks.models.heads.rpn_head import box_regression_loss
from vitasks.models.ops import BoxCoder, RoIPooler, batched_nms, box_iou, clip_boxes, nonempty_boxes, roi_align
from vitasks.models.ops.sampling import Matcher, subsample_labels
from vitasks.registry import MODELS

ImageSize = Tuple[int, int]


class GroundTruth(NamedTuple):
    """One image's objects in input-image pixels: boxes (G, 4) xyxy, labels (G,) in 0..K-1 and
    optionally masks (G, H, W) (bool or uint8, at the input image's size)."""

    boxes: torch.Tensor
    labels: torch.Tensor
    masks: Optional[torch.Tensor] = None


class RoITargets(NamedTuple):
    """The RoIs of one image with their targets: ``classes`` are 0..K-1 for foreground, K for
    background; ``gt_boxes`` and ``gt_index`` name the matched object (meaningful for
    foreground only)."""

    boxes: torch.Tensor
    classes: torch.Tensor
    gt_boxes: torch.Tensor
    gt_index: torch.Tensor


class Detections(NamedTuple):
    """One image's detections in input-image pixels; ``mask_probs`` (D, M, M) are the mask
    head's probabilities inside each box (None without a mask head)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    mask_probs: Optional[torch.Tensor] = None


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def mask_targets(
    masks: torch.Tensor, boxes: torch.Tensor, gt_index: torch.Tensor, size: int
) -> torch.Tensor:
    """Binary targets (R, size, size), float: mask ``gt_index[r]`` of ``masks`` (G, H, W) cut out
    along ``boxes[r]`` by aligned RoIAlign (adaptive sampling) and thresholded at 0.5.

    One object's mask at a time, so only that one is ever held in float."""
    targets = boxes.new_zeros((boxes.shape[0], size, size))
    for g in torch.unique(gt_index).tolist():
        rows = (gt_index == g).nonzero().squeeze(1)
        mask = masks[g].to(device=boxes.device, dtype=torch.float32)[None, None]
        cut = roi_align(mask, [boxes[rows].float()], size, 1.0, sampling_ratio=0, aligned=True)
        targets[rows] = (cut[:, 0] >= 0.5).to(targets.dtype)
    return targets


def _as_mask_tensor(masks, image_index: int) -> torch.Tensor:
    """Ground-truth masks as a (G, H, W) tensor from a tensor, a numpy array or a compact form
    that rasterises itself with ``to_tensor()`` (``PackDetInputs(mask_format="compact")``'s
    :class:`~vitasks.data.det_transforms.InstanceMasks`: polygons or RLE)."""
    if isinstance(masks, torch.Tensor):
        return masks
    if isinstance(masks, np.ndarray):
        return torch.from_numpy(masks)
    if callable(getattr(masks, "to_tensor", None)):
        return masks.to_tensor()
    raise TypeError(
        f"image {image_index}: gt_instances.masks must be a (N, H, W) tensor or array of bitmaps, or "
        f"masks with a to_tensor() method; got {type(masks).__name__}"
    )


@MODELS.register_module()
class StandardRoIHead(nn.Module):
    """Box (and mask) head of Mask R-CNN over the proposals; see the module docstring.

    Args:
        num_classes: K object classes.
        in_channels: channels of the pyramid maps (256).
        strides: strides of the levels pooled from, finest first (p2-p5: 4, 8, 16, 32); the head
            reads the first ``len(strides)`` maps of the neck's output.
        box_pooled_size, mask_pooled_size: RoIAlign output sides (7, 14).
        sampling_ratio: RoIAlign samples per bin side; 0 adaptive (ViTDet).
        box_head: config of the box head (default ``ConvFCBoxHead``: 4 convs + 1 fc, LN);
            ``num_classes``, ``in_channels`` and ``pooled_size`` are filled in.
        mask_head: config of the mask head (default ``MaskConvUpsampleHead``: 4 convs +
            deconv, LN); ``null`` for a box-only detector (Faster R-CNN).
        box_coder_weights: (wx, wy, ww, wh) of the proposal-to-box deltas.
        iou_threshold: a proposal is foreground from this IoU with an object.
        batch_size_per_image, positive_fraction: the RoI sampling (512, 0.25).
        proposal_append_gt: add the ground-truth boxes to the proposals in training.
        smooth_l1_beta: 0 = L1 box loss (ViTDet), else smooth-L1 with this beta.
        score_threshold, nms_threshold, max_per_image: inference (0.05, 0.5, 100).
        loss_cls_weight, loss_bbox_weight, loss_mask_weight: multiply the losses.
    """

    config_key = "model.roi_head"

    @checked
    def __init__(
        self,
        num_classes: PositiveInt,
        in_channels: int = 256,
        strides: Sequence[int] = (4, 8, 16, 32),
        box_pooled_size: int = 7,
        mask_pooled_size: int = 14,
        sampling_ratio: int = 0,
        box_head: Optional[dict] = None,
        mask_head: Optional[dict] = {},  # noqa: B006  (read only; None disables masks)
        box_coder_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        iou_threshold: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: InRange(0, 1, low_open=True) = 0.25,
        proposal_append_gt: bool = True,
        smooth_l1_beta: float = 0.0,
        score_threshold: float = 0.05,
        nms_threshold: float = 0.5,
        max_per_image: int = 100,
        loss_cls_weight: float = 1.0,
        loss_bbox_weight: float = 1.0,
        loss_mask_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.config_path = config_key(default=self.config_key)  # for errors at run time too
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.strides = tuple(int(s) for s in strides)
        with config_errors(self.config_path):
            self.box_pooler = RoIPooler(box_pooled_size, self.strides, sampling_ratio, aligned=True)
            self.mask_pooler = RoIPooler(mask_pooled_size, self.strides, sampling_ratio, aligned=True)
        self.box_pooled_size = box_pooled_size
        self.box_head_cfg = dict(box_head or {})
        self.build_box_heads()
        if mask_head is None:
            self.mask_head = None
        else:
            cfg = {"type": "MaskConvUpsampleHead", **mask_head, "num_classes": num_classes, "in_channels": in_channels}
            with building("mask_head", root=self.config_key):
                self.mask_head = MODELS.build(cfg)
        self.box_coder = BoxCoder(box_coder_weights)
        self.matcher = Matcher([iou_threshold], (0, 1), allow_low_quality_matches=False)
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)
        self.proposal_append_gt = bool(proposal_append_gt)
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.max_per_image = int(max_per_image)
        self.loss_cls_weight = float(loss_cls_weight)
        self.loss_bbox_weight = float(loss_bbox_weight)
        self.loss_mask_weight = float(loss_mask_weight)

    @property
    def with_mask(self) -> bool:
        return self.mask_head is not None

    def _build_box_head(self, **overrides) -> nn.Module:
        cfg = {"type": "ConvFCBoxHead", **self.box_head_cfg, **overrides}
        cfg.update(num_classes=self.num_classes, in_channels=self.in_channels, pooled_size=self.box_pooled_size)
        with building("box_head", root=self.config_key):
            return MODELS.build(cfg)

    def build_box_heads(self) -> None:
        self.box_head = self._build_box_head()

    def _levels(self, features: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        feature_maps(features, len(self.strides), self.config_path, f"levels (strides {list(self.strides)})",
                     at_least=True, source="the neck")
        return features[: len(self.strides)]

    # ------------------------------------------------------------------ targets
    @torch.no_grad()
    def label_boxes(self, boxes: torch.Tensor, gt: GroundTruth, matcher: Matcher) -> RoITargets:
        """Targets of every box of one image under ``matcher`` (no sampling)."""
        gt_boxes = gt.boxes.to(boxes)
        matched_idxs, match_labels = matcher(box_iou(gt_boxes, boxes))
        if len(gt_boxes):
            classes = gt.labels.to(boxes.device).long()[matched_idxs]
            classes[match_labels == 0] = self.num_classes
            classes[match_labels == -1] = -1
            matched_boxes = gt_boxes[matched_idxs]
        else:
            classes = torch.full_like(matched_idxs, self.num_classes)
            matched_boxes = torch.zeros_like(boxes)
        return RoITargets(boxes, classes, matched_boxes, matched_idxs)

    @torch.no_grad()
    def sample_proposals(self, proposals: Sequence[torch.Tensor], gts: Sequence[GroundTruth]) -> List[RoITargets]:
        """Per image: proposals (+ ground-truth boxes) labelled and subsampled."""
        sampled = []
        for boxes, gt in zip(proposals, gts):
            boxes = boxes.detach().float()
            if self.proposal_append_gt:
                boxes = torch.cat((boxes, gt.boxes.to(boxes)))
            targets = self.label_boxes(boxes, gt, self.matcher)
            foreground, background = subsample_labels(
                targets.classes, self.batch_size_per_image, self.positive_fraction, self.num_classes
            )
            keep = torch.cat((foreground, background))
            sampled.append(RoITargets(*(t[keep] for t in targets)))
        return sampled

    # ------------------------------------------------------------------ losses
    def box_losses(
        self,
        cls_logits: torch.Tensor,
        deltas: torch.Tensor,
        targets: Sequence[RoITargets],
        box_coder: BoxCoder,
    ) -> Dict[str, torch.Tensor]:
        """``loss_cls`` and ``loss_bbox`` of one box head's predictions for ``targets``."""
        classes = torch.cat([t.classes for t in targets])
        boxes = torch.cat([t.boxes for t in targets])
        gt_boxes = torch.cat([t.gt_boxes for t in targets])
        cls_logits, deltas = cls_logits.float(), deltas.float()
        if classes.numel() == 0:
            zero = cls_logits.sum() * 0 + deltas.sum() * 0
            return {"loss_cls": zero, "loss_bbox": zero}
        loss_cls = F.cross_entropy(cls_logits, classes, ignore_index=-1)
        foreground = ((classes >= 0) & (classes < self.num_classes)).nonzero().squeeze(1)
        if deltas.shape[1] == 4:  # class-agnostic
            fg_deltas = deltas[foreground]
        else:
            fg_deltas = deltas.view(len(deltas), -1, 4)[foreground, classes[foreground]]
        target_deltas = box_coder.encode(boxes[foreground], gt_boxes[foreground])
        loss_bbox = box_regression_loss(fg_deltas, target_deltas, self.smooth_l1_beta) / max(classes.numel(), 1)
        return {"loss_cls": loss_cls * self.loss_cls_weight, "loss_bbox": loss_bbox * self.loss_bbox_weight}

    def mask_loss(
        self, features: Sequence[torch.Tensor], targets: Sequence[RoITargets], gts: Sequence[GroundTruth]
    ) -> torch.Tensor:
        """``loss_mask`` over the foreground RoIs of ``targets``."""
        fg_boxes, fg_classes, fg_targets = [], [], []
        for image_index, (t, gt) in enumerate(zip(targets, gts)):
            foreground = ((t.classes >= 0) & (t.classes < self.num_classes)).nonzero().squeeze(1)
            fg_boxes.append(t.boxes[foreground])
            fg_classes.append(t.classes[foreground])
            if gt.masks is None:
                raise ValueError(
                    f"image {image_index}: the mask head needs gt_instances.masks (load the masks with the "
                    f"annotations, or set {self.config_path}.mask_head: null for a box-only detector)"
                )
            if len(foreground):
                size = 2 * self.mask_pooler.output_size
                masks = _as_mask_tensor(gt.masks, image_index)
                fg_targets.append(mask_targets(masks, t.boxes[foreground], t.gt_index[foreground], size))
        mask_logits = self.mask_head(self.mask_pooler(self._levels(features), fg_boxes)).float()
        if mask_logits.shape[0] == 0:
            return mask_logits.sum() * 0
        classes = torch.cat(fg_classes)
        if mask_logits.shape[1] == 1:  # class-agnostic
            mask_logits = mask_logits[:, 0]
        else:
            mask_logits = mask_logits[torch.arange(len(classes), device=classes.device), classes]
        loss = F.binary_cross_entropy_with_logits(mask_logits, torch.cat(fg_targets))
        return loss * self.loss_mask_weight

    def loss(
        self,
        features: Sequence[torch.Tensor],
        proposals: Sequence[torch.Tensor],
        gts: Sequence[GroundTruth],
        image_sizes: Optional[Sequence[ImageSize]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Training losses for the proposals (per image (R_i, 4)) and the ground truth: the box
        losses (:meth:`box_stage_losses`) and ``loss_mask`` on the sampled proposals."""
        features = self._levels(features)
        targets = self.sample_proposals(proposals, gts)
        losses = self.box_stage_losses(features, targets, gts, image_sizes)
        if self.with_mask:
            losses["loss_mask"] = self.mask_loss(features, targets, gts)
        return losses

    def box_stage_losses(self, features: List[torch.Tensor], targets: List[RoITargets], gts: Sequence[GroundTruth],
                         image_sizes: Optional[Sequence[ImageSize]]) -> Dict[str, torch.Tensor]:
        """``loss_cls`` and ``loss_bbox`` of the sampled proposals (``gts`` and ``image_sizes`` are
        unused here; the cascade's later stages need them)."""
        cls_logits, deltas = self.box_head(self.box_pooler(features, [t.boxes for t in targets]))
        return self.box_losses(cls_logits, deltas, targets, self.box_coder)

    # ------------------------------------------------------------------ inference
    def forward(
        self,
        features: Sequence[torch.Tensor],
        proposals: Sequence[torch.Tensor],
        image_sizes: Optional[Sequence[ImageSize]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Raw box-head outputs for the proposals of all images (concatenated in image order):
        ``cls_logits`` (R, K + 1) and ``bbox_deltas`` (R, 4K) (``image_sizes`` is unused here)."""
        cls_logits, deltas = self.box_head(self.box_pooler(self._levels(features), list(proposals)))
        return {"cls_logits": cls_logits, "bbox_deltas": deltas}

    def select_detections(self, scores: torch.Tensor, boxes: torch.Tensor, image_size: ImageSize) -> Detections:
        """Detections of one image from class scores (R, K + 1) and boxes (R, K, 4) or (R, 1, 4):
        clip, threshold, per-class NMS, top ``max_per_image``."""
        finite = torch.isfinite(boxes).flatten(1).all(dim=1) & torch.isfinite(scores).all(dim=1)
        scores, boxes = scores[finite, :-1], clip_boxes(boxes[finite], image_size)
        roi, label = (scores > self.score_threshold).nonzero(as_tuple=True)
        boxes = boxes[roi, label if boxes.shape[1] > 1 else 0]
        scores = scores[roi, label]
        keep = batched_nms(boxes, scores, label, self.nms_threshold)[: self.max_per_image]
        return Detections(boxes[keep], scores[keep], label[keep])

    def mask_probabilities(self, features: Sequence[torch.Tensor], detections: List[Detections]) -> List[Detections]:
        """The detections with the mask head's probabilities of their class (D, 2P, 2P)."""
        logits = self.mask_head(self.mask_pooler(self._levels(features), [d.boxes for d in detections])).float()
        labels = torch.cat([d.labels for d in detections])
        if logits.shape[1] == 1:
            logits = logits[:, 0]
        else:
            logits = logits[torch.arange(len(labels), device=logits.device), labels]
        probs = logits.sigmoid().split([len(d.boxes) for d in detections])
        return [d._replace(mask_probs=p) for d, p in zip(detections, probs)]

    @torch.no_grad()
    def box_predictions(
        self, features: Sequence[torch.Tensor], proposals: Sequence[torch.Tensor],
        image_sizes: Optional[Sequence[ImageSize]] = None,
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Per image: class scores (R, K + 1) and boxes (R, K, 4) (or (R, 1, 4))."""
        outputs = self(features, proposals)
        scores = outputs["cls_logits"].float().softmax(dim=1)
        boxes = self.box_coder.decode(outputs["bbox_deltas"], torch.cat(list(proposals)))
        boxes = boxes.view(len(boxes), -1, 4)
        counts = [len(p) for p in proposals]
        return list(scores.split(counts)), list(boxes.split(counts))

    @torch.no_grad()
    def predict(
        self,
        features: Sequence[torch.Tensor],
        proposals: Sequence[torch.Tensor],
        image_sizes: Sequence[ImageSize],
    ) -> List[Detections]:
        """Detections per image in input-image pixels (see the module docstring)."""
        scores, boxes = self.box_predictions(features, [p.float() for p in proposals], image_sizes)
        detections = [self.select_detections(s, b, size) for s, b, size in zip(scores, boxes, image_sizes)]
        if self.with_mask:
            detections = self.mask_probabilities(features, detections)
        return detections


@MODELS.register_module()
class CascadeRoIHead(StandardRoIHead):
    """Cascade Mask R-CNN's RoI head: one class-agnostic box head per stage; see the module
    docstring.

    Args:
        stage_iou_thresholds: foreground IoU of each stage (0.5, 0.6, 0.7).
        stage_box_coder_weights: coder weights of each stage.
        stage_loss_weights: multiply each stage's box losses (detectron2: 1 each).
        Other arguments as :class:`StandardRoIHead` (``box_head`` is the config of every stage's
        head; ``iou_threshold`` and ``box_coder_weights`` are replaced by the stage lists).
    """

    def __init__(
        self,
        num_classes: int,
        stage_iou_thresholds: Sequence[float] = (0.5, 0.6, 0.7),
        stage_box_coder_weights: Sequence[Sequence[float]] = (
            (10.0, 10.0, 5.0, 5.0),
            (20.0, 20.0, 10.0, 10.0),
            (30.0, 30.0, 15.0, 15.0),
        ),
        stage_loss_weights: Optional[Sequence[float]] = None,
        **kwargs,
    ) -> None:
        where = config_key(default=self.config_key)
        # What the cascade sets itself: per-stage matching and box coding, class-agnostic box heads.
        fixed = [key for key in ("iou_threshold", "box_coder_weights") if key in kwargs]
        fixed += ["box_head.class_agnostic"] if (kwargs.get("box_head") or {}).get("class_agnostic") is False else []
        if fixed:
            raise ConfigError(f"{where}.{fixed[0]}: CascadeRoIHead sets it itself: it takes per-stage lists "
                              "(stage_iou_thresholds, stage_box_coder_weights) and its box heads are class-agnostic")
        self.num_stages = len(stage_iou_thresholds)
        weights = [1.0] * self.num_stages if stage_loss_weights is None else [float(w) for w in stage_loss_weights]
        if self.num_stages < 1 or not len(stage_box_coder_weights) == len(weights) == self.num_stages:
            raise ConfigError(
                f"{where}: stage_iou_thresholds, stage_box_coder_weights and stage_loss_weights (when given) need "
                f"one entry per stage, got {len(stage_iou_thresholds)}, {len(stage_box_coder_weights)} and "
                f"{len(weights)}"
            )
        super().__init__(num_classes, iou_threshold=stage_iou_thresholds[0], **kwargs)
        self.stage_loss_weights = weights
        self.box_coders = [BoxCoder(w) for w in stage_box_coder_weights]
        self.matchers = [Matcher([t], (0, 1), allow_low_quality_matches=False) for t in stage_iou_thresholds]
        self.matcher = self.matchers[0]

    def build_box_heads(self) -> None:
        self.box_head = None
        self.box_heads = nn.ModuleList(self._build_box_head(class_agnostic=True) for _ in range(self.num_stages))

    def _stage(self, stage: int, features: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor]):
        pooled = self.box_pooler(features, list(boxes))
        if self.training:
            pooled = _ScaleGradient.apply(pooled, 1.0 / self.num_stages)
        return self.box_heads[stage](pooled)

    def _refine(
        self, stage: int, deltas: torch.Tensor, boxes: Sequence[torch.Tensor], image_sizes: Sequence[ImageSize]
    ) -> List[torch.Tensor]:
        """Boxes predicted by ``stage`` for its input boxes, per image, clipped (and, in
        training, without the empty ones): the next stage's input."""
        decoded = self.box_coders[stage].decode(deltas.detach(), torch.cat(list(boxes)))
        refined = []
        for image_boxes, size in zip(decoded.split([len(b) for b in boxes]), image_sizes):
            image_boxes = clip_boxes(image_boxes, size)
            if self.training:
                image_boxes = image_boxes[nonempty_boxes(image_boxes)]
            refined.append(image_boxes)
        return refined

    def box_stage_losses(self, features, targets, gts, image_sizes):
        """Per-stage box losses (``s{k}.loss_cls``, ``s{k}.loss_bbox``): stage k > 0 on the boxes
        stage k - 1 refined, labelled again with its own matcher (``loss_mask`` stays on the
        first stage's sampled proposals)."""
        if image_sizes is None:
            raise ValueError("CascadeRoIHead.loss needs the image sizes to clip the refined boxes")
        losses = {}
        for stage in range(self.num_stages):
            if stage > 0:
                boxes = self._refine(stage - 1, deltas, [t.boxes for t in targets], image_sizes)
                targets = [self.label_boxes(b, gt, self.matchers[stage]) for b, gt in zip(boxes, gts)]
            cls_logits, deltas = self._stage(stage, features, [t.boxes for t in targets])
            stage_losses = self.box_losses(cls_logits, deltas, targets, self.box_coders[stage])
            weight = self.stage_loss_weights[stage]
            losses.update({f"s{stage}.{name}": value * weight for name, value in stage_losses.items()})
        return losses

    def forward(
        self,
        features: Sequence[torch.Tensor],
        proposals: Sequence[torch.Tensor],
        image_sizes: Optional[Sequence[ImageSize]] = None,
    ) -> Dict[str, List[torch.Tensor]]:
        """Raw outputs of every stage for the proposals, each stage on the boxes the previous one
        refined: ``cls_logits`` [(R, K + 1)] * stages, ``bbox_deltas`` [(R, 4)] * stages and the
        stages' input ``boxes`` [(R, 4)] * stages (all images concatenated). Without
        ``image_sizes`` the refined boxes are not clipped."""
        features = self._levels(features)
        boxes = list(proposals)
        sizes = image_sizes or [(float("inf"), float("inf"))] * len(boxes)
        outputs = {"cls_logits": [], "bbox_deltas": [], "boxes": []}
        for stage in range(self.num_stages):
            if stage > 0:
                boxes = self._refine(stage - 1, deltas, boxes, sizes)
            cls_logits, deltas = self._stage(stage, features, boxes)
            outputs["cls_logits"].append(cls_logits)
            outputs["bbox_deltas"].append(deltas)
            outputs["boxes"].append(torch.cat(boxes))
        return outputs

    @torch.no_grad()
    def box_predictions(self, features, proposals, image_sizes=None):
        """Per image: class scores (R, K + 1), the mean of the stages', and the last stage's
        boxes (R, 1, 4) (see :meth:`StandardRoIHead.box_predictions`)."""
        outputs = self(features, proposals, image_sizes)
        scores = torch.stack([logits.float().softmax(dim=1) for logits in outputs["cls_logits"]]).mean(dim=0)
        boxes = self.box_coders[-1].decode(outputs["bbox_deltas"][-1], outputs["boxes"][-1])[:, None, :]
        counts = [len(p) for p in proposals]
        return list(scores.split(counts)), list(boxes.split(counts))
