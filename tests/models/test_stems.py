import math

import pytest
import torch
import torch.nn.functional as F

from vitasks.errors import ConfigError
from vitasks.models.backbones import ConvStem, PatchEmbed, ResNetStem, VisionTransformer
from vitasks.models.backbones.stems import (
    CONV_STEM_PRESETS,
    MaxPool2dSame,
    StdConv2dSame,
    same_padding,
)
from vitasks.registry import MODELS

SIZES = [(32, 32), (48, 48), (64, 96)]


def tiny_resnet_stem(**kw):
    # Same structure as the R50 hybrid (3 stages, stride 16), a fraction of its width.
    cfg = dict(in_channels=3, embed_dim=32, layers=(1, 1, 2), widths=(32, 64, 64), stem_channels=16, num_groups=8)
    cfg.update(kw)
    return ResNetStem(**cfg)


def test_stems_are_registered():
    for name in ("PatchEmbed", "ConvStem", "ResNetStem", "VisionTransformer"):
        assert MODELS.get(name) is not None


@pytest.mark.parametrize("size", SIZES)
def test_patch_embed_grid(size):
    stem = PatchEmbed(3, 32, patch_size=16)
    assert stem.stride == 16
    out = stem(torch.randn(2, 3, *size))
    assert out.shape == (2, 32, size[0] // 16, size[1] // 16)
    # Equals a linear projection of each flattened 16x16 patch.
    x = torch.randn(1, 3, 32, 32)
    patch = x[0, :, 16:32, 0:16].reshape(-1)
    expected = stem.proj.weight.reshape(32, -1) @ patch + stem.proj.bias
    torch.testing.assert_close(stem(x)[0, :, 1, 0], expected, rtol=1e-5, atol=1e-5)


def test_conv_stem_presets_follow_the_paper():
    assert CONV_STEM_PRESETS["1GF"]["channels"] == (24, 48, 96, 192)
    assert CONV_STEM_PRESETS["4GF"]["channels"] == (48, 96, 192, 384)
    assert CONV_STEM_PRESETS["18GF"]["channels"] == (64, 128, 128, 256, 256, 512)
    for name, preset in CONV_STEM_PRESETS.items():
        assert len(preset["channels"]) == len(preset["strides"]), name
        assert math.prod(preset["strides"]) == 16, name
        assert ConvStem(3, 32, preset=name).stride == 16


@pytest.mark.parametrize("preset", ["1GF", "18GF"])
@pytest.mark.parametrize("size", SIZES)
def test_conv_stem_grid(preset, size):
    stem = ConvStem(3, 32, preset=preset).eval()
    out = stem(torch.randn(1, 3, *size))
    assert out.shape == (1, 32, size[0] // 16, size[1] // 16)


def test_conv_stem_structure_and_names():
    stem = ConvStem(3, 40, channels=[8, 16], strides=[2, 2])
    assert stem.stride == 4
    names = set(stem.state_dict())
    assert {"convs.0.conv.weight", "convs.0.bn.weight", "convs.0.bn.running_mean", "convs.1.conv.weight",
            "proj.weight", "proj.bias"} <= names
    assert "convs.0.conv.bias" not in names
    assert stem.convs[1].conv.stride == (2, 2) and stem.proj.kernel_size == (1, 1)
    # Odd sizes: each stride-2 3x3 conv (padding 1) gives ceil(size / 2).
    assert stem(torch.randn(1, 3, 13, 9)).shape == (1, 40, 4, 3)


def test_conv_stem_default_preset_by_width():
    assert ConvStem(3, 192).channels == CONV_STEM_PRESETS["1GF"]["channels"]
    assert ConvStem(3, 768).channels == CONV_STEM_PRESETS["18GF"]["channels"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(preset="2GF"), "unknown preset"),
        (dict(preset="1GF", channels=[8]), "either"),
        (dict(channels=[8, 16], strides=[2]), "one stride per conv"),
        (dict(channels=[8, 16]), "both"),
        (dict(channels=[8, 16], strides=[2, 0]), "strides"),
        (dict(channels=[8, "a"], strides=[2, 2]), "channels"),
        (dict(channels=[8], strides=[2], kernel_size=2), "odd"),
        (dict(), "embed_dim 32"),
    ],
)
def test_conv_stem_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ConvStem(3, 32, **kwargs)


def test_backbone_checks_stem_stride_against_patch_size():
    with pytest.raises(ConfigError, match="set patch_size: 8"):
        VisionTransformer(img_size=32, embed_dim=32, depth=1, num_heads=2,
                          stem=dict(type="ConvStem", channels=[8, 16, 16], strides=[2, 2, 2]))
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                            stem=dict(type="ConvStem", channels=[8, 16, 16], strides=[2, 2, 2]))
    assert vit.stride == 8 and vit.grid_size == (4, 4)


@pytest.mark.parametrize(
    "stem,match",
    [
        (dict(type="PatchEmbedd"), "not a registered"),
        ("PatchEmbed", "must be a dict"),
        (dict(type="ConvStem", preset="1GF", bogus=1), "unknown arguments"),
        (dict(type="PatchEmbed", embed_dim=64), "set it on model.backbone"),
    ],
)
def test_backbone_bad_stem_config(stem, match):
    with pytest.raises(ConfigError, match=match):
        VisionTransformer(img_size=32, embed_dim=32, depth=1, num_heads=2, stem=stem)


def test_same_padding_formula():
    # TensorFlow: out = ceil(in / s); total pad = max((out - 1) * s + k - in, 0), extra pixel after.
    assert same_padding(224, 7, 2) == (2, 3)
    assert same_padding(112, 3, 2) == (0, 1)
    assert same_padding(113, 3, 2) == (1, 1)
    assert same_padding(56, 3, 1) == (1, 1)
    assert same_padding(7, 1, 2) == (0, 0)
    for size in range(5, 40):
        for k, s in [(7, 2), (3, 2), (3, 1), (1, 2)]:
            before, after = same_padding(size, k, s)
            assert after - before in (0, 1)
            assert (size + before + after - k) // s + 1 == math.ceil(size / s)


def test_std_conv_same_matches_explicit_padding_and_standardisation():
    conv = StdConv2dSame(3, 8, 7, stride=2, eps=1e-8)
    x = torch.randn(1, 3, 21, 18)
    w = conv.weight
    w_std = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / torch.sqrt(w.var(dim=(1, 2, 3), unbiased=False, keepdim=True) + 1e-8)
    # Height 21 -> out 11, pad 10 * 2 + 7 - 21 = 6 = (3, 3); width 18 -> out 9, pad 5 = (2, 3).
    expected = F.conv2d(F.pad(x, [2, 3, 3, 3]), w_std, None, stride=2)
    out = conv(x)
    assert out.shape == (1, 8, 11, 9)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    flat = conv.standardized_weight().reshape(8, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.var(1, unbiased=False), torch.ones(8), atol=1e-4, rtol=0)


def test_std_conv_std_form_matches_hand_written_standardisation():
    # Google's StdConv: subtract the filter mean, divide by the population std plus eps.
    conv = StdConv2dSame(4, 6, 3, stride=1, eps=1e-3, ws_form="std")
    with torch.no_grad():
        conv.weight.mul_(1e-2)  # small filters: eps inside or outside the root differ visibly
    w = conv.weight.detach().double()
    expected_w = torch.empty_like(w)
    for o in range(6):
        f = w[o]
        centred = f - f.sum() / f.numel()
        std = math.sqrt(float((centred ** 2).sum()) / f.numel())
        expected_w[o] = centred / (std + 1e-3)
    torch.testing.assert_close(conv.standardized_weight().double(), expected_w, rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 4, 9, 10)
    torch.testing.assert_close(conv(x), F.conv2d(x, expected_w.float(), padding=1), rtol=1e-4, atol=1e-4)
    var_form = StdConv2dSame(4, 6, 3, eps=1e-3)
    var_form.load_state_dict(conv.state_dict())
    assert (var_form.standardized_weight() - conv.standardized_weight()).abs().max() > 1e-2


def test_resnet_stem_ws_form_reaches_every_conv():
    stem = tiny_resnet_stem(ws_form="std", ws_eps=1e-5, gn_eps=1e-6)
    convs = [m for m in stem.modules() if isinstance(m, StdConv2dSame)]
    assert len(convs) == 1 + 3 * 4 + 3  # root, 4 bottlenecks x 3, 3 projection shortcuts
    assert all(c.ws_form == "std" and c.eps == 1e-5 for c in convs)
    assert all(c.ws_form == "var" for c in tiny_resnet_stem().modules() if isinstance(c, StdConv2dSame))


def test_ws_form_errors():
    with pytest.raises(ConfigError, match=r"model.backbone.stem.ws_form of StdConv2dSame must be one of \['var', 'std'\]"):
        StdConv2dSame(3, 8, 3, ws_form="google")
    with pytest.raises(ConfigError, match=r"model.backbone.stem.ws_form of ResNetStem .*got 'rsqrt'"):
        tiny_resnet_stem(ws_form="rsqrt")


def test_max_pool_same_ignores_padding():
    pool = MaxPool2dSame(3, 2)
    x = -1 - torch.rand(1, 2, 6, 7)  # all negative: zero padding would leak 0 into the borders
    out = pool(x)
    assert out.shape == (1, 2, 3, 4)
    assert (out < 0).all()
    # 6 -> pad (0, 1); 7 -> pad (1, 1): window for output (2, 0) covers rows 4..5, cols 0..1.
    torch.testing.assert_close(out[0, :, 2, 0], x[0, :, 4:6, 0:2].amax(dim=(1, 2)))


@pytest.mark.parametrize("size", SIZES + [(33, 50), (17, 31)])
def test_resnet_stem_grid_is_ceil(size):
    stem = tiny_resnet_stem().eval()
    assert stem.stride == 16
    out = stem(torch.randn(1, 3, *size))
    assert out.shape == (1, 32, math.ceil(size[0] / 16), math.ceil(size[1] / 16))


def test_resnet_stem_r50_names_and_shapes():
    stem = ResNetStem(3, 48)
    sd = stem.state_dict()
    assert sd["backbone.stem.conv.weight"].shape == (64, 3, 7, 7)
    assert sd["backbone.stem.norm.weight"].shape == (64,)
    assert sd["backbone.stages.0.blocks.0.downsample.conv.weight"].shape == (256, 64, 1, 1)
    assert sd["backbone.stages.0.blocks.0.downsample.norm.bias"].shape == (256,)
    assert sd["backbone.stages.0.blocks.0.conv1.weight"].shape == (64, 64, 1, 1)
    assert sd["backbone.stages.1.blocks.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert sd["backbone.stages.2.blocks.8.conv3.weight"].shape == (1024, 256, 1, 1)
    assert sd["backbone.stages.2.blocks.8.norm3.weight"].shape == (1024,)
    assert sd["proj.weight"].shape == (48, 1024, 1, 1) and sd["proj.bias"].shape == (48,)
    assert [len(s.blocks) for s in stem.backbone.stages] == [3, 4, 9]
    assert not any(k.endswith("conv1.bias") or k.endswith("conv.bias") for k in sd if k.startswith("backbone."))
    assert not any("downsample" in k for k in sd if ".blocks.1." in k)
    # Strides 2 (root conv) * 2 (pool) * 1 * 2 * 2; the stride sits in conv2 and the shortcut.
    assert stem.backbone.stages[1].blocks[0].conv2.stride == (2, 2)
    assert stem.backbone.stages[1].blocks[0].downsample.conv.stride == (2, 2)
    assert stem.backbone.stages[0].blocks[0].conv2.stride == (1, 1)
    assert stem.backbone.stem.conv.eps == 1e-8
    assert stem.backbone.stem.norm.num_groups == 32


def test_resnet_stem_block_is_post_activation():
    stem = tiny_resnet_stem().eval()
    block = stem.backbone.stages[1].blocks[0]
    x = torch.randn(1, 32, 8, 8)

    def gn(norm, t):
        return F.group_norm(t, norm.num_groups, norm.weight, norm.bias, norm.eps)

    h = F.relu(gn(block.norm1, block.conv1(x)))
    h = F.relu(gn(block.norm2, block.conv2(h)))
    h = gn(block.norm3, block.conv3(h))
    shortcut = gn(block.downsample.norm, block.downsample.conv(x))
    torch.testing.assert_close(block(x.clone()), F.relu(h + shortcut), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(layers=[]), "must not be empty"),
        (dict(layers=[3, 4], widths=[32, 64, 64]), "widths"),
        (dict(layers=[1, 1, 1, 1, 1], widths=None), "give `widths`"),
        (dict(widths=(32, 64, 60)), "divisible by num_groups"),
    ],
)
def test_resnet_stem_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        tiny_resnet_stem(**kwargs)


@pytest.mark.parametrize(
    "stem",
    [
        dict(type="ConvStem", preset="1GF"),
        dict(type="ResNetStem", layers=[1, 1, 1], widths=[32, 64, 64], stem_channels=16, num_groups=8),
    ],
)
def test_vit_with_each_stem(stem):
    vit = MODELS.build(dict(type="VisionTransformer", img_size=32, embed_dim=32, depth=1, num_heads=2, stem=stem)).eval()
    assert vit.stride == 16
    (pooled,) = vit(torch.randn(2, 3, 48, 64))
    assert pooled.shape == (2, 32)
    assert vit.get_layer_id("stem.proj.weight") == 0
