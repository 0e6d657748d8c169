"""Detection ops in plain torch (CPU and GPU, vectorised, autocast-safe): boxes and the box coder,
NMS, RoIAlign and the multi-level RoI pooler, mask pasting, anchors.

NMS, batched NMS and RoIAlign run torchvision's compiled kernels where torchvision works (every
GPU install), plain torch otherwise, with the same results; :func:`kernels` says which this
process runs (``VITASKS_KERNELS`` or a config's ``kernels:`` forces either, see
:mod:`.selection`).

Plain functions and modules, nothing registered. They import only torch, numpy, (for RLE)
pycocotools and, where it works, torchvision.
"""

from .anchors import AnchorGenerator, cell_anchors
from .boxes import (
    BoxCoder,
    box_area,
    box_intersection,
    box_iou,
    box_xywh_to_xyxy,
    box_xyxy_to_xywh,
    clip_boxes,
    nonempty_boxes,
)
from .masks import masks_to_rle, paste_masks_in_image
from .nms import batched_nms, nms
from .poolers import RoIPooler, assign_boxes_to_levels
from .roi_align import boxes_to_rois, roi_align
from .selection import kernels

__all__ = [
    "AnchorGenerator",
    "BoxCoder",
    "RoIPooler",
    "assign_boxes_to_levels",
    "batched_nms",
    "box_area",
    "box_intersection",
    "box_iou",
    "box_xywh_to_xyxy",
    "box_xyxy_to_xywh",
    "boxes_to_rois",
    "cell_anchors",
    "clip_boxes",
    "kernels",
    "masks_to_rle",
    "nms",
    "nonempty_boxes",
    "paste_masks_in_image",
    "roi_align",
]
