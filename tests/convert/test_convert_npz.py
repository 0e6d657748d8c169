"""Google .npz (google-research/vision_transformer layout) -> vitasks: tiny checkpoints written
from random reference weights in Google's layout (HWIO convs, per-head attention kernels), and
the converted model checked against the reference forward with Google's JAX conventions (tanh
GELU; std-form weight standardisation, GroupNorm eps 1e-6): they agree to float32 rounding."""

import numpy as np
import pytest
import torch
from vit_reference import (
    all_keys_loaded,
    assert_close,
    build_classifier,
    image_batch,
    timm_resnet_weights,
    timm_vit_weights,
    to_google_npz,
    vit_reference,
)

from vitasks.convert import convert_checkpoint, describe
from vitasks.errors import CheckpointError


@pytest.mark.parametrize("prefix,linen", [("", False), ("opt/target/", True)])
def test_npz_vit_logits_match(tmp_path, prefix, linen):
    sd = timm_vit_weights(dim=48, num_classes=5)
    to_google_npz(sd, str(tmp_path / "vit.npz"), prefix=prefix, num_heads=3, linen_names=linen)
    ck = convert_checkpoint("npz", str(tmp_path / "vit.npz"), str(tmp_path / "out.pth"), verbose=False)
    hint = ck["meta"]["config_hint"]
    assert hint["num_heads"] == 3  # read from the (C, heads, head_dim) kernels
    assert hint["norm_eps"] == 1e-6 and hint["pool"] == "token"
    assert hint["mlp_act"] == "gelu_tanh"  # flax nn.gelu: the tanh approximation
    assert ck["meta"]["data_preprocessor_hint"]["mean"] == [127.5] * 3  # Google: inputs in [-1, 1]
    for k in ("backbone.stem.proj.weight", "backbone.blocks.1.attn.qkv.weight", "backbone.blocks.1.attn.proj.weight"):
        assert torch.allclose(ck["state_dict"][k], sd[k[len("backbone."):].replace("stem.", "patch_embed.")])
    model = build_classifier(ck["meta"])
    all_keys_loaded(model, ck["state_dict"])
    x = image_batch()
    with torch.no_grad():
        out = model(x, mode="tensor")
    assert_close(out, vit_reference(sd, x, 3, act="gelu_tanh")["logits"], rel=1e-5)
    # The tolerance tells the GELUs apart: exact GELU (timm's port) is measurably off.
    exact = vit_reference(sd, x, 3, act="gelu")["logits"]
    assert (out - exact).abs().max() > 1e-5 * exact.abs().max()


def test_npz_gap_model(tmp_path):
    # classifier="gap": no class token; the encoder norm is applied, then all tokens averaged.
    sd = timm_vit_weights(cls=False, num_classes=5)
    to_google_npz(sd, str(tmp_path / "gap.npz"), num_heads=3)
    ck = convert_checkpoint("npz", str(tmp_path / "gap.npz"), None, verbose=False)
    hint = ck["meta"]["config_hint"]
    assert (hint["class_token"], hint["pool"], hint["fc_norm"], hint["final_norm"]) == (False, "mean", False, True)
    model = build_classifier(ck["meta"])
    all_keys_loaded(model, ck["state_dict"])
    x = image_batch()
    with torch.no_grad():
        assert_close(model(x, mode="tensor"), vit_reference(sd, x, 3, pool="mean", act="gelu_tanh")["logits"], rel=1e-5)


def test_npz_pre_logits_dropped_or_kept(tmp_path):
    sd = timm_vit_weights(num_classes=7, pre_logits=48)
    to_google_npz(sd, str(tmp_path / "i21k.npz"), num_heads=3)
    ck = convert_checkpoint("npz", str(tmp_path / "i21k.npz"), None, verbose=False)
    # The ViT paper's fine-tuning: the whole pre-training head (pre_logits + head) goes.
    assert not any(k.startswith("head.") or "pre_logits" in k for k in ck["state_dict"])
    assert ck["meta"]["head_hint"]["type"] == "LinearClsHead"
    # Kept: MLPClsHead reproduces the pre-training logits.
    ck = convert_checkpoint("npz", str(tmp_path / "i21k.npz"), None, keep_pre_logits=True, verbose=False)
    assert ck["meta"]["head_hint"] == dict(type="MLPClsHead", num_classes=7, in_channels=48, hidden_channels=48)
    model = build_classifier(ck["meta"])
    all_keys_loaded(model, ck["state_dict"])
    x = image_batch()
    with torch.no_grad():
        assert_close(model(x, mode="tensor"), vit_reference(sd, x, 3, act="gelu_tanh")["logits_pre"], rel=1e-5)
    # Kept with a new class count: the hidden layer stays, the new classifier starts at zero.
    ck = convert_checkpoint("npz", str(tmp_path / "i21k.npz"), None, keep_pre_logits=True, num_classes=3, verbose=False)
    assert sorted(k for k in ck["state_dict"] if k.startswith("head.")) == ["head.hidden.bias", "head.hidden.weight"]
    assert ck["meta"]["head_hint"]["num_classes"] == 3


def _hybrid_weights(conv_std=0.1):
    sd = timm_vit_weights(dim=64, patch=1, grid=4, in_chans=256, num_classes=5)
    sd.update(timm_resnet_weights(stem=32, layers=(2, 1), widths=(128, 256), conv_std=conv_std))
    return sd


def test_npz_r50_hybrid(tmp_path):
    # Small kernels (std 1e-4) make the standardisation's eps (1e-5) a 10% effect, so only the
    # std form (w - mean) / (std + 1e-5) of Google's StdConv matches.
    sd = _hybrid_weights(conv_std=1e-4)
    to_google_npz(sd, str(tmp_path / "r50.npz"), num_heads=4)
    ck = convert_checkpoint("npz", str(tmp_path / "r50.npz"), None, verbose=False)
    hint = ck["meta"]["config_hint"]
    assert hint["stem"] == dict(type="ResNetStem", layers=[2, 1], widths=[128, 256], stem_channels=32,
                                num_groups=32, ws_eps=1e-5, ws_form="std", gn_eps=1e-6)
    assert hint["patch_size"] == 8 and hint["num_heads"] == 4 and hint["mlp_act"] == "gelu_tanh"
    text = describe(ck["meta"])  # the printed config section carries the conventions
    assert "mlp_act: gelu_tanh" in text and "ws_form: std" in text and "ws_eps: 1.0e-05" in text
    for k, v in sd.items():
        if k.startswith("patch_embed.backbone."):
            assert torch.allclose(ck["state_dict"]["backbone.stem." + k[len("patch_embed."):]], v)
    model = build_classifier(ck["meta"])
    all_keys_loaded(model, ck["state_dict"])
    x = image_batch()
    with torch.no_grad():
        out = model(x, mode="tensor")
    google = vit_reference(sd, x, 4, act="gelu_tanh", hybrid=dict(ws="google", ws_eps=1e-5, gn_eps=1e-6))
    assert_close(out, google["logits"], rel=1e-5)
    # timm's port of the same weights (variance form, eps 1e-8) gives other outputs here.
    timm_like = vit_reference(sd, x, 4, act="gelu_tanh", hybrid=dict(ws="timm", ws_eps=1e-8, gn_eps=1e-6))
    assert (out - timm_like["logits"]).abs().max() > 1e-3 * google["logits"].abs().max()


def test_npz_with_pickled_objects_refused(tmp_path):
    np.savez(tmp_path / "bad.npz", **{"embedding/kernel": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(CheckpointError, match="pickled"):
        convert_checkpoint("npz", str(tmp_path / "bad.npz"), None, verbose=False)


def test_npz_foreign_layout_refused(tmp_path):
    np.savez(tmp_path / "other.npz", w=np.zeros(3, np.float32))
    with pytest.raises(CheckpointError, match="vision_transformer"):
        convert_checkpoint("npz", str(tmp_path / "other.npz"), None, verbose=False)
