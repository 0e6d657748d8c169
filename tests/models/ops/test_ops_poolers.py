"""Multi-level RoI pooling: the FPN level rule against the formula, and the pooler against
roi_align applied box by box on the level each box belongs to."""

import math

import pytest
import torch

from vitasks.models.ops import RoIPooler, assign_boxes_to_levels, roi_align

# CI's second leg runs these too: on torchvision's kernels there (.ci/run).
pytestmark = pytest.mark.torch_leg


def square(side: float, x: float = 0.0) -> list:
    return [x, 0.0, x + side, side]


def test_level_rule_by_hand():
    boxes = torch.tensor([square(s) for s in (224, 223, 112, 448, 447.9, 56, 10, 2000, 0)])
    # floor(4 + log2(side / 224)), clamped to [2, 5], counted from level 2.
    expected = [4, 3, 3, 5, 4, 2, 2, 5, 2]
    assert (assign_boxes_to_levels(boxes, 2, 5) + 2).tolist() == expected
    for box, level in zip(boxes.tolist(), expected):
        side = box[2] - box[0]
        formula = math.floor(4 + math.log2(side / 224)) if side > 0 else -math.inf
        assert min(max(formula, 2), 5) == level


def test_pooler_equals_roi_align_on_each_box_level():
    strides = (4, 8, 16, 32)
    features = [torch.randn(2, 3, 512 // s, 512 // s) for s in strides]
    boxes = [torch.tensor([[10.0, 20.0, 40.0, 60.0], [0.0, 0.0, 250.0, 200.0], [100.0, 30.0, 430.0, 340.0]]),
             torch.tensor([[5.0, 5.0, 9.0, 9.0], [10.0, 20.0, 510.0, 500.0]])]
    pooler = RoIPooler(output_size=7, strides=strides, sampling_ratio=0, aligned=True)
    pooled = pooler(features, boxes)
    assert pooled.shape == (5, 3, 7, 7)
    all_boxes = torch.cat(boxes)
    images = [0, 0, 0, 1, 1]
    levels = assign_boxes_to_levels(all_boxes, 2, 5).tolist()
    assert sorted(set(levels)) == [0, 1, 2, 3]  # the example reaches every level
    for k, (box, image, level) in enumerate(zip(all_boxes, images, levels)):
        expected = roi_align(features[level], torch.cat((torch.tensor([float(image)]), box))[None], 7,
                             1.0 / strides[level], 0, True)
        torch.testing.assert_close(pooled[k], expected[0])
    assert pooler(features, [torch.zeros(0, 4), torch.zeros(0, 4)]).shape == (0, 3, 7, 7)


def test_pooler_gradient_reaches_the_levels_and_strides_are_checked():
    features = [torch.randn(1, 2, 16, 16, requires_grad=True), torch.randn(1, 2, 8, 8, requires_grad=True)]
    pooler = RoIPooler(output_size=2, strides=(4, 8), canonical_box_size=16, canonical_level=2)
    pooler(features, [torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 60.0, 60.0]])]).sum().backward()
    assert features[0].grad.abs().sum() > 0 and features[1].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="consecutive powers of two"):
        RoIPooler(7, strides=(4, 16))
    with pytest.raises(ValueError, match="built for 2 levels"):
        pooler(features[:1], [torch.zeros(0, 4)])
