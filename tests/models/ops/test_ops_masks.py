"""Mask pasting against a brute-force loop over pixels (bilinear interpolation of the box's M x M
grid at each pixel centre, zero outside the grid), and RLE round trips through pycocotools."""

import importlib

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from ops_references import brute_paste
from vitasks.models.ops import masks_to_rle, paste_masks_in_image

# CI's second leg runs these too: on torchvision's kernels there (.ci/run).
pytestmark = pytest.mark.torch_leg

masks_module = importlib.import_module("vitasks.models.ops.masks")


def example(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(7, 5, 5, generator=g)
    boxes = torch.tensor([
        [3.2, 4.7, 17.9, 12.1],   # inside
        [-6.0, -3.0, 9.5, 8.0],   # over the top-left corner
        [20.0, 10.0, 40.0, 30.0],  # over the bottom-right corner
        [10.3, 6.6, 11.1, 7.0],   # under one pixel
        [0.0, 0.0, 26.0, 19.0],   # the whole image
        [8.0, 8.0, 8.0, 12.0],    # no width: empty
        [30.0, 2.0, 36.0, 6.0],   # outside the image
    ])
    return masks, boxes


def test_paste_probabilities_equal_brute_force():
    masks, boxes = example()
    pasted = paste_masks_in_image(masks, boxes, (19, 26), threshold=None)
    assert pasted.shape == (7, 19, 26) and pasted.dtype == torch.float32
    torch.testing.assert_close(pasted.double(), brute_paste(masks, boxes, 19, 26), rtol=1e-5, atol=1e-5)
    assert not pasted[5].any() and not pasted[6].any()


def test_paste_thresholded_and_in_chunks(monkeypatch):
    masks, boxes = example(seed=1)
    expected = brute_paste(masks, boxes, 19, 26)
    binary = paste_masks_in_image(masks[:, None], boxes, (19, 26))  # (N, 1, M, M) accepted
    assert binary.dtype == torch.bool
    decided = (expected - 0.5).abs() > 1e-5  # pixels not on the threshold up to rounding
    assert decided.float().mean() > 0.99
    assert torch.equal(binary[decided], (expected >= 0.5)[decided])
    # One box per chunk gives the same masks.
    monkeypatch.setattr(masks_module, "PASTE_BUDGET", 1)
    assert torch.equal(paste_masks_in_image(masks, boxes, (19, 26)), binary)


def test_full_box_of_ones_fills_exactly_the_box():
    # A mask of ones reaches >= 0.5 out to the box edge and no further (interpolation towards the
    # zero padding drops below 0.5 beyond it): the pasted mask is the box's pixels.
    boxes = torch.tensor([[2.0, 3.0, 9.0, 7.0]])
    pasted = paste_masks_in_image(torch.ones(1, 14, 14), boxes, (10, 12))
    expected = torch.zeros(10, 12, dtype=torch.bool)
    expected[3:7, 2:9] = True
    assert torch.equal(pasted[0], expected)
    empty = paste_masks_in_image(torch.zeros(0, 14, 14), torch.zeros(0, 4), (10, 12))
    assert empty.shape == (0, 10, 12)
    with pytest.raises(ValueError, match="boxes"):
        paste_masks_in_image(torch.ones(2, 14, 14), torch.zeros(3, 4), (10, 12))


def test_masks_to_rle_round_trips_through_pycocotools():
    g = torch.Generator().manual_seed(2)
    masks = torch.rand(3, 9, 13, generator=g) > 0.6
    rles = masks_to_rle(masks)
    assert len(rles) == 3 and all(isinstance(r["counts"], str) and r["size"] == [9, 13] for r in rles)
    decoded = mask_utils.decode([{"size": r["size"], "counts": r["counts"].encode()} for r in rles])
    assert np.array_equal(decoded.transpose(2, 0, 1).astype(bool), masks.numpy())
    assert mask_utils.area(rles[0]) == int(masks[0].sum())
    assert masks_to_rle(torch.zeros(0, 9, 13, dtype=torch.bool)) == []
