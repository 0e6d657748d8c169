"""Greedy non-maximum suppression in plain torch, equal to ``torchvision.ops.nms`` and
``batched_nms``.

The definition (torchvision's): visit the boxes by descending score (a stable sort, so equal
scores keep their input order); keep a box unless a box kept before it overlaps it with IoU
strictly greater than the threshold (in batched NMS: a kept box of the same class). IoU is
``inter / (area_i + area_j - inter)`` exactly as torchvision computes it, so a pair of empty boxes
(0 / 0 = NaN) never suppresses anything.

How it is vectorised: the sorted boxes are taken in blocks. A block is first checked against all
boxes kept so far (one IoU matrix, in chunks), which removes most of it at once; what survives is
resolved by a greedy pass over the block's own boolean overlap matrix, whose Python loop only
touches kept boxes. Memory stays at a few block-sized matrices whatever the number of boxes.
"""

from typing import Optional

import numpy as np
import torch

from ._precision import as_float

# Boxes per block of the greedy pass; the block's overlap matrix is BLOCK_SIZE^2 booleans.
BLOCK_SIZE = 1024
# Rows of an IoU matrix computed at once: 256 x BLOCK_SIZE floats (1 MB) stay in the CPU's cache
# through the dozen passes of the IoU arithmetic, which is twice as fast as larger tiles.
ROW_CHUNK = 256


def _overlaps(boxes1: torch.Tensor, boxes2: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """(N, M) booleans: IoU(boxes1[i], boxes2[j]) > iou_threshold, computed with torchvision's
    operation order so that borderline pairs are decided the same way."""
    # One contiguous column per coordinate: broadcasting (N, 1) against (1, M) is several times
    # faster than broadcasting (N, 1, 2) against (1, M, 2).
    x1a, y1a, x2a, y2a = (c[:, None] for c in boxes1.t().contiguous())
    x1b, y1b, x2b, y2b = (c[None, :] for c in boxes2.t().contiguous())
    # Two (N, M) buffers reused through out= and in-place ops: allocation, not arithmetic, is
    # what costs most here.
    inter = torch.minimum(x2a, x2b)
    scratch = torch.maximum(x1a, x1b)
    inter.sub_(scratch).clamp_(min=0)
    torch.minimum(y2a, y2b, out=scratch)
    scratch.sub_(torch.maximum(y1a, y1b)).clamp_(min=0)
    inter.mul_(scratch)
    torch.add((x2a - x1a) * (y2a - y1a), (x2b - x1b) * (y2b - y1b), out=scratch)
    return inter.div_(scratch.sub_(inter)) > iou_threshold


def _greedy_keep(
    boxes: torch.Tensor, labels: Optional[torch.Tensor], iou_threshold: float
) -> torch.Tensor:
    """Keep mask (N,) of the greedy pass over ``boxes`` already sorted by descending score;
    with ``labels``, only boxes of the same label suppress each other."""
    num_boxes = boxes.shape[0]
    keep = torch.zeros(num_boxes, dtype=torch.bool)
    kept_boxes = boxes.new_zeros((0, 4))
    kept_labels = labels.new_zeros((0,)) if labels is not None else None
    for start in range(0, num_boxes, BLOCK_SIZE):
        block = boxes[start : start + BLOCK_SIZE]
        block_labels = labels[start : start + BLOCK_SIZE] if labels is not None else None
        alive = torch.ones(block.shape[0], dtype=torch.bool, device=boxes.device)
        # 1. Boxes kept in earlier blocks remove what they overlap in this one.
        for chunk_start in range(0, kept_boxes.shape[0], ROW_CHUNK):
            chunk = slice(chunk_start, chunk_start + ROW_CHUNK)
            suppressed = _overlaps(kept_boxes[chunk], block, iou_threshold)
            if labels is not None:
                suppressed &= kept_labels[chunk, None] == block_labels[None, :]
            alive &= ~suppressed.any(dim=0)
        # 2. Greedy pass inside the block, over the survivors only.
        survivors = alive.nonzero().squeeze(1)
        candidates = block[survivors]
        candidate_labels = block_labels[survivors] if labels is not None else None
        suppresses = torch.cat([
            _overlaps(candidates[row : row + ROW_CHUNK], candidates, iou_threshold)
            for row in range(0, len(candidates), ROW_CHUNK)
        ]) if len(candidates) else candidates.new_zeros((0, 0), dtype=torch.bool)
        if labels is not None:
            suppresses &= candidate_labels[:, None] == candidate_labels[None, :]
        # Only a higher-scored box suppresses a lower one: keep the strict upper triangle.
        allowed = (~suppresses.triu_(diagonal=1)).cpu().numpy()
        block_keep = np.ones(len(survivors), dtype=bool)
        for i in range(len(survivors)):
            if block_keep[i]:
                np.logical_and(block_keep, allowed[i], out=block_keep)
        kept = survivors[torch.from_numpy(block_keep).to(boxes.device)]
        keep[start + kept.cpu()] = True
        kept_boxes = torch.cat((kept_boxes, block[kept]))
        if labels is not None:
            kept_labels = torch.cat((kept_labels, block_labels[kept]))
    return keep.to(boxes.device)


def _check_inputs(boxes: torch.Tensor, scores: torch.Tensor) -> None:
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"NMS expects boxes of shape (N, 4), got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(
            f"NMS expects one score per box: boxes {tuple(boxes.shape)}, "
            f"scores {tuple(scores.shape)}"
        )


def _nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: Optional[torch.Tensor],
    iou_threshold: float,
) -> torch.Tensor:
    _check_inputs(boxes, scores)
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    sorted_labels = labels[order] if labels is not None else None
    keep = _greedy_keep(as_float(boxes.detach())[order], sorted_labels, float(iou_threshold))
    return order[keep]


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS; equal to ``torchvision.ops.nms``.

    Args:
        boxes: (N, 4) in (x1, y1, x2, y2).
        scores: (N,).
        iou_threshold: a box is dropped when a higher-scored kept box has IoU > this with it.

    Returns:
        int64 indices (into ``boxes``) of the kept boxes, by descending score.
    """
    return _nms(boxes, scores, None, iou_threshold)


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """NMS done independently per category (or image, or any grouping) in ``idxs``; equal to
    ``torchvision.ops.batched_nms``.

    Boxes of different groups never suppress each other. Instead of shifting each group's boxes
    apart (which rounds float32 coordinates) or looping over groups, the overlap matrices are
    masked with "same group", so the result is exactly per-group NMS.

    Args:
        boxes: (N, 4) in (x1, y1, x2, y2).
        scores: (N,).
        idxs: (N,) integer group of each box.
        iou_threshold: as in :func:`nms`.

    Returns:
        int64 indices of the kept boxes, by descending score (ties in input order).
    """
    if idxs.shape != scores.shape:
        raise ValueError(
            f"batched_nms expects one group index per box: idxs {tuple(idxs.shape)}, "
            f"scores {tuple(scores.shape)}"
        )
    return _nms(boxes, scores, idxs, iou_threshold)
