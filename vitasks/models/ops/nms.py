"""Greedy non-maximum suppression in plain torch, equal to ``torchvision.ops.nms`` and
``batched_nms``.

The definition (torchvision's): visit the boxes by descending score (a stable sort, so equal
scores keep their input order); keep a box unless a box kept before it overlaps it with IoU
strictly greater than the threshold (in batched NMS: a kept box of the same class). IoU is
``inter / (area_i + area_j - inter)`` exactly as torchvision computes it, so a pair of empty boxes
(0 / 0 = NaN) never suppresses anything.

:func:`nms` and :func:`batched_nms` run torchvision's compiled NMS where :func:`kernels` chose it
(:mod:`.selection`), this module's plain-torch version otherwise; ``*_torch`` and
``*_torchvision`` are the two, for tests and tools. The torchvision path hands torchvision the
boxes already in this order with strictly decreasing stand-in scores, so equal scores are ordered
the same way (input order) whatever torchvision's own sort does with ties, and runs batched NMS
as torchvision's NMS on each group alone (torchvision's ``batched_nms`` shifts groups apart by
coordinate offsets, which rounds float32 coordinates and can change what is kept).

How the plain version is vectorised: the sorted boxes (of one group, in batched NMS) are taken in blocks. A
block is first checked against all boxes kept so far (IoU matrices in cache-sized tiles), which
removes most of it at once; what survives is resolved by a greedy pass over the block's own
boolean overlap matrix, whose Python loop does work only for the boxes it keeps. Memory stays at
a few block-sized matrices whatever the number of boxes.
"""

from typing import Optional

import numpy as np
import torch

from ._precision import as_float
from .selection import kernels, torchvision_ops

# Boxes per block of the greedy pass; the block's overlap matrix is BLOCK_SIZE^2 booleans.
BLOCK_SIZE = 1024
# Stand-in scores for torchvision's NMS are float32 ranks: exact integers up to 2**24 boxes.
MAX_RANKED_BOXES = 1 << 24
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
    # Two (N, M) buffers, reused through out= and in-place ops: fewer allocations and passes
    # over memory, which is what this arithmetic is bound by.
    inter = torch.minimum(x2a, x2b)
    scratch = torch.maximum(x1a, x1b)
    inter.sub_(scratch).clamp_(min=0)
    torch.minimum(y2a, y2b, out=scratch)
    scratch.sub_(torch.maximum(y1a, y1b)).clamp_(min=0)
    inter.mul_(scratch)
    torch.add((x2a - x1a) * (y2a - y1a), (x2b - x1b) * (y2b - y1b), out=scratch)
    return inter.div_(scratch.sub_(inter)) > iou_threshold


def _greedy_keep(boxes: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Keep mask (N,) of the greedy pass over ``boxes`` already sorted by descending score."""
    num_boxes = boxes.shape[0]
    keep = torch.zeros(num_boxes, dtype=torch.bool)
    kept_boxes = boxes.new_zeros((0, 4))
    for start in range(0, num_boxes, BLOCK_SIZE):
        block = boxes[start : start + BLOCK_SIZE]
        alive = torch.ones(block.shape[0], dtype=torch.bool, device=boxes.device)
        # 1. Boxes kept in earlier blocks remove what they overlap in this one.
        for chunk_start in range(0, kept_boxes.shape[0], ROW_CHUNK):
            chunk = kept_boxes[chunk_start : chunk_start + ROW_CHUNK]
            alive &= ~_overlaps(chunk, block, iou_threshold).any(dim=0)
        # 2. Greedy pass inside the block, over the survivors only.
        survivors = alive.nonzero().squeeze(1)
        candidates = block[survivors]
        suppresses = torch.zeros(
            (len(candidates), len(candidates)), dtype=torch.bool, device=boxes.device
        )
        for row in range(0, len(candidates), ROW_CHUNK):
            rows = slice(row, row + ROW_CHUNK)
            suppresses[rows] = _overlaps(candidates[rows], candidates, iou_threshold)
        # Only a higher-scored box suppresses a lower one: keep the strict upper triangle.
        allowed = (~suppresses.triu_(diagonal=1)).cpu().numpy()
        block_keep = np.ones(len(survivors), dtype=bool)
        for i in range(len(survivors)):
            if block_keep[i]:
                np.logical_and(block_keep, allowed[i], out=block_keep)
        kept = survivors[torch.from_numpy(block_keep).to(boxes.device)]
        keep[start + kept.cpu()] = True
        kept_boxes = torch.cat((kept_boxes, block[kept]))
    return keep.to(boxes.device)


def _check_inputs(boxes: torch.Tensor, scores: torch.Tensor) -> None:
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"NMS expects boxes of shape (N, 4), got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(
            f"NMS expects one score per box: boxes {tuple(boxes.shape)}, "
            f"scores {tuple(scores.shape)}"
        )


def _nms(boxes: torch.Tensor, scores: torch.Tensor, groups: Optional[torch.Tensor], iou_threshold: float,
         keep_in=None) -> torch.Tensor:
    """NMS (per group when ``groups`` is given) with ``keep_in(sorted_boxes, threshold)``: what the
    greedy pass keeps of boxes sorted by descending score (a mask or indices); the plain-torch
    pass by default."""
    keep_in = keep_in or _greedy_keep
    _check_inputs(boxes, scores)
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    threshold = float(iou_threshold)
    order = torch.sort(scores, descending=True, stable=True).indices
    sorted_boxes = as_float(boxes.detach())[order]
    if groups is None:
        return order[keep_in(sorted_boxes, threshold)]
    # Per group: positions (in score order) of each group's boxes, found with one stable sort
    # by group, so every group's boxes stay in score order.
    sorted_groups = groups[order]
    by_group = torch.sort(sorted_groups, stable=True).indices
    counts = torch.unique_consecutive(sorted_groups[by_group], return_counts=True)[1]
    if len(counts) == 1:
        return order[keep_in(sorted_boxes, threshold)]
    keep = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
    for members in torch.split(by_group, counts.tolist()):
        keep[members[keep_in(sorted_boxes[members], threshold)]] = True
    return order[keep]


def _torchvision_keep(sorted_boxes: torch.Tensor, threshold: float) -> torch.Tensor:
    """torchvision's NMS on boxes in score order, with strictly decreasing stand-in scores: it
    visits them in exactly this order (ties included)."""
    ranks = torch.arange(sorted_boxes.shape[0], 0, -1, dtype=sorted_boxes.dtype, device=sorted_boxes.device)
    return torchvision_ops().nms(sorted_boxes, ranks, threshold)


def _nms_torchvision(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    groups: Optional[torch.Tensor],
    iou_threshold: float,
) -> torch.Tensor:
    if boxes.shape[0] > MAX_RANKED_BOXES:  # ranks would tie in float32: the plain version decides
        return _nms(boxes, scores, groups, iou_threshold)
    return _nms(boxes, scores, groups, iou_threshold, _torchvision_keep)


def nms_torch(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """:func:`nms` in plain torch, whatever :func:`kernels` chose."""
    return _nms(boxes, scores, None, iou_threshold)


def nms_torchvision(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """:func:`nms` on torchvision's kernel, whatever :func:`kernels` chose (needs torchvision)."""
    return _nms_torchvision(boxes, scores, None, iou_threshold)


def _check_groups(idxs: torch.Tensor, scores: torch.Tensor) -> None:
    if idxs.shape != scores.shape:
        raise ValueError(
            f"batched_nms expects one group index per box: idxs {tuple(idxs.shape)}, "
            f"scores {tuple(scores.shape)}"
        )


def batched_nms_torch(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """:func:`batched_nms` in plain torch, whatever :func:`kernels` chose."""
    _check_groups(idxs, scores)
    return _nms(boxes, scores, idxs, iou_threshold)


def batched_nms_torchvision(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """:func:`batched_nms` on torchvision's NMS kernel (per group), whatever :func:`kernels`
    chose (needs torchvision)."""
    _check_groups(idxs, scores)
    return _nms_torchvision(boxes, scores, idxs, iou_threshold)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS; equal to ``torchvision.ops.nms`` (and run by it where :func:`kernels` is
    ``"torchvision"``).

    Args:
        boxes: (N, 4) in (x1, y1, x2, y2).
        scores: (N,).
        iou_threshold: a box is dropped when a higher-scored kept box has IoU > this with it.

    Returns:
        int64 indices (into ``boxes``) of the kept boxes, by descending score.
    """
    if kernels() == "torchvision":
        return _nms_torchvision(boxes, scores, None, iou_threshold)
    return _nms(boxes, scores, None, iou_threshold)


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """NMS done independently per category (or image, or any grouping) in ``idxs``; equal to
    ``torchvision.ops.batched_nms`` (exactly per-group NMS; run by torchvision's NMS per group
    where :func:`kernels` is ``"torchvision"``).

    Boxes of different groups never suppress each other. The greedy pass runs on each group's
    boxes alone (a loop over groups, each pass vectorised) rather than on boxes shifted apart by
    group, which would round float32 coordinates: the result is exactly per-group NMS, and
    boxes of other groups cost nothing.

    Args:
        boxes: (N, 4) in (x1, y1, x2, y2).
        scores: (N,).
        idxs: (N,) integer group of each box.
        iou_threshold: as in :func:`nms`.

    Returns:
        int64 indices of the kept boxes, by descending score (ties in input order).
    """
    _check_groups(idxs, scores)
    if kernels() == "torchvision":
        return _nms_torchvision(boxes, scores, idxs, iou_threshold)
    return _nms(boxes, scores, idxs, iou_threshold)
