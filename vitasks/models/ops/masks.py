"""Instance masks: pasting per-box mask probabilities back into the image, and COCO RLE.

A mask head predicts an M x M grid of probabilities inside each box. Pasting (detectron2's
``paste_masks_in_image``) resamples that grid onto the image's pixel centres by bilinear
interpolation, treating the grid as M x M cells that exactly tile the box, with zeros outside it,
then thresholds. Here each box is resampled only over its own crop of the image (the box plus the
half cell where interpolation still reaches), all crops of a chunk at once with one
``grid_sample``; chunks group boxes of similar size and bound the memory.
"""

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ._precision import as_float, autocast_off

# Crop pixels resampled per chunk (boxes x crop height x crop width): 256K, a 512 x 512 crop.
# Buffers this small are recycled by the allocator; tens of megabytes would come fresh from the
# OS each time and pay a page fault per 4 KB.
PASTE_BUDGET = 1 << 18


def _crop_extent(
    low: torch.Tensor, high: torch.Tensor, cells: int, image_size: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per box along one axis: first pixel and number of pixels of the crop that holds every
    pixel the pasted mask can reach (the box plus half a mask cell each side, plus one pixel of
    slack for rounding), clamped to the image."""
    margin = 0.5 * (high - low) / cells
    first = torch.floor(low - margin).sub_(1).clamp_(min=0, max=image_size)
    last = torch.ceil(high + margin).add_(1).clamp_(min=0, max=image_size)
    return first.long(), (last - first).long()


def _crop_origins(first: torch.Tensor, size: int, image_size: int) -> torch.Tensor:
    """Origins that keep crops of a common ``size`` inside the image: a crop near the far edge
    slides back, and still covers its box since it only grows towards the origin."""
    return torch.minimum(first, torch.full_like(first, image_size - size))


def paste_masks_in_image(
    masks: torch.Tensor,
    boxes: torch.Tensor,
    image_shape: Tuple[int, int],
    threshold: Optional[float] = 0.5,
) -> torch.Tensor:
    """Per-box mask probabilities pasted into full-image masks.

    Args:
        masks: (N, Mh, Mw) or (N, 1, Mh, Mw) probabilities, one grid per box.
        boxes: (N, 4) boxes (x1, y1, x2, y2) in image pixels, one per mask.
        image_shape: (height, width) of the output masks.
        threshold: pixels with probability >= threshold are set (bool output); ``None`` returns
            the probabilities themselves (float32).

    Returns:
        (N, height, width) bool masks (float32 if ``threshold`` is None). Boxes with no area
        (or non-finite coordinates) give empty masks.
    """
    if masks.dim() == 4:
        if masks.shape[1] != 1:
            raise ValueError(f"masks must be (N, M, M) or (N, 1, M, M), got {tuple(masks.shape)}")
        masks = masks[:, 0]
    if masks.dim() != 3 or boxes.shape != (masks.shape[0], 4):
        raise ValueError(
            f"expected masks (N, M, M) and boxes (N, 4), got {tuple(masks.shape)} and "
            f"{tuple(boxes.shape)}"
        )
    height, width = int(image_shape[0]), int(image_shape[1])
    num_masks, cells_h, cells_w = masks.shape
    out_dtype = torch.float32 if threshold is None else torch.bool
    pasted = torch.zeros((num_masks, height, width), dtype=out_dtype, device=masks.device)
    if num_masks == 0 or height == 0 or width == 0:
        return pasted

    with autocast_off(masks.device.type):
        masks = as_float(masks)
        boxes = boxes.to(masks)
        x0, y0, x1, y1 = boxes.unbind(dim=1)
        drawable = ((x1 > x0) & (y1 > y0) & torch.isfinite(boxes).all(dim=1)).nonzero().squeeze(1)
        if drawable.numel() == 0:
            return pasted
        x0, y0, x1, y1 = x0[drawable], y0[drawable], x1[drawable], y1[drawable]
        first_x, size_x = _crop_extent(x0, x1, cells_w, width)
        first_y, size_y = _crop_extent(y0, y1, cells_h, height)
        # Chunks of boxes with similar crops (sorted by crop area), so that small boxes are not
        # resampled over the crop size of the largest one.
        order = torch.argsort(size_x * size_y)
        sizes = torch.stack((size_y, size_x), dim=1)[order].clamp(min=1).tolist()
        start = 0
        while start < len(order):
            crop_h, crop_w = sizes[start]
            end = start + 1
            while end < len(order):
                grown_h, grown_w = max(crop_h, sizes[end][0]), max(crop_w, sizes[end][1])
                if (end + 1 - start) * grown_h * grown_w > PASTE_BUDGET:
                    break
                crop_h, crop_w, end = grown_h, grown_w, end + 1
            members = order[start:end]
            start = end
            # Crops of one common size; one near the far edge slides back into the image.
            origin_x = _crop_origins(first_x[members], crop_w, width)
            origin_y = _crop_origins(first_y[members], crop_h, height)
            # Pixel centres of the crops in grid_sample's coordinates: -1 and 1 are the box's edges.
            pixels_x = origin_x[:, None] + torch.arange(crop_w, device=masks.device)  # (n, crop_w)
            pixels_y = origin_y[:, None] + torch.arange(crop_h, device=masks.device)  # (n, crop_h)
            box_x0, box_x1 = x0[members, None], x1[members, None]
            box_y0, box_y1 = y0[members, None], y1[members, None]
            grid_x = (pixels_x + 0.5 - box_x0) / (box_x1 - box_x0) * 2 - 1
            grid_y = (pixels_y + 0.5 - box_y0) / (box_y1 - box_y0) * 2 - 1
            grid = grid_x.new_empty((len(members), crop_h, crop_w, 2))
            grid[..., 0] = grid_x[:, None, :]
            grid[..., 1] = grid_y[:, :, None]
            probabilities = F.grid_sample(
                masks[drawable[members], None], grid, mode="bilinear", padding_mode="zeros",
                align_corners=False,
            )[:, 0]
            values = probabilities if threshold is None else probabilities >= threshold
            # Each crop is a rectangle of the image: plain slice copies, one per box.
            for crop, mask_index, top, left in zip(
                values, drawable[members].tolist(), origin_y.tolist(), origin_x.tolist()
            ):
                pasted[mask_index, top : top + crop_h, left : left + crop_w] = crop
    return pasted


def masks_to_rle(masks: torch.Tensor) -> List[Dict]:
    """COCO run-length encodings of binary masks (N, H, W), JSON-ready (``counts`` as str), via
    pycocotools."""
    import numpy as np
    from pycocotools import mask as mask_utils

    if masks.dim() != 3:
        raise ValueError(f"masks_to_rle expects (N, H, W) masks, got {tuple(masks.shape)}")
    # pycocotools wants (H, W, N) uint8 in column-major (Fortran) order.
    array = np.asfortranarray(masks.detach().to("cpu", torch.uint8).permute(1, 2, 0).numpy())
    encoded = mask_utils.encode(array) if masks.shape[0] else []
    for rle in encoded:
        rle["counts"] = rle["counts"].decode("ascii")
    return list(encoded)
