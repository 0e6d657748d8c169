"""CrossEntropyLoss and DiceLoss against brute-force computations of the documented formulas."""

import math

import pytest
import torch

from vitasks.errors import ConfigError
from vitasks.models.losses import CrossEntropyLoss


def _log_softmax(row):
    m = max(row)
    z = math.log(sum(math.exp(v - m) for v in row)) + m
    return [v - z for v in row]


def _brute_hard(logits, labels, eps=0.0, class_weight=None, ignore=255, avg_non_ignore=True):
    """Per element: w[y] * (1 - eps) * -log p_y + eps / K * sum_k w[k] * -log p_k (PyTorch's
    definition); mean over non-ignored (or all) elements."""
    total, count, n_all = 0.0, 0, 0
    for row, y in zip(logits, labels):
        n_all += 1
        if y == ignore:
            continue
        k = len(row)
        w = class_weight or [1.0] * k
        logp = _log_softmax(row)
        total += (1 - eps) * w[y] * -logp[y] + eps / k * sum(w[j] * -logp[j] for j in range(k))
        count += 1
    return total / max(count if avg_non_ignore else n_all, 1)


def test_hard_labels_match_brute_force():
    logits = torch.randn(7, 5)
    labels = torch.tensor([0, 4, 2, 2, 1, 3, 0])
    loss = CrossEntropyLoss()(logits, labels)
    assert loss.item() == pytest.approx(_brute_hard(logits.tolist(), labels.tolist()), rel=1e-5)


def test_label_smoothing_and_loss_weight():
    logits = torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    loss = CrossEntropyLoss(loss_weight=0.5, label_smoothing=0.1)(logits, labels)
    expected = 0.5 * _brute_hard(logits.tolist(), labels.tolist(), eps=0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_soft_targets_match_brute_force():
    logits = torch.randn(5, 3)
    targets = torch.softmax(torch.randn(5, 3), dim=1)
    eps = 0.1
    loss = CrossEntropyLoss(label_smoothing=eps)(logits, targets)
    expected = 0.0
    for row, t in zip(logits.tolist(), targets.tolist()):
        logp = _log_softmax(row)
        smoothed = [(1 - eps) * v + eps / 3 for v in t]
        expected -= sum(s * lp for s, lp in zip(smoothed, logp))
    assert loss.item() == pytest.approx(expected / 5, rel=1e-5)


def test_one_hot_soft_target_equals_hard_label():
    logits = torch.randn(4, 6)
    labels = torch.tensor([5, 0, 3, 3])
    onehot = torch.nn.functional.one_hot(labels, 6).float()
    ce = CrossEntropyLoss(label_smoothing=0.2)
    assert ce(logits, onehot).item() == pytest.approx(ce(logits, labels).item(), rel=1e-5)


@pytest.mark.parametrize("avg_non_ignore", [True, False])
def test_dense_with_ignore_and_class_weights(avg_non_ignore):
    n, k, h, w = 2, 4, 3, 5
    logits = torch.randn(n, k, h, w)
    labels = torch.randint(0, k, (n, h, w))
    labels[0, 0, :3] = 255
    labels[1, 2, 4] = 255
    class_weight = [1.0, 2.0, 0.5, 3.0]
    ce = CrossEntropyLoss(class_weight=class_weight, avg_non_ignore=avg_non_ignore, label_smoothing=0.1)
    loss = ce(logits, labels)
    # Flatten to one row per pixel for the brute force.
    rows = logits.permute(0, 2, 3, 1).reshape(-1, k).tolist()
    flat = labels.reshape(-1).tolist()
    expected = _brute_hard(rows, flat, eps=0.1, class_weight=class_weight, avg_non_ignore=avg_non_ignore)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_ignore_index_of_a_real_class_is_not_ignored_for_image_labels():
    """ImageNet has a class 255: per-image labels of 1000-class logits are never ignored."""
    logits = torch.randn(3, 300)
    labels = torch.tensor([255, 3, 255])
    loss = CrossEntropyLoss()(logits, labels)
    assert loss.item() == pytest.approx(_brute_hard(logits.tolist(), labels.tolist(), ignore=None), rel=1e-5)
    # With fewer classes than the ignore index, it is ignored (and counted in the divisor).
    small = torch.randn(3, 4)
    expected = _brute_hard(small.tolist(), [255, 3, 255], avg_non_ignore=False)
    assert CrossEntropyLoss()(small, torch.tensor([255, 3, 255])).item() == pytest.approx(expected, rel=1e-5)


def test_all_ignored_gives_zero_with_gradient():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    labels = torch.full((1, 2, 2), 255)
    loss = CrossEntropyLoss()(logits, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None


def test_gradient_flows_for_soft_targets():
    logits = torch.randn(3, 4, requires_grad=True)
    CrossEntropyLoss()(logits, torch.full((3, 4), 0.25)).backward()
    assert logits.grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ConfigError, match="label_smoothing"):
        CrossEntropyLoss(label_smoothing=1.5)
    with pytest.raises(ConfigError, match="class_weight has 2 values"):
        CrossEntropyLoss(class_weight=[1.0, 2.0])(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="do not fit"):
        CrossEntropyLoss()(torch.randn(2, 3), torch.tensor([0, 1, 2]))


def test_default_averages_over_all_pixels_as_mmseg():
    # mmseg's CrossEntropyLoss (and the BEiT/MAE ADE20K recipe) divides by every pixel, ignored
    # ones included; avg_non_ignore=True divides by the labelled ones only.
    logits = torch.randn(2, 4, 3, 5)
    labels = torch.randint(0, 4, (2, 3, 5))
    labels[:, 0] = 255
    summed = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255, reduction="sum")
    assert CrossEntropyLoss()(logits, labels).item() == pytest.approx(summed.item() / labels.numel(), rel=1e-5)
    labelled = int((labels != 255).sum())
    assert CrossEntropyLoss(avg_non_ignore=True)(logits, labels).item() == pytest.approx(
        summed.item() / labelled, rel=1e-5)


def _dice_brute_force(logits, labels, smooth, exponent, ignore_index):
    """Per class, loops over every labelled pixel of the batch."""
    n, k, h, w = logits.shape
    prob = torch.softmax(logits.double(), 1)
    terms = []
    for c in range(k):
        inter = den_p = den_t = 0.0
        for i in range(n):
            for y in range(h):
                for x in range(w):
                    label = int(labels[i, y, x])
                    if label == ignore_index:
                        continue
                    p, t = float(prob[i, c, y, x]), float(label == c)
                    inter += p * t
                    den_p += p ** exponent
                    den_t += t ** exponent
        terms.append(1 - (2 * inter + smooth) / (den_p + den_t + smooth))
    return sum(terms) / k


@pytest.mark.parametrize("smooth, exponent", [(1.0, 2.0), (0.5, 1.0)])
def test_dice_matches_brute_force(smooth, exponent):
    from vitasks.models.losses import DiceLoss

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 5, 6, generator=gen)
    labels = torch.randint(0, 3, (2, 5, 6), generator=gen)  # class 3 absent: still counted
    labels[0, :2, :3] = 255
    loss = DiceLoss(loss_weight=0.7, smooth=smooth, exponent=exponent)(logits, labels)
    expected = 0.7 * _dice_brute_force(logits, labels, smooth, exponent, 255)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_dice_perfect_prediction_is_near_zero_and_head_uses_ignore_index():
    from vitasks.models.heads.seg_heads import FCNHead
    from vitasks.models.losses import DiceLoss

    labels = torch.tensor([[[0, 1], [2, 2]]])
    logits = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 50
    assert float(DiceLoss(smooth=0.0)(logits, labels)) == pytest.approx(0.0, abs=1e-6)
    head = FCNHead(in_channels=4, channels=4, num_classes=3, ignore_index=7,
                   loss_decode=[{"type": "CrossEntropyLoss"}, {"type": "DiceLoss", "loss_weight": 0.5}])
    assert head.loss_names == ["loss_ce_0", "loss_dice_1"]
    assert head.loss_decode[1].ignore_index == 7


def test_balanced_class_weight_equals_explicit_weights_from_the_batch_counts():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 4, 6, 7, generator=gen)
    labels = torch.zeros(2, 6, 7, dtype=torch.long)
    labels[0, :1, :2] = 1   # 2 pixels of class 1
    labels[1, 3:, 4:] = 2   # 9 pixels of class 2; class 3 absent
    labels[1, 0, :3] = 255  # ignored
    n = 2 * 6 * 7 - 3
    counts = {0: n - 11, 1: 2, 2: 9}
    expected_w = [math.sqrt(min(n / (3 * counts[k]), 10.0)) for k in range(3)] + [1.0]
    assert expected_w[1] == pytest.approx(math.sqrt(10.0))  # a rare class hits the cap
    balanced = CrossEntropyLoss(class_weight="balanced")(logits, labels)
    explicit = CrossEntropyLoss(class_weight=expected_w)(logits, labels)
    assert float(balanced) == pytest.approx(float(explicit), rel=1e-6)
    flat_logits = logits.permute(0, 2, 3, 1).reshape(-1, 4).tolist()
    brute = _brute_hard(flat_logits, labels.flatten().tolist(), class_weight=expected_w, avg_non_ignore=False)
    assert float(balanced) == pytest.approx(brute, rel=1e-5)
    with pytest.raises(ConfigError, match="balanced"):
        CrossEntropyLoss(class_weight="auto")
