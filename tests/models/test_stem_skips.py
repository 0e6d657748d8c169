"""StemSkipViT (the stem's maps as skips) and CascadedUpHead (TransUNet's cascaded upsampler):
shapes, the skips are the stem layers' own outputs, the decoder reads them, and the errors."""

import pytest
import torch
import torch.nn.functional as F

import vitasks.models  # noqa: F401  (registers everything)
from vitasks.errors import ConfigError
from vitasks.registry import MODELS
from vitasks.structures import DataSample, PixelData

K = 4
STEM = dict(type="ConvStem", channels=[8, 8, 16, 24], strides=[2, 1, 2, 2])  # stride 8
VIT = dict(type="VisionTransformer", img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2,
           out_indices=[1], stem=STEM)


def skip_vit(**kw):
    torch.manual_seed(0)
    return MODELS.build(dict(VIT, type="StemSkipViT", stem_skips=["convs.1", "convs.2"], **kw)).eval()


def test_skips_are_the_stem_layers_outputs_then_the_block_maps():
    model = skip_vit()
    plain = MODELS.build(VIT).eval()
    assert set(plain.state_dict()) == set(model.state_dict())  # the same weights: checkpoints swap
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outs = model(x)
        convs = model.stem.convs
        s2 = convs[1](convs[0](x))  # the stem by hand: layers 0-1 (stride 2), layer 2 (stride 4)
        s4 = convs[2](s2)
        expected_blocks = plain(x)
    assert [tuple(o.shape) for o in outs] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 24, 4, 4)]
    torch.testing.assert_close(outs[0], s2)
    torch.testing.assert_close(outs[1], s4)
    torch.testing.assert_close(outs[2], expected_blocks[0])
    # The hooks live for one call only.
    assert all(not m._forward_hooks for m in model.stem.modules())
    # No skips: exactly the VisionTransformer's outputs.
    none = MODELS.build(dict(VIT, type="StemSkipViT")).eval()
    none.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(none(x)[0], expected_blocks[0])
        assert len(none(x)) == 1


def test_skip_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"stem_skips.*no submodule \['convs.9'\].*convs.0"):
        MODELS.build(dict(VIT, type="StemSkipViT", stem_skips=["convs.9"]))
    with pytest.raises(ConfigError, match="stem_skips needs .*out_indices"):
        MODELS.build(dict(VIT, type="StemSkipViT", stem_skips=["convs.1"], out_indices=None))
    with pytest.raises(ConfigError, match="stem_skips must be a list"):
        MODELS.build(dict(VIT, type="StemSkipViT", stem_skips="convs.1"))
    with pytest.raises(ConfigError, match="twice"):
        MODELS.build(dict(VIT, type="StemSkipViT", stem_skips=["convs.1", "convs.1"]))


HEAD = dict(type="CascadedUpHead", in_channels=[8, 16, 24], in_index=[0, 1, 2], channels=8,
            level_channels=[8, 12, 16], num_classes=K, dropout_ratio=0.0)


def test_cascaded_up_head_matches_a_hand_computation():
    torch.manual_seed(0)
    head = MODELS.build(HEAD).eval()
    feats = (torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8), torch.randn(2, 24, 4, 4))
    with torch.no_grad():
        logits = head(feats)
        # U-Net's expanding path by hand: coarsest conv, then (upsample 2x, concatenate, conv) per level.
        x = head.fuse[2](feats[2])
        x = head.fuse[1](torch.cat([F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False), feats[1]], 1))
        x = head.fuse[0](torch.cat([F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False), feats[0]], 1))
        expected = head.conv_seg(x)
    assert logits.shape == (2, K, 16, 16)
    torch.testing.assert_close(logits, expected)
    assert [m[0].conv.in_channels for m in head.fuse] == [12 + 8, 16 + 16, 24]


def test_each_skip_reaches_the_logits_where_it_lies():
    """A change in one pixel of a skip map changes the logits there and not far away: the
    decoder reads the fine maps at their own resolution (a stride-8 head could not)."""
    torch.manual_seed(0)
    head = MODELS.build(HEAD).eval()
    feats = [torch.randn(1, 8, 16, 16), torch.randn(1, 16, 8, 8), torch.randn(1, 24, 4, 4)]
    with torch.no_grad():
        base = head(feats)
        for level, (y, x) in ((0, (3, 12)), (1, (5, 2))):
            changed = [f.clone() for f in feats]
            changed[level][0, :, y, x] += 5.0
            diff = (head(changed) - base).abs().sum(1)[0]  # (16, 16)
            scale = 16 // feats[level].shape[-1]
            fy, fx = y * scale, x * scale
            assert diff[max(0, fy - 1):fy + scale + 1, max(0, fx - 1):fx + scale + 1].sum() > 0
            far = diff.clone()
            reach = 2 * scale + 2  # 3x3 convs at each finer level and the 2x upsampling
            far[max(0, fy - reach):fy + reach + 1, max(0, fx - reach):fx + reach + 1] = 0
            assert far.abs().max() == 0


def test_segmentor_with_skips_learns_from_its_loss():
    torch.manual_seed(0)
    model = MODELS.build(dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreprocessor", mean=[0.0] * 3, std=[1.0] * 3),
        backbone=dict(VIT, type="StemSkipViT", stem_skips=["convs.1", "convs.2"]),
        decode_head=dict(HEAD, align_corners=False),
    ))
    x = torch.randn(2, 3, 32, 32)
    assert model(x, mode="tensor").shape == (2, K, 16, 16)  # stride 2: the finest skip's
    samples = [DataSample(gt_sem_seg=PixelData(data=torch.randint(0, K, (1, 32, 32)))) for _ in range(2)]
    losses = model(x, samples, mode="loss")
    losses["decode.loss_ce"].backward()
    # The stem layers that give the skips get gradient through them (layer 1 feeds only the
    # skip and layer 2), and so does every decoder level.
    assert model.backbone.stem.convs[1].conv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decode_head.parameters())


def test_head_errors():
    with pytest.raises(ConfigError, match="at least two levels"):
        MODELS.build(dict(HEAD, in_channels=[24], in_index=[0], level_channels=None))
    with pytest.raises(ConfigError, match="level_channels: one width per level"):
        MODELS.build(dict(HEAD, level_channels=[8, 12]))
    with pytest.raises(ConfigError, match=r"level_channels\[0\] \(12\).*channels \(8\)"):
        MODELS.build(dict(HEAD, level_channels=[12, 12, 16]))

