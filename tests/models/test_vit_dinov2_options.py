"""The ViT options DINOv2 needs: the position-embedding resampling rule (interpolate_antialias,
interpolate_offset), pool="token_mean" and a frozen backbone."""

import pytest
import torch
import torch.nn.functional as F

from vitasks.errors import ConfigError
from vitasks.models.backbones.vit import VisionTransformer
from vitasks.models.layers.pos_embed import resample_abs_pos_embed

TINY = dict(img_size=56, patch_size=14, embed_dim=24, depth=2, num_heads=2, mlp_ratio=2.0, layer_scale_init_value=0.5)


def _vit(**kw):
    torch.manual_seed(0)
    model = VisionTransformer(**dict(TINY, **kw)).eval()
    with torch.no_grad():
        model.pos_embed.normal_()
    return model


def test_offset_resampling_is_dinov2s_scale_factor_rule():
    pos = torch.randn(1, 1 + 37 * 37, 8)
    grid = pos[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    # facebookresearch/dinov2: scale factor (16 + 0.1) / 37, output 16 x 16, class row kept.
    want = F.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic", align_corners=False)
    want = want.permute(0, 2, 3, 1).reshape(1, 256, 8)
    got = resample_abs_pos_embed(pos, (16, 16), num_prefix_tokens=1, offset=0.1)
    assert torch.equal(got[:, :1], pos[:, :1])
    torch.testing.assert_close(got[:, 1:], want, rtol=0, atol=1e-6)
    # ... which is not the plain resize to 16 x 16, nor the antialiased one.
    plain = resample_abs_pos_embed(pos, (16, 16), num_prefix_tokens=1)
    aa = resample_abs_pos_embed(pos, (16, 16), num_prefix_tokens=1, antialias=True)
    assert (got - plain).abs().max() > 1e-2 and (aa - plain).abs().max() > 1e-2
    # Upsampling and non-square targets keep the exact size.
    assert resample_abs_pos_embed(pos, (40, 23), num_prefix_tokens=1, offset=0.1).shape == (1, 1 + 40 * 23, 8)
    with pytest.raises(ValueError, match="offset"):
        resample_abs_pos_embed(pos, (16, 16), num_prefix_tokens=1, offset=1.0)


@pytest.mark.parametrize("rule", [dict(), dict(interpolate_antialias=True), dict(interpolate_offset=0.1)])
def test_backbone_resamples_by_its_rule_on_the_fly_and_on_loading(rule):
    big = _vit(img_size=70, **rule)  # 5 x 5 grid
    x = torch.randn(1, 3, 28, 28)  # 2 x 2 grid
    want = resample_abs_pos_embed(
        big.pos_embed.detach(), (2, 2), num_prefix_tokens=1, antialias=rule.get("interpolate_antialias", False),
        offset=rule.get("interpolate_offset", 0.0),
    )
    assert torch.equal(big._pos_embed_for((2, 2)), want)
    small = VisionTransformer(**dict(TINY, img_size=28, **rule)).eval()
    small.load_state_dict(big.state_dict())
    assert torch.equal(small.pos_embed.detach(), want)
    with torch.no_grad():
        torch.testing.assert_close(small(x)[0], big(x)[0], rtol=0, atol=1e-6)


def test_token_mean_pool_excludes_registers():
    model = _vit(pool="token_mean", num_reg_tokens=3)
    assert model.num_features == 48
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape[1] == 1 + 3 + 16
        want = torch.cat([tokens[:, 0], tokens[:, 4:].mean(1)], dim=1)
        torch.testing.assert_close(model(x)[0], want)
    # Through ToMe the mean is the size-weighted one of the merged patch tokens.
    tome = _vit(pool="token_mean", token_reduction=dict(type="ToMe", r=2))
    with torch.no_grad():
        out = tome(x)[0]
    assert out.shape == (2, 48)


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(pool="token_mean", class_token=False), "class_token"),
        (dict(pool="token_mean", fc_norm=True), "fc_norm"),
        (dict(interpolate_offset=1.0), "interpolate_offset"),
        (dict(interpolate_offset="0.1"), "interpolate_offset"),
        (dict(interpolate_antialias=True, interpolate_mode="nearest"), "interpolate_antialias"),
        (dict(interpolate_antialias=1), "interpolate_antialias"),
        (dict(frozen="yes"), "frozen"),
    ],
)
def test_bad_options_name_the_key(kw, key):
    with pytest.raises(ConfigError, match=key):
        VisionTransformer(**dict(TINY, **kw))


def test_frozen_backbone_stays_in_eval_and_out_of_the_optimizer():
    from vitasks.registry import MODELS

    import vitasks.models  # noqa: F401

    model = MODELS.build(dict(
        type="ImageClassifier",
        backbone=dict(type="VisionTransformer", frozen=True, pool="token_mean", drop_path_rate=0.5, **TINY),
        head=dict(type="LinearClsHead", num_classes=3, in_channels=48),
    ))
    model.train()
    assert not model.backbone.training and model.head.training
    assert not any(p.requires_grad for p in model.backbone.parameters())
    x = torch.randn(2, 3, 56, 56)
    out1, out2 = model.backbone(x)[0], model.backbone(x)[0]
    assert torch.equal(out1, out2)  # no drop path: eval mode
    from vitasks.engine.optimizers import LayerDecayOptimizerConstructor

    wrapper = LayerDecayOptimizerConstructor(dict(type="OptimWrapper", optimizer=dict(type="SGD", lr=0.1)))(model)
    trained = {id(p) for g in wrapper.optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in model.head.parameters()}
