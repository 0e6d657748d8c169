"""Matcher, balanced sampler and the RPN: targets, losses and proposals against brute force."""

import math

import pytest
import torch

from vitasks.models.heads.rpn_head import RPNHead
from vitasks.models.ops import BoxCoder, box_iou
from vitasks.models.ops.sampling import Matcher, subsample_labels


def brute_force_match(iou, thresholds, labels, low_quality):
    """The matching rule written out prediction by prediction."""
    num_gt, num_pred = iou.shape
    matched, match_labels = [], []
    for p in range(num_pred):
        column = [float(iou[g, p]) for g in range(num_gt)]
        best = max(column)
        matched.append(column.index(best))  # first ground truth among equals
        interval = sum(best >= t for t in thresholds)
        match_labels.append(labels[interval])
    if low_quality:
        for g in range(num_gt):
            best = max(float(v) for v in iou[g])
            for p in range(num_pred):
                if best > 0 and float(iou[g, p]) == best:
                    match_labels[p] = 1
    return matched, match_labels


def test_matcher_hand_case():
    # 2 ground truths x 5 predictions.
    iou = torch.tensor([
        [0.80, 0.50, 0.10, 0.20, 0.00],
        [0.10, 0.60, 0.25, 0.20, 0.00],
    ])
    matcher = Matcher((0.3, 0.7), (0, -1, 1), allow_low_quality_matches=False)
    matched, labels = matcher(iou)
    assert matched.tolist()[:3] == [0, 1, 1]
    # 0.8 >= 0.7 fg; 0.6 ignored; 0.25 bg; 0.2 bg; 0 bg.
    assert labels.tolist() == [1, -1, 0, 0, 0]
    # Low-quality: ground truth 1's best prediction (0.6) becomes foreground; ground truth 0's
    # best is prediction 0, already foreground.
    _, labels = Matcher((0.3, 0.7), (0, -1, 1), allow_low_quality_matches=True)(iou)
    assert labels.tolist() == [1, 1, 0, 0, 0]


def test_matcher_low_quality_ties_and_boundaries():
    iou = torch.tensor([
        [0.40, 0.40, 0.30, 0.70],
        [0.20, 0.20, 0.20, 0.10],
    ])
    _, labels = Matcher((0.3, 0.7), (0, -1, 1), allow_low_quality_matches=True)(iou)
    # Thresholds are closed below: 0.3 is ignored (not background), 0.7 foreground. Ground truth
    # 1's best IoU 0.2 is shared by predictions 0-2 (their own best is ground truth 0):
    # all three become foreground.
    assert labels.tolist() == [1, 1, 1, 1]
    # A ground truth that overlaps nothing adds no match.
    iou = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.8, 0.0]])
    _, labels = Matcher((0.3, 0.7), (0, -1, 1), allow_low_quality_matches=True)(iou)
    assert labels.tolist() == [0, 1, 0]


@pytest.mark.parametrize("low_quality", [False, True])
def test_matcher_matches_brute_force_on_random_ious(low_quality):
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        # Rounded to tenths: plenty of ties and values on the thresholds (float64, so that
        # Python's comparisons below see the same numbers).
        iou = (torch.rand(4, 30, generator=generator, dtype=torch.float64) * 10).round() / 10
        iou[:, :3] = 0  # predictions that overlap nothing
        for thresholds, label_set in (((0.3, 0.7), (0, -1, 1)), ((0.5,), (0, 1))):
            matched, labels = Matcher(thresholds, label_set, low_quality)(iou)
            want_matched, want_labels = brute_force_match(iou, thresholds, label_set, low_quality)
            assert labels.tolist() == want_labels
            # The matched index is only meaningful where the best IoU is unique.
            top2 = iou.topk(2, dim=0).values
            unique = top2[0] > top2[1]
            assert [m for m, u in zip(matched.tolist(), unique) if u] == [
                m for m, u in zip(want_matched, unique) if u
            ]


def test_matcher_without_ground_truth_gives_background():
    matched, labels = Matcher((0.3, 0.7), (0, -1, 1), True)(torch.zeros(0, 6))
    assert matched.tolist() == [0] * 6 and labels.tolist() == [0] * 6


def test_matcher_rejects_bad_configs():
    with pytest.raises(ValueError, match="increasing"):
        Matcher((0.7, 0.3), (0, -1, 1))
    with pytest.raises(ValueError, match="one label per IoU interval"):
        Matcher((0.3, 0.7), (0, 1))


def test_subsample_labels_balance_and_membership():
    labels = torch.full((200,), -1)
    labels[:10] = 1  # foreground
    labels[50:150] = 0  # background
    for num_samples, fraction, want_fg, want_bg in ((32, 0.25, 8, 24), (64, 0.5, 10, 54), (256, 0.5, 10, 100)):
        fg, bg = subsample_labels(labels, num_samples, fraction, background_label=0)
        assert len(fg) == want_fg and len(bg) == want_bg
        assert set(fg.tolist()) <= set(range(10)) and len(set(fg.tolist())) == want_fg
        assert set(bg.tolist()) <= set(range(50, 150)) and len(set(bg.tolist())) == want_bg


def test_subsample_labels_with_class_labels_and_reproducibility():
    # RoI-head style: classes 0..K-1 foreground, K = 3 background, -1 ignored.
    labels = torch.tensor([0, 3, 2, -1, 3, 1, 3, 3, -1, 2])
    torch.manual_seed(5)
    fg, bg = subsample_labels(labels, 6, 0.5, background_label=3)
    # 4 foreground (0, 2, 5, 9), at most 3 drawn; background fills the other 3.
    assert len(set(fg.tolist())) == 3 and set(fg.tolist()) <= {0, 2, 5, 9}
    assert len(set(bg.tolist())) == 3 and set(bg.tolist()) <= {1, 4, 6, 7}
    torch.manual_seed(5)
    again = subsample_labels(labels, 6, 0.5, background_label=3)
    assert fg.tolist() == again[0].tolist() and bg.tolist() == again[1].tolist()
    # Every background index gets drawn over a few draws (uniform, not the first ones).
    drawn = set()
    for _ in range(50):
        drawn.update(subsample_labels(labels, 4, 0.5, background_label=3)[1].tolist())
    assert drawn == {1, 4, 6, 7}


def small_rpn(**kwargs) -> RPNHead:
    defaults = dict(in_channels=8, anchor_sizes=[8, 16], strides=[4, 8], batch_size_per_image=64,
                    pre_nms_topk=[50, 40], post_nms_topk=[30, 20])
    defaults.update(kwargs)
    return RPNHead(**defaults)


def anchor_index(rpn: RPNHead, level: int, row: int, col: int, cell: int, grid_sizes) -> int:
    """Position of an anchor in the concatenation of all levels (row, column, cell order)."""
    before = sum(h * w * rpn.num_anchors for h, w in grid_sizes[:level])
    width = grid_sizes[level][1]
    return before + (row * width + col) * rpn.num_anchors + cell


def test_rpn_anchor_on_a_ground_truth_box_is_foreground_with_zero_deltas():
    rpn = small_rpn()
    grids = [(8, 8), (4, 4)]
    anchors = torch.cat(rpn.anchor_generator.grid_anchors(grids))
    # Level 0, cell (2, 3), the ratio-1 anchor: 8 x 8 centred on (12, 8) (offset 0).
    index = anchor_index(rpn, 0, 2, 3, 1, grids)
    assert anchors[index].tolist() == [8.0, 4.0, 16.0, 12.0]
    gt = torch.tensor([[8.0, 4.0, 16.0, 12.0]])
    labels, matched = rpn.anchor_targets(anchors, [gt])
    assert labels[0, index] == 1
    deltas = rpn.box_coder.encode(anchors[index : index + 1], matched[0, index : index + 1])
    assert torch.equal(deltas, torch.zeros(1, 4))
    # Foreground exactly where the IoU is >= 0.7 or it is the ground truth's best anchor.
    iou_row = [float(v) for v in box_iou(gt, anchors)[0]]
    expected_fg = {i for i, v in enumerate(iou_row) if v >= 0.7 or v == max(iou_row)}
    assert set((labels[0] == 1).nonzero().squeeze(1).tolist()) == expected_fg
    # Sampled background only below 0.3.
    assert all(iou_row[i] < 0.3 for i in (labels[0] == 0).nonzero().squeeze(1).tolist())
    assert int((labels[0] >= 0).sum()) == 64


def test_rpn_losses_equal_brute_force():
    rpn = small_rpn(smooth_l1_beta=0.0)
    features = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    gts = [torch.tensor([[4.0, 4.0, 20.0, 18.0], [10.0, 2.0, 30.0, 30.0]]), torch.zeros(0, 4)]
    objectness, deltas = rpn(features)
    flat_objectness, flat_deltas = rpn._flatten(objectness, deltas)
    anchors = torch.cat(rpn.anchor_generator(features))
    torch.manual_seed(11)
    losses = rpn.losses(anchors, flat_objectness, flat_deltas, gts)
    torch.manual_seed(11)  # the same draws
    labels, matched = rpn.anchor_targets(anchors, gts)
    all_logits = torch.cat(flat_objectness, dim=1).detach()
    all_deltas = torch.cat(flat_deltas, dim=1).detach()
    cls_sum, box_sum = 0.0, 0.0
    coder = BoxCoder((1, 1, 1, 1))
    for image in range(2):
        for a in range(anchors.shape[0]):
            label = int(labels[image, a])
            if label < 0:
                continue
            z = float(all_logits[image, a])
            cls_sum += -(label * math.log(1 / (1 + math.exp(-z))) + (1 - label) * math.log(1 - 1 / (1 + math.exp(-z))))
            if label == 1:
                target = coder.encode(anchors[a : a + 1], matched[image, a : a + 1])[0]
                box_sum += float((all_deltas[image, a] - target).abs().sum())
    assert (labels[1] == 1).sum() == 0  # no ground truth: background only
    assert losses["loss_rpn_cls"].item() == pytest.approx(cls_sum / (64 * 2), rel=1e-5)
    assert losses["loss_rpn_bbox"].item() == pytest.approx(box_sum / (64 * 2), rel=1e-5)
    (losses["loss_rpn_cls"] + losses["loss_rpn_bbox"]).backward()
    assert rpn.convs[0].weight.grad.abs().sum() > 0


def test_rpn_proposals_follow_the_prediction_layout():
    """A one-hot objectness map and a shift on one anchor's dx: the best proposal is that anchor,
    shifted, then clipped to the image; no more than post_nms_topk, all inside the image."""
    rpn = small_rpn().eval()
    level, row, col, cell = 1, 1, 2, 2
    objectness = [torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 4, 4)]
    deltas = [torch.zeros(1, 12, 8, 8), torch.zeros(1, 12, 4, 4)]
    objectness[level][0, cell, row, col] = 10.0
    deltas[level][0, 4 * cell, row, col] = 0.25  # dx: a quarter of the anchor's width
    features = [torch.zeros(1, 8, 8, 8), torch.zeros(1, 8, 4, 4)]
    (boxes, scores), = rpn.proposals_from_outputs(features, objectness, deltas, [(30, 28)])
    anchors = rpn.anchor_generator.grid_anchors([(8, 8), (4, 4)])[level]
    anchor = anchors[(row * 4 + col) * 3 + cell]
    width = float(anchor[2] - anchor[0])
    shifted = anchor + torch.tensor([0.25 * width, 0, 0.25 * width, 0])
    want = torch.stack((shifted[0].clamp(0, 28), shifted[1].clamp(0, 30),
                        shifted[2].clamp(0, 28), shifted[3].clamp(0, 30)))
    assert torch.allclose(boxes[0], want, atol=1e-5)
    assert scores[0] == 10.0
    assert len(boxes) <= 20
    assert boxes[:, 0::2].min() >= 0 and boxes[:, 0::2].max() <= 28
    assert boxes[:, 1::2].min() >= 0 and boxes[:, 1::2].max() <= 30
    assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()


def test_rpn_proposals_nms_is_per_level():
    """Two anchors at one place on different levels survive together; on one level, NMS at 0.7
    removes the weaker of two near-identical boxes."""
    rpn = small_rpn(anchor_sizes=[16, 16], aspect_ratios=[1.0]).eval()
    objectness = [torch.full((1, 1, 8, 8), -10.0), torch.full((1, 1, 4, 4), -10.0)]
    deltas = [torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 4, 4)]
    objectness[0][0, 0, 2, 2] = 5.0  # 16 x 16 at (8, 8) on level 0
    objectness[0][0, 0, 2, 3] = 4.0  # the same shifted by 4 px: IoU 0.6 -> kept
    objectness[1][0, 0, 1, 1] = 3.0  # 16 x 16 at (8, 8) on level 1: same box as the first
    features = [torch.zeros(1, 8, 8, 8), torch.zeros(1, 8, 4, 4)]
    (boxes, scores), = rpn.proposals_from_outputs(features, objectness, deltas, [(32, 32)])
    assert scores[:3].tolist() == [5.0, 4.0, 3.0]
    assert torch.equal(boxes[0], boxes[2])
    objectness[0][0, 0, 2, 3] = -10.0
    objectness[0][0, 0, 3, 2] = 4.5
    deltas[0][0, 1, 3, 2] = -0.2  # moved up to y 0.8 px from the first: IoU > 0.7 -> removed
    (boxes, scores), = rpn.proposals_from_outputs(features, objectness, deltas, [(32, 32)])
    assert scores[:2].tolist() == [5.0, 3.0]


def test_rpn_rejects_a_pyramid_of_the_wrong_depth():
    from vitasks.errors import ConfigError

    with pytest.raises(ConfigError, match="2 levels"):
        small_rpn()([torch.zeros(1, 8, 8, 8)])
