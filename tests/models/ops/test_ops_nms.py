"""NMS and batched NMS against a plain greedy loop written from the definition (torchvision's):
visit boxes by descending score, ties in input order; drop a box when a kept box (of the same
group) has IoU > threshold with it; an empty pair (0 / 0) never suppresses."""

import importlib

import pytest
import torch

from ops_references import brute_nms
from vitasks.models.ops import batched_nms, nms

# CI's second leg runs these too: on torchvision's kernels there (.ci/run).
pytestmark = pytest.mark.torch_leg

# The package exports the function ``nms``, which hides the module of the same name.
nms_module = importlib.import_module("vitasks.models.ops.nms")


def clustered_boxes(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Boxes in a few clusters (so many overlap), some degenerate, some duplicated."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(6, 2, generator=g) * 100
    centre = centres[torch.randint(0, 6, (n,), generator=g)] + torch.randn(n, 2, generator=g) * 8
    half = torch.rand(n, 2, generator=g) * 15 + 1
    boxes = torch.cat((centre - half, centre + half), dim=1)
    boxes[::17, 2] = boxes[::17, 0]  # zero width
    boxes[5::23] = boxes[4::23][: len(boxes[5::23])]  # exact duplicates of the previous box
    return boxes.to(dtype)


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny blocks so a few hundred boxes cross many block and chunk boundaries."""
    monkeypatch.setattr(nms_module, "BLOCK_SIZE", 16)
    monkeypatch.setattr(nms_module, "ROW_CHUNK", 8)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_nms_equals_greedy_definition(threshold, small_blocks):
    boxes = clustered_boxes(300, seed=1)
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(300, generator=g, dtype=torch.float64)
    keep = nms(boxes, scores, threshold)
    assert keep.dtype == torch.long
    assert keep.tolist() == brute_nms(boxes, scores, threshold)


def test_nms_ties_keep_input_order_and_float32(small_blocks):
    boxes = clustered_boxes(200, seed=3, dtype=torch.float32)
    # Few distinct scores: long runs of ties decided by input order.
    scores = (torch.arange(200) % 5).float() / 5
    keep = nms(boxes, scores, 0.5)
    assert keep.tolist() == brute_nms(boxes, scores, 0.5)
    assert scores[keep].tolist() == sorted(scores[keep].tolist(), reverse=True)


def test_nms_without_blocks_and_empty_input():
    boxes = clustered_boxes(120, seed=4)
    scores = torch.rand(120, dtype=torch.float64)
    assert nms(boxes, scores, 0.6).tolist() == brute_nms(boxes, scores, 0.6)
    empty = nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert empty.dtype == torch.long and empty.shape == (0,)
    # Two identical boxes: only the higher-scored stays; two empty boxes: both stay (0/0).
    pair = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 4.0]])
    assert nms(pair, torch.tensor([0.2, 0.9]), 0.5).tolist() == [1]
    flat = torch.tensor([[1.0, 1.0, 1.0, 5.0], [1.0, 1.0, 1.0, 5.0]])
    assert nms(flat, torch.tensor([0.2, 0.9]), 0.5).tolist() == [1, 0]


@pytest.mark.parametrize("threshold", [0.4, 0.7])
def test_batched_nms_equals_greedy_definition_per_group(threshold, small_blocks):
    boxes = clustered_boxes(300, seed=5)
    g = torch.Generator().manual_seed(6)
    scores = torch.rand(300, generator=g, dtype=torch.float64)
    groups = torch.randint(0, 4, (300,), generator=g)
    keep = batched_nms(boxes, scores, groups, threshold)
    assert keep.tolist() == brute_nms(boxes, scores, threshold, groups.tolist())
    # The same set as NMS run on each group alone, merged by descending score.
    per_group = torch.cat([torch.nonzero(groups == c).squeeze(1)[nms(boxes[groups == c], scores[groups == c], threshold)]
                           for c in range(4)])
    assert sorted(keep.tolist()) == sorted(per_group.tolist())


def test_batched_nms_far_apart_coordinates_do_not_change_groups(small_blocks):
    # Large coordinates: the coordinate-offset trick would round these float32 boxes.
    boxes = clustered_boxes(150, seed=7, dtype=torch.float32) + 5000
    scores = torch.rand(150)
    groups = torch.randint(0, 30, (150,))
    assert batched_nms(boxes, scores, groups, 0.5).tolist() == brute_nms(boxes, scores, 0.5, groups.tolist())


def test_nms_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one score per box"):
        nms(torch.zeros(3, 4), torch.zeros(2), 0.5)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        nms(torch.zeros(3, 5), torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="one group index per box"):
        batched_nms(torch.zeros(3, 4), torch.zeros(3), torch.zeros(2, dtype=torch.long), 0.5)
