"""ImageClassifier modes, classification heads, ClsDataPreprocessor and Mixup/CutMix."""

import pytest
import torch
import torch.nn.functional as F

import vitasks.models  # noqa: F401  (registers everything)
from vitasks.errors import ConfigError
from vitasks.models.data_preprocessors import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClsDataPreprocessor,
    CutMix,
    Mixup,
)
from vitasks.models.heads.cls_heads import LinearClsHead, MLPClsHead
from vitasks.registry import MODELS
from vitasks.structures import DataSample

K = 5
TINY_VIT = dict(type="VisionTransformer", img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)


def build_classifier(head=None, **kwargs):
    cfg = dict(
        type="ImageClassifier",
        backbone=TINY_VIT,
        head=head or dict(type="LinearClsHead", num_classes=K, in_channels=32),
        **kwargs,
    )
    return MODELS.build(cfg)


def samples_with_labels(labels):
    out = []
    for y in labels:
        s = DataSample()
        s.gt_label = torch.tensor([y])
        out.append(s)
    return out


def test_tensor_mode_returns_logits_of_backbone_and_head():
    model = build_classifier()
    torch.nn.init.normal_(model.head.fc.weight)
    x = torch.randn(3, 3, 16, 16)
    logits = model(x, mode="tensor")
    assert logits.shape == (3, K)
    expected = model.head.fc(model.backbone(x)[-1])
    torch.testing.assert_close(logits, expected)


def test_linear_head_is_zero_initialised_and_named_fc():
    model = build_classifier()
    model.init_weights()
    assert torch.count_nonzero(model.head.fc.weight) == 0
    assert torch.count_nonzero(model.head.fc.bias) == 0
    keys = model.state_dict().keys()
    assert "head.fc.weight" in keys and "head.fc.bias" in keys
    # The state dict is backbone.* + head.* (preprocessor buffers are not saved).
    assert all(k.startswith(("backbone.", "head.")) for k in keys)
    assert torch.count_nonzero(model(torch.randn(2, 3, 16, 16), mode="tensor")) == 0


def test_mlp_head_is_hidden_tanh_fc():
    head = MLPClsHead(num_classes=K, in_channels=8, hidden_channels=6)
    assert torch.count_nonzero(head.fc.weight) == 0
    torch.nn.init.normal_(head.fc.weight)
    feats = torch.randn(4, 8)
    expected = torch.tanh(feats @ head.hidden.weight.T + head.hidden.bias) @ head.fc.weight.T + head.fc.bias
    torch.testing.assert_close(head((feats,)), expected)
    assert list(dict(head.named_children())) == ["loss_module", "hidden", "fc"]


def test_loss_mode_hard_labels_with_smoothing():
    model = build_classifier(
        head=dict(type="LinearClsHead", num_classes=K, in_channels=32,
                  loss=dict(type="CrossEntropyLoss", label_smoothing=0.1))
    )
    torch.nn.init.normal_(model.head.fc.weight)
    x = torch.randn(4, 3, 16, 16)
    labels = [0, 3, 4, 1]
    losses = model(x, samples_with_labels(labels), mode="loss")
    logits = model(x, mode="tensor")
    expected = F.cross_entropy(logits, torch.tensor(labels), label_smoothing=0.1)
    torch.testing.assert_close(losses["loss"], expected)


def test_loss_mode_soft_targets():
    model = build_classifier()
    torch.nn.init.normal_(model.head.fc.weight)
    x = torch.randn(3, 3, 16, 16)
    samples = samples_with_labels([0, 1, 2])
    targets = torch.softmax(torch.randn(3, K), dim=1)
    for s, t in zip(samples, targets):
        s.gt_score = t
    loss = model(x, samples, mode="loss")["loss"]
    logp = torch.log_softmax(model(x, mode="tensor"), dim=1)
    torch.testing.assert_close(loss, -(targets * logp).sum(dim=1).mean())


def test_predict_mode_fills_scores_and_labels():
    model = build_classifier()
    torch.nn.init.normal_(model.head.fc.weight, std=5.0)
    x = torch.randn(4, 3, 16, 16)
    out = model(x, samples_with_labels([0, 1, 2, 3]), mode="predict")
    logits = model(x, mode="tensor")
    assert len(out) == 4
    for i, s in enumerate(out):
        torch.testing.assert_close(s.pred_score, torch.softmax(logits[i], 0))
        assert s.pred_label.shape == (1,) and int(s.pred_label) == int(logits[i].argmax())
        assert int(s.gt_label) == i  # the input samples are kept and filled
    # Without samples, new ones are made.
    assert len(model(x, mode="predict")) == 4


def test_train_step_through_preprocessor_reduces_loss():
    """uint8 images + labels -> preprocessor -> loss; a few AdamW steps fit 6 images."""
    from mmengine.optim import OptimWrapper

    model = build_classifier(data_preprocessor=dict(type="ClsDataPreprocessor"))
    images = [torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8) for _ in range(6)]
    data = dict(inputs=images, data_samples=samples_with_labels([0, 1, 2, 3, 4, 0]))
    wrapper = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=3e-3))
    first = model.train_step(data, wrapper)["loss"].item()
    for _ in range(15):
        last = model.train_step(data, wrapper)["loss"].item()
    assert first == pytest.approx(torch.log(torch.tensor(float(K))).item(), rel=1e-4)  # zero head
    assert last < 0.5 * first
    preds = model.val_step(data)
    assert all("pred_score" in p for p in preds)


def test_preprocessor_stacks_and_normalises():
    pre = ClsDataPreprocessor()
    images = [torch.randint(0, 256, (3, 4, 6), dtype=torch.uint8) for _ in range(2)]
    out = pre(dict(inputs=images, data_samples=samples_with_labels([0, 1])), training=False)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = torch.stack([(im.float() - mean) / std for im in images])
    torch.testing.assert_close(out["inputs"], expected)
    google = ClsDataPreprocessor(mean=[127.5] * 3, std=[127.5] * 3)
    out = google(dict(inputs=[torch.full((3, 2, 2), 255, dtype=torch.uint8)]), training=False)
    torch.testing.assert_close(out["inputs"], torch.ones(1, 3, 2, 2))


def _distinct_batch(n, h=8, w=8):
    """n constant images (value 10 * (i + 1)) with labels i."""
    images = [torch.full((3, h, w), 10 * (i + 1), dtype=torch.uint8) for i in range(n)]
    return images, samples_with_labels(list(range(n)))


@pytest.mark.parametrize("seed", range(4))
def test_mixup_mixes_images_and_targets_alike(seed):
    torch.manual_seed(seed)
    n = 6
    pre = ClsDataPreprocessor(mean=None, std=None, num_classes=n,
                              batch_augments=dict(augments=[dict(type="Mixup", alpha=0.8)]))
    images, samples = _distinct_batch(n)
    out = pre(dict(inputs=images, data_samples=samples), training=True)
    for i, s in enumerate(out["data_samples"]):
        t = s.gt_score
        assert t.sum().item() == pytest.approx(1.0, abs=1e-6)
        assert (t > 0).sum() <= 2
        # Independent check: the image is the target-weighted mix of the source images.
        expected = sum(t[j] * images[j].float() for j in range(n))
        torch.testing.assert_close(out["inputs"][i], expected)


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_target_weight_equals_pasted_area(seed):
    torch.manual_seed(seed)
    n, h, w = 5, 12, 10
    pre = ClsDataPreprocessor(mean=None, std=None, num_classes=n,
                              batch_augments=dict(augments=[dict(type="CutMix", alpha=1.0)]))
    images, samples = _distinct_batch(n, h, w)
    out = pre(dict(inputs=images, data_samples=samples), training=True)
    for i, s in enumerate(out["data_samples"]):
        img = out["inputs"][i]
        pasted = img[0] != images[i][0, 0, 0].float()
        fraction = pasted.float().mean().item()
        t = s.gt_score
        assert t[i].item() == pytest.approx(1.0 - fraction, abs=1e-6)
        if fraction > 0:
            # The pasted pixels all come from one other image, whose class gets the rest.
            values = img[0][pasted].unique()
            assert len(values) == 1
            j = int(values.item()) // 10 - 1
            assert t[j].item() == pytest.approx(fraction, abs=1e-6)
            # The pasted region is a rectangle.
            ys, xs = pasted.nonzero(as_tuple=True)
            box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            assert box.item() == pasted.sum().item()


def test_cutmix_box_is_clipped_and_weights_exact():
    cm = CutMix()
    inputs = torch.arange(2 * 16, dtype=torch.float).view(2, 1, 4, 4)
    targets = torch.eye(2)
    box = cm.box(4, 4, lam=0.75, cy=0, cx=3)  # side ratio 0.5 -> 2x2 centred on a corner
    assert box == (0, 1, 2, 4)
    mixed, t = cm.mix(inputs, targets, box, torch.tensor([1, 0]))
    torch.testing.assert_close(mixed[0, 0, 0, 2:], inputs[1, 0, 0, 2:])
    torch.testing.assert_close(t[0], torch.tensor([1 - 2 / 16, 2 / 16]))


def test_mixup_fixed_lambda():
    inputs = torch.randn(3, 2, 4, 4)
    targets = torch.eye(3)
    perm = torch.tensor([2, 0, 1])
    mixed, t = Mixup().mix(inputs, targets, 0.3, perm)
    torch.testing.assert_close(mixed[0], 0.3 * inputs[0] + 0.7 * inputs[2])
    torch.testing.assert_close(t[0], torch.tensor([0.3, 0.0, 0.7]))


def test_batch_augment_choice_and_evaluation_untouched():
    n = 4
    images, samples = _distinct_batch(n)
    # probs summing to 0: never augment, but targets still become soft one-hot.
    pre = ClsDataPreprocessor(mean=None, std=None, num_classes=n,
                              batch_augments=dict(augments=[dict(type="Mixup")], probs=[0.0]))
    out = pre(dict(inputs=images, data_samples=samples), training=True)
    torch.testing.assert_close(out["inputs"], torch.stack(images).float())
    torch.testing.assert_close(torch.stack([s.gt_score for s in out["data_samples"]]), torch.eye(n))
    # Not in training: no augmentation, no gt_score.
    pre = ClsDataPreprocessor(mean=None, std=None, num_classes=n,
                              batch_augments=dict(augments=[dict(type="Mixup")], probs=[1.0]))
    images, samples = _distinct_batch(n)
    out = pre(dict(inputs=images, data_samples=samples), training=False)
    assert all("gt_score" not in s for s in out["data_samples"])


def test_preprocessor_config_errors():
    with pytest.raises(ConfigError, match="num_classes"):
        ClsDataPreprocessor(batch_augments=dict(augments=[dict(type="Mixup")]))
    with pytest.raises(ConfigError, match="unknown keys"):
        ClsDataPreprocessor(num_classes=3, batch_augments=dict(augments=[dict(type="Mixup")], prob=[1]))
    with pytest.raises(ConfigError, match="probs"):
        ClsDataPreprocessor(num_classes=3, batch_augments=dict(augments=[dict(type="Mixup")], probs=[0.6, 0.6]))
    with pytest.raises(ConfigError, match="alpha"):
        Mixup(alpha=0)
    pre = ClsDataPreprocessor(num_classes=2, batch_augments=dict(augments=[dict(type="Mixup")]))
    images, samples = _distinct_batch(3)
    with pytest.raises(ConfigError, match="outside"):
        pre(dict(inputs=images, data_samples=samples), training=True)


def test_head_errors():
    with pytest.raises(ConfigError, match="num_classes"):
        LinearClsHead(num_classes=0, in_channels=4)
    with pytest.raises(ValueError, match="pooled features"):
        LinearClsHead(num_classes=2, in_channels=4)(torch.randn(2, 3, 4))
    with pytest.raises(ConfigError, match="backbone"):
        MODELS.build(dict(type="ImageClassifier", backbone="vit", head=dict(type="LinearClsHead", num_classes=2, in_channels=4)))


@pytest.mark.parametrize("head", [dict(type="LinearClsHead", num_classes=K, in_channels=16),
                                  dict(type="MLPClsHead", num_classes=K, in_channels=16, hidden_channels=8)])
def test_head_width_mismatch_names_the_key(head):
    # The backbone gives 32 features; both heads say in_channels 16: one error naming the key,
    # not a matmul shape error from inside torch.
    model = build_classifier(head=head)
    with pytest.raises(ConfigError, match=r"model\.head\.in_channels.*backbone's width"):
        model(torch.randn(2, 3, 16, 16), mode="tensor")


def test_linear_head_init_std():
    """``init_std`` 0 (default): a zero head, so the backbone gets no gradient from the first
    step; ``> 0``: normal weights of that std, and the backbone learns from the first step."""
    zero = LinearClsHead(num_classes=K, in_channels=16)
    assert torch.count_nonzero(zero.fc.weight) == 0 and torch.count_nonzero(zero.fc.bias) == 0
    torch.manual_seed(0)
    wide = LinearClsHead(num_classes=1000, in_channels=256, init_std=0.05)
    assert abs(wide.fc.weight.std().item() - 0.05) < 0.001  # 256 000 draws
    assert abs(wide.fc.weight.mean().item()) < 0.001 and torch.count_nonzero(wide.fc.bias) == 0

    for init_std, learns in ((0.0, False), (0.05, True)):
        model = build_classifier(head=dict(type="LinearClsHead", num_classes=K, in_channels=32, init_std=init_std))
        model(torch.randn(2, 3, 16, 16), mode="tensor").logsumexp(1).sum().backward()
        grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
        assert any(g.abs().sum() > 0 for g in grads) == learns

    with pytest.raises(ConfigError, match=r"init_std must be a number in \[0, inf\)"):
        LinearClsHead(num_classes=K, in_channels=16, init_std=-0.1)
