"""Axis-aligned boxes in (x1, y1, x2, y2) pixels: areas, pairwise IoU, clipping and the box coder.

Conventions (detectron2's and torchvision's): a box covers the continuous region
``[x1, x2) x [y1, y2)``, so its width is ``x2 - x1`` (no ``+ 1``). Arithmetic runs in float32 at
least: half-precision boxes under autocast would lose whole pixels at COCO image sizes, and
``exp``/``log`` in the coder overflow in float16.
"""

import math
from typing import Sequence, Tuple

import torch

from ._precision import as_float

# Largest log-ratio the decoder lets through: a box may grow at most 1000/16 = 62.5 times in width
# or height in one step (detectron2's bound; without it exp() overflows on untrained heads).
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas (N,) of boxes (N, 4); inverted boxes give a negative or zero area, never an error."""
    boxes = as_float(boxes)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_intersection(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise intersection areas (N, M) of boxes1 (N, 4) and boxes2 (M, 4)."""
    boxes1, boxes2 = as_float(boxes1), as_float(boxes2)
    top_left = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    width_height = (bottom_right - top_left).clamp_(min=0)
    return width_height[..., 0] * width_height[..., 1]


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise intersection over union (N, M) of boxes1 (N, 4) and boxes2 (M, 4).

    Pairs that do not overlap get 0, also when both boxes are empty (where the plain ratio
    would be 0/0), so matchers can compare IoUs without meeting NaN.
    """
    inter = box_intersection(boxes1, boxes2)
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter
    return torch.where(inter > 0, inter / union, torch.zeros_like(inter))


def clip_boxes(boxes: torch.Tensor, image_shape: Tuple[int, int]) -> torch.Tensor:
    """Boxes (..., 4) clamped to an image of ``image_shape = (height, width)``: x into
    [0, width], y into [0, height]. Returns a new tensor of the same dtype."""
    height, width = image_shape
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def nonempty_boxes(boxes: torch.Tensor, min_size: float = 0.0) -> torch.Tensor:
    """Boolean mask (N,) of the boxes wider and taller than ``min_size`` with finite coordinates
    (what the RPN keeps of its proposals after clipping)."""
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    return (widths > min_size) & (heights > min_size) & torch.isfinite(boxes).all(dim=1)


def box_xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """(x1, y1, x2, y2) -> (x, y, width, height), the layout of COCO annotations and results."""
    return torch.cat((boxes[..., :2], boxes[..., 2:] - boxes[..., :2]), dim=-1)


def box_xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(x, y, width, height) -> (x1, y1, x2, y2)."""
    return torch.cat((boxes[..., :2], boxes[..., :2] + boxes[..., 2:]), dim=-1)


def _centers_and_sizes(boxes: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights, widths, heights


class BoxCoder:
    """Encodes a target box relative to a reference box as deltas (dx, dy, dw, dh) and back
    (R-CNN's parametrisation, detectron2's ``Box2BoxTransform``)::

        dx = wx * (target_cx - cx) / w        dw = ww * log(target_w / w)
        dy = wy * (target_cy - cy) / h        dh = wh * log(target_h / h)

    Args:
        weights: (wx, wy, ww, wh) scaling the deltas so they have roughly unit variance:
            (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the RoI box head (Cascade R-CNN's later
            stages use (20, 20, 10, 10) and (30, 30, 15, 15)).
        scale_clamp: the largest dw, dh accepted by :meth:`decode` (after dividing by the
            weights), default log(1000 / 16).
    """

    def __init__(
        self,
        weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        scale_clamp: float = DEFAULT_SCALE_CLAMP,
    ) -> None:
        if len(weights) != 4:
            raise ValueError(f"BoxCoder weights must be 4 numbers (wx, wy, ww, wh), got {weights}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = float(scale_clamp)

    def __repr__(self) -> str:
        return f"BoxCoder(weights={self.weights}, scale_clamp={self.scale_clamp:.4f})"

    def encode(self, reference_boxes: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
        """Deltas (N, 4) that turn ``reference_boxes`` (N, 4) into ``target_boxes`` (N, 4).

        Reference boxes must have positive width and height (anchors and proposals do)."""
        reference_boxes, target_boxes = as_float(reference_boxes), as_float(target_boxes)
        ref_cx, ref_cy, ref_w, ref_h = _centers_and_sizes(reference_boxes)
        tgt_cx, tgt_cy, tgt_w, tgt_h = _centers_and_sizes(target_boxes)
        wx, wy, ww, wh = self.weights
        deltas = (
            wx * (tgt_cx - ref_cx) / ref_w,
            wy * (tgt_cy - ref_cy) / ref_h,
            ww * torch.log(tgt_w / ref_w),
            wh * torch.log(tgt_h / ref_h),
        )
        return torch.stack(deltas, dim=1)

    def decode(self, deltas: torch.Tensor, reference_boxes: torch.Tensor) -> torch.Tensor:
        """Boxes from ``deltas`` (N, 4k) applied to ``reference_boxes`` (N, 4).

        ``k > 1`` decodes class-specific regressions (k boxes per reference, deltas laid out
        class by class); the result has the shape of ``deltas`` and is float32 (float64 if the
        deltas are).
        """
        deltas = as_float(deltas)
        reference_boxes = reference_boxes.to(deltas.dtype)
        ref_cx, ref_cy, ref_w, ref_h = (t[:, None] for t in _centers_and_sizes(reference_boxes))
        wx, wy, ww, wh = self.weights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        # Clamp before exp(): an untrained head can predict any log-ratio.
        dw = (deltas[:, 2::4] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.scale_clamp)
        center_x = dx * ref_w + ref_cx
        center_y = dy * ref_h + ref_cy
        half_w = 0.5 * torch.exp(dw) * ref_w
        half_h = 0.5 * torch.exp(dh) * ref_h
        boxes = torch.stack(
            (center_x - half_w, center_y - half_h, center_x + half_w, center_y + half_h), dim=-1
        )
        return boxes.reshape(deltas.shape)
