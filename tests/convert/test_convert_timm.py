"""timm, DeiT and MAE checkpoints (timm naming) -> vitasks: the converted classifier reproduces
an independent reference forward written on the source names (tests/convert/vit_reference.py)."""

import pytest
import torch
from safetensors.torch import save_file
from vit_reference import (
    all_keys_loaded,
    assert_close,
    build_classifier,
    image_batch,
    timm_resnet_weights,
    timm_vit,
    timm_vit_weights,
    vit_reference,
)

from vitasks.convert import convert_checkpoint
from vitasks.errors import CheckpointError

# CI's second leg (torch 2.14.1 + timm) runs these too, and there the converted models also meet
# timm's own models (test_converted_model_equals_timm), not only the reference forward.
pytestmark = pytest.mark.torch_leg


def _convert(tmp_path, fmt, obj, name="src.pth", **kw):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(obj, str(path))
    else:
        torch.save(obj, path)
    kw.setdefault("verbose", False)
    return convert_checkpoint(fmt, str(path), str(tmp_path / "out.pth"), **kw)


@pytest.mark.parametrize("name", ["src.pth", "src.safetensors"])
def test_timm_vit_logits_match(tmp_path, name):
    sd = timm_vit_weights(dim=48, num_classes=5)
    ck = _convert(tmp_path, "timm", sd, name, num_heads=2)
    hint = ck["meta"]["config_hint"]
    arch = (hint["embed_dim"], hint["depth"], hint["num_heads"], hint["patch_size"], hint["img_size"])
    assert arch == (48, 2, 2, 8, 32)
    assert hint["pool"] == "token" and hint["final_norm"] and not hint["fc_norm"]
    assert hint["mlp_act"] == "gelu"  # PyTorch-trained: exact GELU
    assert ck["meta"]["converted_from"] == "timm"
    model = build_classifier(ck["meta"])
    all_keys_loaded(model, ck["state_dict"])
    x = image_batch()
    with torch.no_grad():
        assert_close(model(x, mode="tensor"), vit_reference(sd, x, num_heads=2)["logits"])
    # The saved file is the returned checkpoint.
    saved = torch.load(tmp_path / "out.pth", weights_only=True)
    assert saved["meta"]["config_hint"] == hint
    assert saved["state_dict"].keys() == ck["state_dict"].keys()


def test_timm_num_heads_from_standard_width(tmp_path):
    sd = timm_vit_weights(dim=192, depth=1, num_classes=3)  # ViT-Ti width: 3 heads
    ck = _convert(tmp_path, "timm", sd)
    assert ck["meta"]["config_hint"]["num_heads"] == 3
    model = build_classifier(ck["meta"])
    all_keys_loaded(model, ck["state_dict"])
    x = image_batch()
    with torch.no_grad():
        assert_close(model(x, mode="tensor"), vit_reference(sd, x, num_heads=3)["logits"])


def test_timm_wrapped_and_dataparallel_prefix(tmp_path):
    sd = timm_vit_weights()
    ck = _convert(tmp_path, "timm", {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, num_heads=2)
    assert "backbone.cls_token" in ck["state_dict"]


def test_timm_gap_with_registers_and_fc_norm(tmp_path):
    # timm's vit_*_reg4_gap layout: no class token, registers and patches without position
    # embeddings for the registers (no_embed_class), mean pooling through fc_norm.
    sd = timm_vit_weights(cls=False, num_reg=2, pos_prefix=0, fc_norm=True, layer_scale=True)
    ck = _convert(tmp_path, "timm", sd, num_heads=2)
    hint = ck["meta"]["config_hint"]
    assert hint["class_token"] is False and hint["num_reg_tokens"] == 2
    assert hint["pool"] == "mean" and hint["fc_norm"] and hint["layer_scale_init_value"]
    model = build_classifier(ck["meta"])
    all_keys_loaded(model, ck["state_dict"])
    x = image_batch()
    with torch.no_grad():
        assert_close(model(x, mode="tensor"), vit_reference(sd, x, 2, pool="mean", pos_prefix=0)["logits"])


def test_timm_registers_with_positions_are_folded(tmp_path):
    # Registers that do have position embeddings: folded into the tokens (same model).
    sd = timm_vit_weights(cls=True, num_reg=2)
    ck = _convert(tmp_path, "timm", sd, num_heads=2)
    assert ck["state_dict"]["backbone.pos_embed"].shape == (1, 1 + 16, 48)
    model = build_classifier(ck["meta"])
    all_keys_loaded(model, ck["state_dict"])
    x = image_batch()
    with torch.no_grad():
        assert_close(model(x, mode="tensor"), vit_reference(sd, x, 2)["logits"])


def test_deit_distilled_keeps_dist_token_and_class_head(tmp_path):
    sd = timm_vit_weights(dist=True, num_classes=4)
    ck = _convert(tmp_path, "deit", {"model": sd}, num_heads=2)
    hint = ck["meta"]["config_hint"]
    assert hint["num_reg_tokens"] == 1 and hint["pool"] == "token"
    assert ck["meta"]["data_preprocessor_hint"]["std"] == [58.395, 57.12, 57.375]  # ImageNet
    assert not any("head_dist" in k for k in ck["state_dict"])
    assert any("distillation" in n for n in ck["meta"]["notes"])
    model = build_classifier(ck["meta"])
    all_keys_loaded(model, ck["state_dict"])
    x = image_batch()
    ref = vit_reference(sd, x, 2)
    with torch.no_grad():
        out = model(x, mode="tensor")
    # Exactly DeiT's class-token head; DeiT's test-time average of both heads differs.
    assert_close(out, ref["logits"])
    assert (out - ref["logits_avg"]).abs().max() > 1e-3


def test_deit3_layer_scale_and_patch_only_positions(tmp_path):
    sd = timm_vit_weights(layer_scale=True, pos_prefix=0)
    for k in [k for k in sd if ".ls" in k]:
        sd[k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2")] = sd.pop(k)
    ck = _convert(tmp_path, "deit", {"model": sd}, num_heads=2)
    assert ck["meta"]["config_hint"]["layer_scale_init_value"] is not None
    # The class token gets a zero position embedding.
    assert torch.equal(ck["state_dict"]["backbone.pos_embed"][:, 0], torch.zeros(1, 48))
    model = build_classifier(ck["meta"])
    all_keys_loaded(model, ck["state_dict"])
    x = image_batch()
    ref_sd = {k.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma"): v for k, v in sd.items()}
    with torch.no_grad():
        assert_close(model(x, mode="tensor"), vit_reference(ref_sd, x, 2, pos_prefix=0)["logits"])


def _mae_pretrain(dim=48):
    sd = timm_vit_weights(dim=dim, num_classes=None)
    sd["mask_token"] = torch.zeros(1, 1, 32)
    sd["decoder_embed.weight"] = torch.randn(32, dim)
    sd["decoder_pos_embed"] = torch.randn(1, 17, 32)
    sd["decoder_blocks.0.attn.qkv.weight"] = torch.randn(96, 32)
    sd["decoder_norm.weight"] = torch.ones(32)
    sd["decoder_pred.weight"] = torch.randn(8 * 8 * 3, 32)
    return sd


def test_mae_pretrain_global_pool(tmp_path):
    sd = _mae_pretrain()
    ck = _convert(tmp_path, "mae", {"model": sd}, num_heads=2, num_classes=7)
    hint = ck["meta"]["config_hint"]
    assert (hint["pool"], hint["fc_norm"], hint["final_norm"]) == ("mean", True, True)
    assert ck["meta"]["head_hint"]["num_classes"] == 7
    keys = ck["state_dict"].keys()
    assert not any("decoder" in k or "mask_token" in k or k.startswith("backbone.norm.") for k in keys)
    model = build_classifier(ck["meta"])
    all_keys_loaded(model, ck["state_dict"], allow_missing=("backbone.fc_norm.", "head."))
    # MAE fine-tuning: mean of the patch tokens (no final norm) -> a fresh LayerNorm.
    x = image_batch()
    plain = {k: v for k, v in sd.items() if not k.startswith(("norm.", "decoder", "mask"))}
    tokens = vit_reference(plain, x, 2)["tokens"]
    expected = torch.nn.functional.layer_norm(tokens[:, 1:].mean(1), (48,), eps=1e-6)
    with torch.no_grad():
        assert_close(model.backbone(x)[0], expected)
        assert torch.count_nonzero(model(x, mode="tensor")) == 0  # new head starts at zero


def test_mae_pretrain_token_pool_keeps_norm(tmp_path):
    ck = _convert(tmp_path, "mae", {"model": _mae_pretrain()}, num_heads=2, pool="token")
    hint = ck["meta"]["config_hint"]
    assert (hint["pool"], hint["fc_norm"], hint["final_norm"]) == ("token", False, True)
    assert "backbone.norm.weight" in ck["state_dict"]


def test_mae_finetuned_logits_match(tmp_path):
    sd = timm_vit_weights(fc_norm=True, num_classes=6)
    ck = _convert(tmp_path, "mae", {"model": sd}, num_heads=2)
    hint = ck["meta"]["config_hint"]
    assert (hint["pool"], hint["fc_norm"], hint["final_norm"]) == ("mean", True, True)
    model = build_classifier(ck["meta"])
    all_keys_loaded(model, ck["state_dict"])
    x = image_batch()
    with torch.no_grad():
        assert_close(model(x, mode="tensor"), vit_reference(sd, x, 2, pool="mean")["logits"])


def test_timm_r50_hybrid_logits_match(tmp_path):
    sd = timm_vit_weights(dim=64, patch=1, grid=4, in_chans=256, num_classes=5)
    sd.update(timm_resnet_weights(stem=32, layers=(1, 2), widths=(128, 256)))
    ck = _convert(tmp_path, "timm", sd, num_heads=4)
    hint = ck["meta"]["config_hint"]
    assert hint["patch_size"] == 8 and hint["img_size"] == 32
    assert hint["stem"] == dict(type="ResNetStem", layers=[1, 2], widths=[128, 256], stem_channels=32,
                                num_groups=32, ws_eps=1e-8, gn_eps=1e-5)
    assert "backbone.stem.backbone.stages.1.blocks.0.downsample.conv.weight" in ck["state_dict"]
    assert "backbone.stem.proj.weight" in ck["state_dict"]
    model = build_classifier(ck["meta"])
    all_keys_loaded(model, ck["state_dict"])
    # 32 px: the stride-2 convs and the max-pool pad (0, 1) under SAME, not (1, 1).
    x = image_batch(size=32)
    ref = vit_reference(sd, x, 4, hybrid=dict(ws="timm", ws_eps=1e-8, gn_eps=1e-5))
    with torch.no_grad():
        assert_close(model(x, mode="tensor"), ref["logits"])


def test_timm_unknown_weights_are_refused(tmp_path):
    sd = timm_vit_weights()
    sd["norm_pre.weight"] = torch.ones(48)  # e.g. a CLIP ViT: not representable
    with pytest.raises(CheckpointError, match="norm_pre.weight"):
        _convert(tmp_path, "timm", sd, num_heads=2)


def test_not_a_state_dict(tmp_path):
    with pytest.raises(CheckpointError, match="expected a state dict"):
        _convert(tmp_path, "timm", {"epoch": 3, "lr": 0.1})


def test_not_a_vit_refused(tmp_path):
    resnet = {"conv1.weight": torch.zeros(8, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(8, 8, 1, 1)}
    with pytest.raises(CheckpointError, match="transformer blocks"):
        _convert(tmp_path, "timm", resnet)
    sd = timm_vit_weights()
    del sd["blocks.1.mlp.fc2.weight"]
    with pytest.raises(CheckpointError, match="blocks.1.mlp.fc2.weight"):
        _convert(tmp_path, "timm", sd, num_heads=2)


def test_half_precision_source_saved_as_float32_slices_compact(tmp_path):
    sd = {k: v.half() for k, v in timm_vit_weights().items()}
    ck = _convert(tmp_path, "timm", sd, num_heads=2)
    pos = ck["state_dict"]["backbone.pos_embed"]
    assert pos.dtype == torch.float32
    assert pos.untyped_storage().nbytes() == pos.numel() * 4


def _deit3_weights():
    """DeiT III (timm names, layer scale, positions for the patches only) and its source layout
    (DeiT's own gamma_1 / gamma_2 names)."""
    sd = timm_vit_weights(layer_scale=True, pos_prefix=0)
    source = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v for k, v in sd.items()}
    return sd, {"model": source}


def _as_is(**kw):
    return lambda: (lambda sd: (sd, sd))(timm_vit_weights(**kw))


def _in_model_key(**kw):
    return lambda: (lambda sd: (sd, {"model": sd}))(timm_vit_weights(**kw))


def _r50_hybrid():
    sd = timm_vit_weights(dim=64, patch=1, grid=4, in_chans=256, num_classes=5)
    sd.update(timm_resnet_weights(stem=32, layers=(1, 2), widths=(128, 256)))
    return sd, sd


# case -> (converter, () -> (timm state dict, what the converter reads), heads, timm_vit options)
TIMM_CASES = {
    "vit": ("timm", _as_is(dim=48, num_classes=5), 2, {}),
    "gap_registers_fc_norm_layer_scale": (
        "timm", _as_is(cls=False, num_reg=2, pos_prefix=0, fc_norm=True, layer_scale=True), 2,
        dict(pool="mean", pos_prefix=0)),
    "registers_with_positions": ("timm", _as_is(cls=True, num_reg=2), 2, {}),
    "deit_distilled": ("deit", _in_model_key(dist=True, num_classes=4), 2, {}),
    "deit3": ("deit", _deit3_weights, 2, dict(pos_prefix=0)),
    "mae_finetuned": ("mae", _in_model_key(fc_norm=True, num_classes=6), 2, dict(pool="mean")),
    "r50_hybrid": ("timm", _r50_hybrid, 4, {}),
}


@pytest.mark.parametrize("case", sorted(TIMM_CASES))
def test_converted_model_equals_timm(tmp_path, case):
    fmt, weights, num_heads, options = TIMM_CASES[case]
    sd, source = weights()
    reference = timm_vit(sd, num_heads, **options)  # skips where timm does not import
    assert type(reference).__module__.startswith("timm.models."), type(reference)
    ck = _convert(tmp_path, fmt, source, num_heads=num_heads)
    model = build_classifier(ck["meta"])
    all_keys_loaded(model, ck["state_dict"])
    x = image_batch()
    with torch.no_grad():
        out = model(x, mode="tensor")
        timm_out = reference(x)
        if "dist_token" in sd:
            # vitasks keeps DeiT's class-token head; timm averages it with the distillation head.
            tokens = reference.forward_features(x)
            expected = reference.head(tokens[:, 0])
            assert_close(timm_out, (expected + reference.head_dist(tokens[:, 1])) / 2)
        else:
            expected = timm_out
    assert_close(out, expected)
    # The reference forward the other tests use is timm's forward too.
    hybrid = dict(ws="timm", ws_eps=1e-8, gn_eps=1e-5) if case == "r50_hybrid" else None
    assert_close(vit_reference(sd, x, num_heads, hybrid=hybrid, **options)["logits"], expected)
