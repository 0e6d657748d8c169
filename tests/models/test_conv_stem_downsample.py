"""ConvStem's ``downsample: maxpool``: a max-pool before each stride-s conv, the conv at stride 1,
checked against the same computation written out with torch.nn.functional."""

import pytest
import torch
import torch.nn.functional as F

from vitasks.errors import ConfigError
from vitasks.models.backbones.stems import ConvStem

CHANNELS = [8, 8, 16, 16]
STRIDES = [1, 2, 1, 2]


def _by_hand(stem: ConvStem, x: torch.Tensor) -> torch.Tensor:
    for layer, stride in zip(stem.convs, STRIDES):
        if stride > 1:
            x = F.max_pool2d(x, stride, ceil_mode=True)
        conv, bn = layer.conv, layer.bn
        x = F.conv2d(x, conv.weight, conv.bias, stride=1, padding=1)
        x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)
        x = F.relu(x)
    return F.conv2d(x, stem.proj.weight, stem.proj.bias)


@pytest.mark.parametrize("size", [(32, 32), (33, 30)])
def test_maxpool_downsampling_is_pool_then_stride_one_conv(size):
    torch.manual_seed(0)
    stem = ConvStem(embed_dim=12, channels=CHANNELS, strides=STRIDES, downsample="maxpool").eval()
    for layer in stem.convs:  # non-trivial statistics, so the norm is part of what is compared
        layer.bn.running_mean.uniform_(-0.5, 0.5)
        layer.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, *size)
    out = stem(x)
    expected = _by_hand(stem, x)
    assert out.shape == (2, 12, -(-size[0] // 4), -(-size[1] // 4))  # ceil(size / 4), as strided convs
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_maxpool_and_strided_stems_share_the_state_dict_but_not_the_output():
    torch.manual_seed(0)
    pooled = ConvStem(embed_dim=12, channels=CHANNELS, strides=STRIDES, downsample="maxpool").eval()
    strided = ConvStem(embed_dim=12, channels=CHANNELS, strides=STRIDES).eval()
    strided.load_state_dict(pooled.state_dict())  # same keys and shapes: parameter-free pooling
    x = torch.randn(1, 3, 32, 32)
    assert pooled(x).shape == strided(x).shape
    assert not torch.allclose(pooled(x), strided(x))


def test_unknown_downsample_names_the_key():
    with pytest.raises(ConfigError, match="downsample.*conv.*maxpool"):
        ConvStem(embed_dim=12, channels=CHANNELS, strides=STRIDES, downsample="avg")


def test_without_proj_the_tokens_are_the_last_convs_outputs():
    torch.manual_seed(0)
    stem = ConvStem(embed_dim=16, channels=CHANNELS, strides=STRIDES, downsample="maxpool", proj=False).eval()
    x = torch.randn(2, 3, 32, 32)
    assert not any(k.startswith("proj.") for k in stem.state_dict())
    expected = x
    for layer, stride in zip(stem.convs, STRIDES):
        expected = layer(F.max_pool2d(expected, stride, ceil_mode=True) if stride > 1 else expected)
    torch.testing.assert_close(stem(x), expected)
    assert (stem(x) >= 0).all()  # ReLU outputs, no linear map after them


def test_without_proj_the_last_width_must_be_embed_dim():
    with pytest.raises(ConfigError, match="proj: false.*16 channels.*embed_dim \\(12\\)"):
        ConvStem(embed_dim=12, channels=CHANNELS, strides=STRIDES, proj=False)
