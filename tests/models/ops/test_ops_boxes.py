"""Boxes: areas and IoU against brute-force loops, clipping, and the box coder (hand-worked deltas,
round trips, class-specific decoding, the scale clamp)."""

import math

import pytest
import torch

from vitasks.models.ops import (
    BoxCoder,
    box_area,
    box_iou,
    box_xywh_to_xyxy,
    box_xyxy_to_xywh,
    clip_boxes,
    nonempty_boxes,
)

# CI's second leg runs these too: on torchvision's kernels there (.ci/run).
pytestmark = pytest.mark.torch_leg


def random_boxes(n: int, size: float = 50.0, seed: int = 0, min_side: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    top_left = torch.rand(n, 2, generator=g) * size
    sides = min_side + torch.rand(n, 2, generator=g) * size / 2
    return torch.cat((top_left, top_left + sides), dim=1)


def brute_iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    if inter == 0:
        return 0.0
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_box_area_and_iou_match_brute_force_loops():
    boxes1 = torch.cat((random_boxes(13, seed=1), torch.tensor([[5.0, 5.0, 5.0, 9.0]])))  # empty
    boxes2 = torch.cat((random_boxes(7, seed=2), boxes1[:2], torch.tensor([[5.0, 5.0, 5.0, 9.0]])))
    areas = box_area(boxes1)
    for i, b in enumerate(boxes1.tolist()):
        assert areas[i].item() == pytest.approx((b[2] - b[0]) * (b[3] - b[1]), rel=1e-6)
    iou = box_iou(boxes1, boxes2)
    assert iou.shape == (14, 10)
    expected = torch.tensor([[brute_iou(a, b) for b in boxes2.tolist()] for a in boxes1.tolist()])
    torch.testing.assert_close(iou, expected, rtol=1e-5, atol=1e-6)
    # Identical boxes overlap fully; two empty boxes give 0 rather than 0/0.
    assert iou[0, 7].item() == pytest.approx(1.0) and iou[1, 8].item() == pytest.approx(1.0)
    assert iou[13, 9].item() == 0.0 and not torch.isnan(iou).any()


def test_iou_hand_worked_and_in_float32_for_half_boxes():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    # Overlap 5 x 10 = 50; union 100 + 100 - 50 = 150.
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[1 / 3, 0.0]]))
    assert box_iou(a.half(), b.half()).dtype == torch.float32
    # Half precision cannot represent 1025 - 1024.5 exactly; the area must still be computed wide.
    wide = torch.tensor([[1000.0, 1000.0, 1024.0, 1024.0]], dtype=torch.float64)
    assert box_area(wide).dtype == torch.float64 and box_area(wide).item() == 576.0


def test_clip_nonempty_and_xywh_round_trip():
    boxes = torch.tensor([[-5.0, 3.0, 120.0, 40.0], [10.0, -2.0, 20.0, 90.0], [50.0, 50.0, 50.5, 60.0]])
    clipped = clip_boxes(boxes, (64, 100))  # (height, width)
    torch.testing.assert_close(
        clipped, torch.tensor([[0.0, 3.0, 100.0, 40.0], [10.0, 0.0, 20.0, 64.0], [50.0, 50.0, 50.5, 60.0]])
    )
    assert nonempty_boxes(clipped).tolist() == [True, True, True]
    assert nonempty_boxes(clipped, min_size=1.0).tolist() == [True, True, False]
    assert not nonempty_boxes(torch.tensor([[0.0, 0.0, float("inf"), 4.0]]))[0]
    xywh = box_xyxy_to_xywh(boxes)
    torch.testing.assert_close(xywh[0], torch.tensor([-5.0, 3.0, 125.0, 37.0]))
    torch.testing.assert_close(box_xywh_to_xyxy(xywh), boxes)


def test_box_coder_hand_worked_deltas():
    reference = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), 10 x 20
    target = torch.tensor([[5.0, 5.0, 15.0, 45.0]])  # centre (10, 25), 10 x 40
    torch.testing.assert_close(
        BoxCoder((1, 1, 1, 1)).encode(reference, target),
        torch.tensor([[0.5, 0.75, 0.0, math.log(2)]]),
    )
    torch.testing.assert_close(
        BoxCoder((10, 10, 5, 5)).encode(reference, target),
        torch.tensor([[5.0, 7.5, 0.0, 5 * math.log(2)]]),
    )


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (30.0, 30.0, 15.0, 15.0)])
def test_box_coder_round_trips(weights):
    coder = BoxCoder(weights)
    # Sides of 2..27 px: no target is more than 62.5 times its reference (the decoder's clamp).
    reference, target = random_boxes(50, seed=3, min_side=2), random_boxes(50, seed=4, min_side=2)
    deltas = coder.encode(reference, target)
    torch.testing.assert_close(coder.decode(deltas, reference), target, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(coder.encode(reference, coder.decode(deltas, reference)), deltas,
                               rtol=1e-4, atol=1e-4)


def test_box_coder_class_specific_decode_and_scale_clamp():
    coder = BoxCoder((10, 10, 5, 5))
    reference = random_boxes(6, seed=5, min_side=1)
    deltas = torch.randn(6, 3 * 4)
    decoded = coder.decode(deltas, reference)
    assert decoded.shape == (6, 12)
    for k in range(3):
        torch.testing.assert_close(decoded[:, 4 * k : 4 * k + 4], coder.decode(deltas[:, 4 * k : 4 * k + 4], reference))
    # A huge width delta is clamped to log(1000 / 16): the box grows 62.5 times, not to inf.
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    grown = coder.decode(torch.tensor([[0.0, 0.0, 5 * 100.0, 0.0]]), box)
    torch.testing.assert_close(grown, torch.tensor([[5 - 312.5, 0.0, 5 + 312.5, 10.0]]))
    # Half-precision deltas (autocast) decode in float32.
    assert coder.decode(deltas.half(), reference).dtype == torch.float32
    with pytest.raises(ValueError, match="4 numbers"):
        BoxCoder((1.0, 1.0))
