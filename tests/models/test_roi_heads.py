"""RoI heads: proposal labelling and sampling, box and mask losses and targets, detection
selection, and the cascade, each against a hand-worked case or a brute-force computation."""

import copy

import pytest
import torch

from vitasks.errors import ConfigError
from vitasks.models.heads.rcnn_heads import ConvFCBoxHead, MaskConvUpsampleHead
from vitasks.models.heads.roi_heads import (
    CascadeRoIHead,
    GroundTruth,
    RoITargets,
    StandardRoIHead,
    _ScaleGradient,
    mask_targets,
)
from vitasks.models.ops import BoxCoder, box_iou

K = 3


def small_head(cls=StandardRoIHead, **kwargs):
    defaults = dict(num_classes=K, in_channels=8, batch_size_per_image=16,
                    box_head=dict(conv_channels=8, fc_channels=16, num_convs=2),
                    mask_head=dict(conv_channels=8, num_convs=2))
    defaults.update(kwargs)
    return cls(**defaults)


def pyramid(batch=1, size=32):
    return [torch.randn(batch, 8, size // s, size // s) for s in (4, 8, 16, 32)]


def test_box_and_mask_head_shapes_and_structure():
    head = ConvFCBoxHead(num_classes=5, in_channels=8, num_convs=4, conv_channels=16, fc_channels=32)
    logits, deltas = head(torch.randn(3, 8, 7, 7))
    assert logits.shape == (3, 6) and deltas.shape == (3, 20)
    # ViTDet's layout: 4 x (conv without bias, LN, ReLU), 1 fc.
    convs = [m for m in head.convs.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(c.bias is None for c in convs)
    assert sum(isinstance(m, torch.nn.Linear) for m in head.fcs.modules()) == 1
    agnostic = ConvFCBoxHead(num_classes=5, in_channels=8, class_agnostic=True, conv_channels=8, fc_channels=8)
    assert agnostic(torch.randn(2, 8, 7, 7))[1].shape == (2, 4)
    mask = MaskConvUpsampleHead(num_classes=5, in_channels=8, conv_channels=8)
    assert mask(torch.randn(2, 8, 14, 14)).shape == (2, 5, 28, 28)
    with pytest.raises(ConfigError, match="norm"):
        ConvFCBoxHead(num_classes=5, norm="BN")


def test_sample_proposals_labels_by_iou_and_appends_ground_truth():
    head = small_head(batch_size_per_image=100)
    gt = GroundTruth(torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]), torch.tensor([2, 0]))
    proposals = torch.tensor([
        [0.0, 0.0, 10.0, 8.0],    # IoU 0.8 with object 0 -> class 2
        [0.0, 0.0, 10.0, 4.0],    # IoU 0.4 -> background
        [21.0, 20.0, 30.0, 30.0],  # IoU 0.9 with object 1 -> class 0
        [40.0, 40.0, 50.0, 50.0],  # nothing -> background
    ])
    (targets,) = head.sample_proposals([proposals], [gt])
    assert len(targets.boxes) == 6  # 4 proposals + 2 ground-truth boxes, all sampled
    by_box = {tuple(b.tolist()): (int(c), tuple(g.tolist()), int(i))
              for b, c, g, i in zip(targets.boxes, targets.classes, targets.gt_boxes, targets.gt_index)}
    assert by_box[(0.0, 0.0, 10.0, 8.0)][:2] == (2, (0.0, 0.0, 10.0, 10.0))
    assert by_box[(0.0, 0.0, 10.0, 4.0)][0] == K
    assert by_box[(21.0, 20.0, 30.0, 30.0)] == (0, (20.0, 20.0, 30.0, 30.0), 1)
    assert by_box[(40.0, 40.0, 50.0, 50.0)][0] == K
    assert by_box[(0.0, 0.0, 10.0, 10.0)][0] == 2 and by_box[(20.0, 20.0, 30.0, 30.0)][0] == 0
    # No ground truth: everything background.
    (targets,) = head.sample_proposals([proposals], [GroundTruth(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))])
    assert targets.classes.tolist() == [K] * 4


def test_sampling_caps_the_foreground_fraction():
    head = small_head(batch_size_per_image=8, positive_fraction=0.25)
    gt = GroundTruth(torch.tensor([[0.0, 0.0, 20.0, 20.0]]), torch.tensor([1]))
    foreground = torch.tensor([[0.0, 0.0, 20.0, 19.0 - i * 0.1] for i in range(10)])
    background = torch.tensor([[30.0 + i, 30.0, 40.0 + i, 40.0] for i in range(10)])
    (targets,) = head.sample_proposals([torch.cat((foreground, background))], [gt])
    assert (targets.classes == 1).sum() == 2 and (targets.classes == K).sum() == 6


def test_box_losses_equal_brute_force():
    head = small_head()
    coder = BoxCoder((10, 10, 5, 5))
    generator = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 25.0], [2.0, 3.0, 9.0, 8.0], [1.0, 1.0, 4.0, 6.0]])
    gt_boxes = torch.tensor([[1.0, 0.0, 11.0, 12.0], [4.0, 6.0, 22.0, 24.0],
                             [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    targets = [RoITargets(boxes[:2], torch.tensor([1, 2]), gt_boxes[:2], torch.tensor([0, 1])),
               RoITargets(boxes[2:], torch.tensor([K, 0]), gt_boxes[2:], torch.tensor([0, 0]))]
    logits = torch.randn(4, K + 1, generator=generator)
    deltas = torch.randn(4, 4 * K, generator=generator)
    losses = head.box_losses(logits, deltas, targets, coder)
    classes = [1, 2, K, 0]
    want_cls = sum(-torch.log_softmax(logits[r], 0)[c] for r, c in enumerate(classes)) / 4
    want_box = 0.0
    for r, c in enumerate(classes):
        if c < K:
            target = coder.encode(boxes[r : r + 1], gt_boxes[r : r + 1])[0]
            want_box += float((deltas[r, 4 * c : 4 * c + 4] - target).abs().sum())
    assert losses["loss_cls"].item() == pytest.approx(float(want_cls), rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(want_box / 4, rel=1e-5)
    # Class-agnostic deltas: the one box per RoI.
    agnostic = head.box_losses(logits, deltas[:, :4], targets, coder)["loss_bbox"]
    want = sum(float((deltas[r, :4] - coder.encode(boxes[r : r + 1], gt_boxes[r : r + 1])[0]).abs().sum())
               for r, c in enumerate(classes) if c < K)
    assert agnostic.item() == pytest.approx(want / 4, rel=1e-5)


def test_mask_targets_cut_the_object_along_the_roi():
    masks = torch.zeros(2, 40, 40, dtype=torch.bool)
    masks[0, 8:24, 4:36] = True  # rows 8..23, columns 4..35
    masks[1, :, :20] = True
    boxes = torch.tensor([
        [4.0, 8.0, 36.0, 24.0],   # exactly object 0 -> all ones
        [4.0, 8.0, 68.0, 24.0],   # twice as wide -> left half ones
        [0.0, 0.0, 40.0, 40.0],   # object 1 over the whole image -> left half ones
    ])
    targets = mask_targets(masks, boxes, torch.tensor([0, 0, 1]), 8)
    assert targets.shape == (3, 8, 8) and targets.dtype == torch.float32
    assert targets[0].eq(1).all()
    half = torch.zeros(8, 8)
    half[:, :4] = 1
    assert torch.equal(targets[1], half) and torch.equal(targets[2], half)


def test_mask_loss_uses_the_class_channel_of_foreground_rois():
    head = small_head()
    features = pyramid()
    masks = torch.zeros(1, 32, 32, dtype=torch.bool)
    masks[0, 4:20, 6:22] = True
    gt = GroundTruth(torch.tensor([[6.0, 4.0, 22.0, 20.0]]), torch.tensor([1]), masks)
    targets = [RoITargets(torch.tensor([[6.0, 4.0, 22.0, 20.0], [0.0, 0.0, 8.0, 8.0]]), torch.tensor([1, K]),
                          torch.tensor([[6.0, 4.0, 22.0, 20.0]] * 2), torch.tensor([0, 0]))]
    loss = head.mask_loss(features, targets, [gt])
    logits = head.mask_head(head.mask_pooler(features, [targets[0].boxes[:1]]))[0, 1]
    want = torch.nn.functional.softplus(-logits).mean()  # all-ones target: BCE = softplus(-x)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ValueError, match="needs gt_instances.masks"):
        head.mask_loss(features, targets, [gt._replace(masks=None)])


def brute_force_detections(scores, boxes, threshold, nms_threshold, top_k):
    """Per class: threshold, greedy NMS by a plain loop, then the best top_k over all classes."""
    kept = []
    for c in range(scores.shape[1] - 1):
        candidates = sorted(((float(scores[r, c]), r) for r in range(len(scores)) if scores[r, c] > threshold),
                            reverse=True)
        chosen = []
        for score, r in candidates:
            box = boxes[r, c if boxes.shape[1] > 1 else 0]
            if all(box_iou(box[None], other[None])[0, 0] <= nms_threshold for other, _ in chosen):
                chosen.append((box, score))
        kept += [(score, c, box) for box, score in chosen]
    kept.sort(key=lambda item: -item[0])
    return kept[:top_k]


def test_select_detections_equals_brute_force():
    head = small_head(max_per_image=6)
    generator = torch.Generator().manual_seed(1)
    scores = torch.rand(20, K + 1, generator=generator).softmax(dim=1)
    corner = torch.rand(20, K, 2, generator=generator) * 20
    boxes = torch.cat((corner, corner + 4 + torch.rand(20, K, 2, generator=generator) * 8), dim=-1)
    boxes[0, 0] = torch.tensor([-5.0, -5.0, 40.0, 40.0])  # clipped to the 25 x 30 image
    found = head.select_detections(scores, boxes, (25, 30))
    want = brute_force_detections(scores, boxes.clamp(min=0).minimum(torch.tensor([30.0, 25.0, 30.0, 25.0])),
                                  0.05, 0.5, 6)
    assert len(found.boxes) == len(want) == 6
    for (score, label, box), got_box, got_score, got_label in zip(want, found.boxes, found.scores, found.labels):
        assert got_score.item() == pytest.approx(score) and got_label.item() == label
        assert torch.allclose(got_box, box)


def test_standard_head_predict_shapes_and_mask_probabilities():
    head = small_head().eval()
    features = pyramid(batch=2)
    proposals = [torch.tensor([[2.0, 2.0, 20.0, 20.0], [5.0, 5.0, 30.0, 25.0]]), torch.tensor([[0.0, 0.0, 8.0, 8.0]])]
    head.score_threshold = 0.0  # keep everything: an untrained head scores about 1 / (K + 1)
    detections = head.predict(features, proposals, [(32, 32), (16, 16)])
    assert len(detections) == 2 and len(detections[0].boxes) == 6 and len(detections[1].boxes) == 3
    for found, size in zip(detections, (32, 16)):
        assert found.mask_probs.shape == (len(found.boxes), 28, 28)
        assert ((found.mask_probs > 0) & (found.mask_probs < 1)).all()
        assert found.boxes.min() >= 0 and found.boxes.max() <= size


def test_scale_gradient():
    x = torch.ones(3, requires_grad=True)
    (_ScaleGradient.apply(x, 0.25) * 2).sum().backward()
    assert x.grad.tolist() == [0.5, 0.5, 0.5]


def test_cascade_builds_trains_and_matches_per_stage_settings():
    head = small_head(CascadeRoIHead)
    assert len(head.box_heads) == 3 and head.box_head is None
    assert [m.thresholds for m in head.matchers] == [[0.5], [0.6], [0.7]]
    assert [c.weights for c in head.box_coders] == [(10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)]
    assert all(h.class_agnostic for h in head.box_heads)
    features = pyramid(batch=2)
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, 4:20, 6:22] = True
    masks[1, 10:30, 10:30] = True
    gts = [GroundTruth(torch.tensor([[6.0, 4.0, 22.0, 20.0]]), torch.tensor([1]), masks[:1]),
           GroundTruth(torch.tensor([[10.0, 10.0, 30.0, 30.0]]), torch.tensor([2]), masks[1:])]
    proposals = [torch.tensor([[5.0, 5.0, 21.0, 21.0], [0.0, 0.0, 9.0, 9.0]]),
                 torch.tensor([[12.0, 12.0, 30.0, 28.0], [0.0, 20.0, 8.0, 30.0]])]
    losses = head.loss(features, proposals, gts, image_sizes=[(32, 32), (32, 32)])
    assert set(losses) == {f"s{k}.{n}" for k in range(3) for n in ("loss_cls", "loss_bbox")} | {"loss_mask"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(h.cls_score.weight.grad.abs().sum() > 0 for h in head.box_heads)
    with pytest.raises(ConfigError, match="class-agnostic"):
        small_head(CascadeRoIHead, box_head=dict(class_agnostic=False))
    with pytest.raises(ConfigError, match="per-stage"):
        small_head(CascadeRoIHead, iou_threshold=0.5)


def test_one_stage_cascade_equals_a_class_agnostic_standard_head():
    cascade = small_head(CascadeRoIHead, stage_iou_thresholds=[0.5], stage_box_coder_weights=[(10, 10, 5, 5)]).eval()
    standard = small_head(box_head=dict(conv_channels=8, fc_channels=16, num_convs=2, class_agnostic=True)).eval()
    standard.box_head = copy.deepcopy(cascade.box_heads[0])
    standard.mask_head = cascade.mask_head
    features = pyramid()
    proposals = [torch.tensor([[2.0, 2.0, 20.0, 20.0], [5.0, 5.0, 30.0, 25.0], [1.0, 8.0, 9.0, 30.0]])]
    for head in (cascade, standard):
        head.score_threshold = 0.0
    a = cascade.predict(features, proposals, [(32, 32)])[0]
    b = standard.predict(features, proposals, [(32, 32)])[0]
    assert torch.equal(a.labels, b.labels)
    assert torch.allclose(a.boxes, b.boxes) and torch.allclose(a.scores, b.scores)
    assert torch.allclose(a.mask_probs, b.mask_probs)


def test_cascade_inference_averages_the_stage_scores_and_takes_the_last_boxes():
    head = small_head(CascadeRoIHead).eval()
    head.score_threshold = 0.0
    head.max_per_image = 1000
    head.nms_threshold = 1.0  # no suppression: every (RoI, class) pair comes out
    features = pyramid()
    proposals = [torch.tensor([[2.0, 2.0, 20.0, 20.0], [5.0, 5.0, 30.0, 25.0]])]
    outputs = head(features, proposals, [(32, 32)])
    # Each stage runs on the previous stage's boxes.
    for stage in (1, 2):
        refined = head.box_coders[stage - 1].decode(outputs["bbox_deltas"][stage - 1], outputs["boxes"][stage - 1])
        assert torch.allclose(outputs["boxes"][stage], refined.clamp(0, 32))
    mean_scores = sum(logits.softmax(dim=1) for logits in outputs["cls_logits"]) / 3
    last_boxes = head.box_coders[2].decode(outputs["bbox_deltas"][2], outputs["boxes"][2]).clamp(0, 32)
    found = head.predict(features, proposals, [(32, 32)])[0]
    assert len(found.boxes) == 2 * K
    for box, score, label in zip(found.boxes, found.scores, found.labels):
        r = int(torch.isclose(mean_scores[:, label], score).nonzero()[0])
        assert torch.allclose(box, last_boxes[r])
