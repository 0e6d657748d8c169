"""ConvStem3D (the hybrid video ViT's stem) against the same computation written out with
torch.nn.functional, and the video ViT built on it: strides checked against the tubelet, an image
hybrid's checkpoint inflated into it computing the image model on a static clip, and the
architecture record."""

import pytest
import torch
import torch.nn.functional as F

from vitasks.engine.architecture import architecture_from_config, architecture_mismatches
from vitasks.errors import ConfigError
from vitasks.models.backbones import ConvStem, ConvStem3D, VideoVisionTransformer, VisionTransformer

CHANNELS = [8, 8, 16, 16]
STRIDES = [1, 2, 1, 2]
TEMPORAL = [1, 1, 2, 1]


def _randomise_statistics(stem):
    for layer in stem.convs:  # non-trivial statistics, so the norm is part of what is compared
        layer.bn.running_mean.uniform_(-0.5, 0.5)
        layer.bn.running_var.uniform_(0.5, 2.0)
    return stem


def _by_hand(stem, x, pool: bool, temporal_kernels=(3, 3, 3, 3)):
    for layer, s, t, kt in zip(stem.convs, STRIDES, TEMPORAL, temporal_kernels):
        stride = (t, s, s)
        if pool and max(stride) > 1:
            x = F.max_pool3d(x, stride, ceil_mode=True)
        conv, bn = layer.conv, layer.bn
        assert conv.weight.shape[2:] == (kt, 3, 3)
        x = F.conv3d(x, conv.weight, None, stride=1 if pool else stride, padding=(kt // 2, 1, 1))
        x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)
        x = F.relu(x)
    return F.conv3d(x, stem.proj.weight, stem.proj.bias)


@pytest.mark.parametrize("downsample", ["maxpool", "conv"])
@pytest.mark.parametrize("size", [(4, 16, 16), (5, 17, 14)])
def test_matches_conv3d_bn_relu_written_out(downsample, size):
    torch.manual_seed(0)
    stem = _randomise_statistics(ConvStem3D(embed_dim=12, channels=CHANNELS, strides=STRIDES,
                                            temporal_strides=TEMPORAL, downsample=downsample)).eval()
    x = torch.randn(2, 3, *size)
    out = stem(x)
    T, H, W = size
    assert out.shape == (2, 12, -(-T // 2), -(-H // 4), -(-W // 4))  # ceil(size / stride) per dimension
    assert (stem.stride, stem.temporal_stride) == (4, 2)
    torch.testing.assert_close(out, _by_hand(stem, x, pool=downsample == "maxpool"), rtol=1e-5, atol=1e-5)


def test_temporal_kernel_sizes_one_then_three_is_frame_by_frame_first():
    """SlowFast's Slow-pathway layout: the first convs see one frame each (a 2D CNN on every
    frame), the later ones three."""
    torch.manual_seed(0)
    kernels = [1, 1, 3, 3]
    stem = _randomise_statistics(ConvStem3D(embed_dim=12, channels=CHANNELS, strides=STRIDES, temporal_strides=TEMPORAL,
                                            temporal_kernel_sizes=kernels, downsample="maxpool")).eval()
    x = torch.randn(2, 3, 4, 16, 16)
    torch.testing.assert_close(stem(x), _by_hand(stem, x, pool=True, temporal_kernels=kernels), rtol=1e-5, atol=1e-5)
    # Frame-by-frame: the first two layers' outputs at frame t depend only on frame t.
    early = stem.convs[1](stem.convs[0](x))
    shuffled = stem.convs[1](stem.convs[0](x[:, :, [2, 0, 3, 1]]))
    torch.testing.assert_close(shuffled, early[:, :, [2, 0, 3, 1]])


def test_without_temporal_strides_time_is_kept():
    stem = ConvStem3D(embed_dim=16, channels=CHANNELS, strides=STRIDES, proj=False).eval()
    assert stem.temporal_stride == 1
    assert stem(torch.randn(1, 3, 6, 16, 16)).shape == (1, 16, 6, 4, 4)
    assert [layer.conv.weight.shape[2:] for layer in stem.convs] == [(3, 3, 3)] * 4


@pytest.mark.parametrize("kwargs, match", [
    (dict(temporal_strides=[1, 2]), "one temporal stride per conv \\(4\\)"),
    (dict(norm="LN"), "LN is for image stems"),
    (dict(temporal_kernel_sizes=[1, 2, 3, 3]), "one odd temporal kernel size per conv"),
    (dict(kernel_size=2), "must be odd"),
])
def test_bad_settings_name_the_key(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ConvStem3D(embed_dim=16, channels=CHANNELS, strides=STRIDES, **kwargs)


HYBRID = dict(num_frames=4, img_size=16, patch_size=4, tubelet_size=2, embed_dim=16, depth=2, num_heads=2,
              class_token=False, pool="mean",
              stem=dict(type="ConvStem3D", channels=CHANNELS, strides=STRIDES, temporal_strides=TEMPORAL,
                        downsample="maxpool", proj=False))


def test_hybrid_video_vit_tokens_come_from_the_stem():
    torch.manual_seed(0)
    model = VideoVisionTransformer(**HYBRID).eval()
    assert isinstance(model.stem, ConvStem3D)
    x = torch.randn(2, 3, 4, 16, 16)
    cls, patches = model._embed(x)
    grid = model.stem(x)  # (B, C, t, h, w)
    expected = grid.flatten(3).permute(0, 2, 3, 1) + model._positions(2, (4, 4))[1]
    assert cls is None and patches.shape == (2, 2, 16, 16)
    torch.testing.assert_close(patches, expected)
    assert model(x)[0].shape == (2, 16)


@pytest.mark.parametrize("change, match", [
    (dict(tubelet_size=4), "temporal stride 2 but .*tubelet_size is 4; set tubelet_size: 2"),
    (dict(patch_size=8), "total stride 4 but .*patch_size is 8"),
    (dict(motion_energy=True), "motion_energy is an option of the tubelet embedding"),
    (dict(stem=dict(type="ConvStem3d")), "ConvStem3D"),  # misspelt: the registered name suggested
])
def test_hybrid_settings_that_disagree_are_config_errors(change, match):
    with pytest.raises(ConfigError, match=match):
        VideoVisionTransformer(**dict(HYBRID, **change))


def test_image_hybrid_checkpoint_inflates_into_the_video_hybrid():
    """An image ViT with a ConvStem loads into the video ViT with a ConvStem3D (every 3x3 kernel
    inflated to 3x3x3 on its central frame). On a static clip each time step of the stem is then
    the image stem on the frame (max-pooling identical frames keeps them), and with joint
    attention, no class token and zero temporal positions the pooled output is the image model's:
    every token appears once per time step, which leaves each attention average unchanged."""
    torch.manual_seed(0)
    image = VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, class_token=False,
                              pool="mean", stem=dict(type="ConvStem", channels=CHANNELS, strides=STRIDES,
                                                     downsample="maxpool", proj=False))
    _randomise_statistics(image.stem).eval()
    image.eval()
    video = VideoVisionTransformer(**HYBRID).eval()
    video.load_state_dict(image.state_dict())
    for name, param in video.stem.named_parameters():
        if param.ndim == 5:
            assert param[:, :, 0].abs().sum() == 0 and param[:, :, 2].abs().sum() == 0, name
    frame = torch.randn(1, 3, 16, 16)
    clip = frame.unsqueeze(2).expand(1, 3, 4, 16, 16).contiguous()
    stem_out = video.stem(clip)
    for t in range(stem_out.shape[2]):
        torch.testing.assert_close(stem_out[:, :, t], image.stem(frame), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(video(clip)[0], image(frame)[0], rtol=1e-4, atol=1e-5)


def test_architecture_records_the_stem():
    hybrid = dict(HYBRID, type="VideoVisionTransformer")
    record = architecture_from_config(hybrid)
    assert record["stem"] == dict(type="ConvStem3D", channels=CHANNELS, strides=STRIDES, temporal_strides=TEMPORAL,
                                  temporal_kernel_sizes=[3, 3, 3, 3], kernel_size=3, bn_eps=1e-5, downsample="maxpool")
    strided = dict(hybrid, stem=dict(HYBRID["stem"], downsample="conv"))
    keys = {key for key, _, _ in architecture_mismatches(record, architecture_from_config(strided))}
    assert keys == {"stem.downsample"}
    tubelets = dict(type="VideoVisionTransformer", num_frames=4, img_size=16, patch_size=4, tubelet_size=2,
                    embed_dim=16, depth=2, num_heads=2, motion_energy=True)
    plain = architecture_from_config(tubelets)
    assert plain["motion_energy"] is True and "stem" not in plain
    keys = {key for key, _, _ in architecture_mismatches(plain, architecture_from_config(dict(tubelets, motion_energy=False)))}
    assert keys == {"motion_energy"}


def test_image_conv_stem_is_unchanged_by_the_3d_variant():
    """ConvStem keeps 2D layers and its strides (the 3D variant shares its construction)."""
    stem = ConvStem(embed_dim=12, channels=CHANNELS, strides=STRIDES, downsample="maxpool")
    assert stem.conv_strides == ((1, 1), (2, 2), (1, 1), (2, 2))
    assert all(isinstance(layer.conv, torch.nn.Conv2d) for layer in stem.convs)
    assert isinstance(stem.convs[0].bn, torch.nn.BatchNorm2d) and isinstance(stem.proj, torch.nn.Conv2d)
