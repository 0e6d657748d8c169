"""Google .npz (google-research/vision_transformer layout) -> vitasks: tiny checkpoints written
from random reference weights in Google's layout (HWIO convs, per-head attention kernels), and
the converted model checked against the reference forward."""

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

from vitasks.convert import convert_checkpoint
from vitasks.errors import CheckpointError


@pytest.mark.parametrize("prefix,linen", [("", False), ("opt/target/", True)])
def test_npz_vit_logits_match(tmp_path, prefix, linen):
    sd = timm_vit_weights(dim=48, num_classes=5)
    to_google_npz(sd, str(tmp_path / "vit.npz"), prefix=prefix, num_heads=3, linen_names=linen)
    ck = convert_checkpoint("npz", str(tmp_path / "vit.npz"), str(tmp_path / "out.pth"), verbose=False)
    hint = ck["meta"]["config_hint"]
    assert hint["num_heads"] == 3  # read from the (C, heads, head_dim) kernels
    assert hint["norm_eps"] == 1e-6 and hint["pool"] == "token"
    assert ck["meta"]["data_preprocessor_hint"]["mean"] == [127.5] * 3  # Google: inputs in [-1, 1]
    for k in ("backbone.stem.proj.weight", "backbone.blocks.1.attn.qkv.weight", "backbone.blocks.1.attn.proj.weight"):
        assert torch.allclose(ck["state_dict"][k], sd[k[len("backbone."):].replace("stem.", "patch_embed.")])
    model = build_classifier(ck["meta"])
    all_keys_loaded(model, ck["state_dict"])
    x = image_batch()
    with torch.no_grad():
        assert_close(model(x, mode="tensor"), vit_reference(sd, x, 3)["logits"])


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
        assert_close(model(x, mode="tensor"), vit_reference(sd, x, 3, pool="mean")["logits"])


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
        assert_close(model(x, mode="tensor"), vit_reference(sd, x, 3)["logits_pre"])
    # Kept with a new class count: the hidden layer stays, the new classifier starts at zero.
    ck = convert_checkpoint("npz", str(tmp_path / "i21k.npz"), None, keep_pre_logits=True, num_classes=3, verbose=False)
    assert sorted(k for k in ck["state_dict"] if k.startswith("head.")) == ["head.hidden.bias", "head.hidden.weight"]
    assert ck["meta"]["head_hint"]["num_classes"] == 3


def _hybrid_weights():
    sd = timm_vit_weights(dim=64, patch=1, grid=4, in_chans=256, num_classes=5)
    sd.update(timm_resnet_weights(stem=32, layers=(2, 1), widths=(128, 256)))
    return sd


def test_npz_r50_hybrid(tmp_path):
    sd = _hybrid_weights()
    to_google_npz(sd, str(tmp_path / "r50.npz"), num_heads=4)
    ck = convert_checkpoint("npz", str(tmp_path / "r50.npz"), None, verbose=False)
    hint = ck["meta"]["config_hint"]
    assert hint["stem"] == dict(type="ResNetStem", layers=[2, 1], widths=[128, 256], stem_channels=32,
                                num_groups=32, ws_eps=1e-8, gn_eps=1e-6)
    assert hint["patch_size"] == 8 and hint["num_heads"] == 4
    for k, v in sd.items():
        if k.startswith("patch_embed.backbone."):
            assert torch.allclose(ck["state_dict"]["backbone.stem." + k[len("patch_embed."):]], v)
    model = build_classifier(ck["meta"])
    all_keys_loaded(model, ck["state_dict"])
    x = image_batch()
    with torch.no_grad():
        out = model(x, mode="tensor")
    # Same conventions as the stem (variance-form weight standardisation), Google's GN eps.
    assert_close(out, vit_reference(sd, x, 4, hybrid=dict(ws="timm", ws_eps=1e-8, gn_eps=1e-6))["logits"])
    # Google's own standardisation divides by std + 1e-5 instead (see npz.py): the outputs
    # still agree to the float32 tolerance.
    google = vit_reference(sd, x, 4, hybrid=dict(ws="google", ws_eps=1e-5, gn_eps=1e-6))["logits"]
    assert_close(out, google, rel=1e-4)


def test_npz_with_pickled_objects_refused(tmp_path):
    np.savez(tmp_path / "bad.npz", **{"embedding/kernel": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(CheckpointError, match="pickled"):
        convert_checkpoint("npz", str(tmp_path / "bad.npz"), None, verbose=False)


def test_npz_foreign_layout_refused(tmp_path):
    np.savez(tmp_path / "other.npz", w=np.zeros(3, np.float32))
    with pytest.raises(CheckpointError, match="vision_transformer"):
        convert_checkpoint("npz", str(tmp_path / "other.npz"), None, verbose=False)
