"""Multi-level neck strides and the decode heads' output shapes and losses."""

import pytest
import torch

import vitasks.models  # noqa: F401  (registers everything)
from vitasks.errors import ConfigError
from vitasks.models.heads.decode_head import BaseDecodeHead
from vitasks.registry import MODELS
from vitasks.structures import DataSample, PixelData

K = 5
C = 32
TINY_VIT = dict(type="VisionTransformer", img_size=64, patch_size=16, embed_dim=C, depth=4, num_heads=2,
                out_indices=[0, 1, 2, 3])


def vit_maps(batch=2, size=64):
    backbone = MODELS.build(TINY_VIT)
    return backbone(torch.randn(batch, 3, size, size))


def test_neck_output_strides():
    maps = vit_maps(size=64)  # stride 16: 4x4 maps
    assert [tuple(m.shape) for m in maps] == [(2, C, 4, 4)] * 4
    neck = MODELS.build(dict(type="Feature2Pyramid", embed_dim=C, rescales=[4, 2, 1, 0.5]))
    outs = neck(maps)
    # strides 4, 8, 16, 32 of a 64-pixel input
    assert [tuple(o.shape[-2:]) for o in outs] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert all(o.shape[:2] == (2, C) for o in outs)
    # level 2 is the identity, level 3 a 2x2 max-pool
    assert torch.equal(outs[2], maps[2])
    assert torch.equal(outs[3], torch.nn.functional.max_pool2d(maps[3], 2))
    with pytest.raises(ConfigError, match="2 feature maps for 4 rescales"):
        neck(maps[:2])
    with pytest.raises(ConfigError, match="rescales must be among"):
        MODELS.build(dict(type="Feature2Pyramid", embed_dim=C, rescales=[3]))


def pyramid(batch=2):
    shapes = [16, 8, 4, 2]
    return tuple(torch.randn(batch, C, s, s) for s in shapes)


HEADS = {
    "UPerHead": (dict(type="UPerHead", in_channels=[C] * 4, in_index=[0, 1, 2, 3], channels=16,
                      pool_scales=[1, 2, 3, 6], num_classes=K), "pyramid", (16, 16)),
    "FCNHead": (dict(type="FCNHead", in_channels=C, in_index=2, channels=8, num_convs=1,
                     concat_input=False, num_classes=K), "pyramid", (4, 4)),
    "FCNHead_concat": (dict(type="FCNHead", in_channels=C, in_index=1, channels=8, num_convs=2,
                            concat_input=True, num_classes=K), "pyramid", (8, 8)),
    "SETRPUPHead": (dict(type="SETRPUPHead", in_channels=C, channels=8, in_index=3, num_convs=4,
                         up_scale=2, num_classes=K, dropout_ratio=0.0), "vit", (64, 64)),
    "SETRPUPHead_aux": (dict(type="SETRPUPHead", in_channels=C, channels=8, in_index=0, num_convs=2,
                             up_scale=4, num_classes=K), "vit", (64, 64)),
    "SegmenterLinearHead": (dict(type="SegmenterLinearHead", in_channels=C, num_classes=K), "vit", (4, 4)),
    "SegmenterMaskHead": (dict(type="SegmenterMaskHead", in_channels=C, embed_dims=16, num_layers=2,
                               num_heads=2, num_classes=K), "vit", (4, 4)),
}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_output_shape_and_loss(name):
    cfg, inputs, size = HEADS[name]
    head = MODELS.build(cfg)
    assert isinstance(head, BaseDecodeHead)
    feats = pyramid() if inputs == "pyramid" else vit_maps()
    logits = head(feats)
    assert tuple(logits.shape) == (2, K) + size
    labels = torch.randint(0, K, (2, 1, 64, 64))
    labels[:, :, :8] = 255
    samples = [DataSample(gt_sem_seg=PixelData(data=labels[i])) for i in range(2)]
    losses = head.loss(feats, samples)
    assert set(losses) == {"loss_ce", "acc_seg"}
    assert torch.isfinite(losses["loss_ce"]) and 0 <= losses["acc_seg"] <= 100
    losses["loss_ce"].backward()
    # In eval mode (no dropout, fixed BN) the loss is the cross-entropy of the bilinearly
    # upsampled logits over the non-ignored pixels.
    head.eval()
    with torch.no_grad():
        eval_loss = head.loss(feats, samples)["loss_ce"]
        up = torch.nn.functional.interpolate(head(feats), size=(64, 64), mode="bilinear", align_corners=False)
    expected = torch.nn.functional.cross_entropy(up, labels[:, 0], ignore_index=255)
    assert eval_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_mask_head_masks_are_normalised_products():
    head = MODELS.build(HEADS["SegmenterMaskHead"][0]).eval()
    feats = vit_maps()
    masks = head(feats)
    # Undo the final LayerNorm over classes: rows of the raw cosine matrix lie in [-1, 1], so
    # the normalised masks have zero mean over classes.
    assert torch.allclose(masks.mean(dim=1), torch.zeros(2, 4, 4), atol=1e-5)
    assert head.cls_emb.shape == (1, K, 16)


def test_head_config_errors():
    with pytest.raises(ConfigError, match="in_index 7 is out of range"):
        MODELS.build(dict(type="FCNHead", in_channels=C, channels=8, in_index=7, num_classes=K))(pyramid())
    with pytest.raises(ConfigError, match="num_classes"):
        MODELS.build(dict(type="FCNHead", in_channels=C, channels=8, num_classes=0))
    with pytest.raises(ConfigError, match="in_index"):
        MODELS.build(dict(type="UPerHead", in_channels=[C] * 4, in_index=[0, 1], channels=8, num_classes=K))


def test_loss_options_class_weight_and_all_ignored():
    head = MODELS.build(dict(
        type="SegmenterLinearHead", in_channels=C, num_classes=K,
        loss_decode=dict(type="CrossEntropyLoss", class_weight=[1.0, 2.0, 1.0, 1.0, 0.5], avg_non_ignore=True),
    ))
    feats = vit_maps()
    labels = torch.full((2, 1, 64, 64), 255)
    samples = [DataSample(gt_sem_seg=PixelData(data=labels[i])) for i in range(2)]
    losses = head.loss(feats, samples)
    assert losses["loss_ce"].item() == 0.0 and losses["acc_seg"].item() == 0.0
