"""One conv + BN + ReLU block, shared by the conv stem and the decode heads."""

import torch
import torch.nn.functional as F

from vitasks.models.backbones import stems
from vitasks.models.heads import seg_heads
from vitasks.models.layers import ConvBNReLU


def test_stem_and_heads_use_the_same_class():
    stem = stems.ConvStem(in_channels=3, embed_dim=16, channels=[8, 8], strides=[2, 2])
    head = seg_heads.FCNHead(in_channels=8, channels=4, num_classes=3, num_convs=1)
    assert all(type(m) is ConvBNReLU for m in stem.convs)
    assert type(head.convs[0]) is ConvBNReLU and type(head.conv_cat) is ConvBNReLU


def test_forward_is_conv_then_batchnorm_then_relu():
    torch.manual_seed(0)
    block = ConvBNReLU(3, 5, 3, stride=2, dilation=2, bn_eps=1e-3).eval()
    block.bn.running_mean.normal_()
    block.bn.running_var.uniform_(0.5, 2.0)
    block.bn.weight.data.normal_()
    block.bn.bias.data.normal_()
    x = torch.randn(2, 3, 11, 9)
    conv = F.conv2d(x, block.conv.weight, stride=2, padding=2, dilation=2)
    bn = F.batch_norm(conv, block.bn.running_mean, block.bn.running_var, block.bn.weight, block.bn.bias,
                      training=False, eps=1e-3)
    torch.testing.assert_close(block(x), bn.clamp(min=0))
    assert block.conv.bias is None


def test_state_dict_names_and_old_head_checkpoints_load():
    block = ConvBNReLU(4, 6, 3, kaiming_init=True)
    assert set(block.state_dict()) == {
        "conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked",
    }
    # The heads' former nn.Sequential block saved its conv as `0.weight` and its BN as `1.*`.
    head = seg_heads.FCNHead(in_channels=4, channels=6, num_classes=3, num_convs=1, concat_input=False)
    old = {}
    for key, value in head.state_dict().items():
        old[key.replace(".conv.", ".0.").replace(".bn.", ".1.")] = torch.randn_like(value.float()).to(value.dtype)
    assert "convs.0.0.weight" in old
    result = head.load_state_dict(old, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(head.convs[0].conv.weight, old["convs.0.0.weight"])
    torch.testing.assert_close(head.convs[0].bn.running_var, old["convs.0.1.running_var"])


def test_head_blocks_are_kaiming_initialised_and_stem_blocks_keep_torch_defaults():
    torch.manual_seed(0)
    head = seg_heads.FCNHead(in_channels=64, channels=256, num_classes=3, num_convs=1, concat_input=False)
    weight = head.convs[0].conv.weight
    fan_out = weight.shape[0] * weight.shape[2] * weight.shape[3]
    # Kaiming normal, fan_out, ReLU gain: std = sqrt(2 / fan_out).
    assert abs(weight.std().item() / (2.0 / fan_out) ** 0.5 - 1) < 0.05
    stem = stems.ConvStem(in_channels=64, embed_dim=16, channels=[256], strides=[2])
    weight = stem.convs[0].conv.weight
    fan_in = weight.shape[1] * weight.shape[2] * weight.shape[3]
    # PyTorch's default: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    assert weight.abs().max().item() <= fan_in ** -0.5
    assert abs(weight.std().item() / (fan_in ** -0.5 / 3 ** 0.5) - 1) < 0.05


def test_layer_and_group_norm_options_match_their_formulas_in_train_and_eval():
    """norm="LN": each pixel's channels standardised; norm="GN": groups of 8 channels over the
    whole map; both computed by hand, identical in train and eval mode (no running statistics)."""
    import pytest

    from vitasks.errors import ConfigError

    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 6)
    for norm in ("LN", "GN"):
        block = ConvBNReLU(3, 16, 3, norm=norm, bn_eps=1e-5)
        block.bn.weight.data.normal_()
        block.bn.bias.data.normal_()
        conv = F.conv2d(x, block.conv.weight, padding=1)
        if norm == "LN":
            mean = conv.mean(dim=1, keepdim=True)
            var = conv.var(dim=1, unbiased=False, keepdim=True)
            normed = (conv - mean) / torch.sqrt(var + 1e-5)
        else:
            groups = conv.reshape(2, 2, 8, 7, 6)  # 16 channels -> 2 groups of 8
            mean = groups.mean(dim=(2, 3, 4), keepdim=True)
            var = groups.var(dim=(2, 3, 4), unbiased=False, keepdim=True)
            normed = ((groups - mean) / torch.sqrt(var + 1e-5)).reshape(2, 16, 7, 6)
        expected = (normed * block.bn.weight[:, None, None] + block.bn.bias[:, None, None]).clamp(min=0)
        torch.testing.assert_close(block.train()(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(block.eval()(x), expected, rtol=1e-4, atol=1e-5)
        assert set(block.state_dict()) == {"conv.weight", "bn.weight", "bn.bias"}
    stem = stems.ConvStem(in_channels=3, embed_dim=16, channels=[8, 8], strides=[2, 2], norm="LN")
    assert stem(x).shape == (2, 16, 2, 2)
    with pytest.raises(ConfigError, match=r"stem\.norm.*BN, LN, GN.*'batchnorm'"):
        stems.ConvStem(in_channels=3, embed_dim=16, channels=[8], strides=[2], norm="batchnorm")
