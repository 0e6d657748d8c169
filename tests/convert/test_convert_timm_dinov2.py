"""timm's DINOv2 (``vit_*_patch14_dinov2``, ``vit_*_patch14_reg4_dinov2``) and
facebookresearch/dinov2's own state dicts -> vitasks, checked against timm at the source's
size (518 px, 37 x 37 grid) and at 224 px (timm's ``dynamic_img_size`` resampling; for the
facebookresearch files, its offset rule written out here)."""

import pytest
import torch
import torch.nn.functional as F
from vit_reference import all_keys_loaded, assert_close, build_classifier

from vitasks.convert import convert_checkpoint
from vitasks.errors import CheckpointError

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.torch_leg

SIZES = (518, 224)
TINY = dict(embed_dim=24, depth=2, num_heads=2, mlp_ratio=2.0, img_size=518)


def _timm(name, **kw):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **dict(TINY, **kw))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # perturb norms, LayerScale and biases too
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        model.pos_embed.copy_(torch.randn(model.pos_embed.shape, generator=g))
    return model.eval()


def _images(size, n=2):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(size))


@pytest.mark.parametrize("name,num_reg", [("vit_small_patch14_dinov2", 0), ("vit_small_patch14_reg4_dinov2", 4)])
def test_timm_dinov2_features_at_two_sizes(tmp_path, name, num_reg):
    src = _timm(name, num_classes=0, dynamic_img_size=True)
    torch.save(src.state_dict(), tmp_path / "timm.pth")
    ck = convert_checkpoint("timm", str(tmp_path / "timm.pth"), None, num_heads=2, verbose=False)
    hint = ck["meta"]["config_hint"]
    assert (hint["patch_size"], hint["img_size"], hint["num_reg_tokens"], hint["pool"]) == (14, 518, num_reg, "token_mean")
    assert (hint["interpolate_antialias"], hint["interpolate_offset"]) == (True, 0.0)
    model = build_classifier(ck["meta"], num_classes=3)
    all_keys_loaded(model, ck["state_dict"], allow_missing=("head.",))
    for size in SIZES:
        x = _images(size)
        with torch.no_grad():
            tokens = src.forward_features(x)
            assert_close(model.backbone.forward_features(x), tokens)
            pooled = torch.cat([tokens[:, 0], tokens[:, src.num_prefix_tokens:].mean(1)], dim=1)
            assert_close(model.backbone(x)[0], pooled)
    # timm's own pooling (the class token) on request.
    ck = convert_checkpoint("timm", str(tmp_path / "timm.pth"), None, num_heads=2, pool="token", verbose=False)
    model = build_classifier(ck["meta"], num_classes=3)
    model.load_state_dict(ck["state_dict"], strict=False)
    x = _images(224)
    with torch.no_grad():
        assert_close(model.backbone(x)[0], src.forward_head(src.forward_features(x), pre_logits=True))


def test_timm_dinov2_head_and_img_size_224(tmp_path):
    # A timm DINOv2 loaded at 224 px resamples its 518 grid once (timm's checkpoint filter: the
    # same bicubic + antialias rule); the converter's img_size=224 does the same.
    src = _timm("vit_small_patch14_dinov2", num_classes=5)
    torch.save(src.state_dict(), tmp_path / "timm.pth")
    ck = convert_checkpoint("timm", str(tmp_path / "timm.pth"), None, num_heads=2, img_size=224, verbose=False)
    assert ck["meta"]["config_hint"]["pool"] == "token"  # its head reads the class token
    model = build_classifier(ck["meta"])
    all_keys_loaded(model, ck["state_dict"])
    small = timm.create_model("vit_small_patch14_dinov2", pretrained=False, **dict(TINY, img_size=224, num_classes=5))
    sd = dict(src.state_dict())
    sd["pos_embed"] = timm.layers.resample_abs_pos_embed(sd["pos_embed"], (16, 16), num_prefix_tokens=1)
    small.load_state_dict(sd)
    x = _images(224)
    with torch.no_grad():
        assert_close(model(x, mode="tensor"), small.eval()(x))


def _facebook_rule(pos, new, offset, antialias):
    """facebookresearch/dinov2's interpolate_pos_encoding on a (1, 1 + M*M, C) table, written
    out: scale factors (new + offset) / M when offset > 0, else the size."""
    M = int((pos.shape[1] - 1) ** 0.5)
    grid = pos[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)
    kw = dict(scale_factor=((new + offset) / M, (new + offset) / M)) if offset else dict(size=(new, new))
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **kw)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1)


@pytest.mark.parametrize("num_reg", [0, 4])
def test_facebook_dinov2_files(tmp_path, num_reg):
    # facebookresearch's layout: pos_embed with the class token's row, register_tokens without
    # positions, mask_token; the rule: offset 0.1 (no registers) or antialias (registers).
    name = "vit_small_patch14_reg4_dinov2" if num_reg else "vit_small_patch14_dinov2"
    src = _timm(name, num_classes=0)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    C = TINY["embed_dim"]
    if num_reg:
        cls_pos = torch.randn(1, 1, C)
        sd["register_tokens"] = sd.pop("reg_token")
        sd["cls_token"] = sd["cls_token"] - cls_pos  # timm folded the position into the token
        sd["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)
    sd["mask_token"] = torch.zeros(1, C)
    torch.save(sd, tmp_path / "dinov2_vits14_pretrain.pth")
    ck = convert_checkpoint("timm", str(tmp_path / "dinov2_vits14_pretrain.pth"), None, num_heads=2, verbose=False)
    hint = ck["meta"]["config_hint"]
    rule = (True, 0.0) if num_reg else (False, 0.1)
    assert (hint["interpolate_antialias"], hint["interpolate_offset"]) == rule
    model = build_classifier(ck["meta"], num_classes=3)
    all_keys_loaded(model, ck["state_dict"], allow_missing=("head.",))
    x = _images(518)
    with torch.no_grad():
        assert_close(model.backbone.forward_features(x), src.forward_features(x))
    # 224 px: timm's blocks on the position table that facebookresearch's rule gives.
    full = torch.cat([torch.zeros(1, 1, C), src.pos_embed], 1) if num_reg else src.pos_embed
    pos = _facebook_rule(full.detach(), 16, offset=rule[1], antialias=rule[0])
    small = timm.create_model(name, pretrained=False, **dict(TINY, img_size=224, num_classes=0))
    tsd = dict(src.state_dict())
    tsd["pos_embed"] = pos[:, 1:] if num_reg else pos
    small.load_state_dict(tsd)
    x = _images(224)
    with torch.no_grad():
        assert_close(model.backbone.forward_features(x), small.eval().forward_features(x))


def test_timm_dinov2_giant_swiglu_refused(tmp_path):
    sd = _timm("vit_small_patch14_dinov2", num_classes=0).state_dict()
    for i in range(TINY["depth"]):  # SwiGLUPacked: fc1 twice as wide as fc2's input
        sd[f"blocks.{i}.mlp.fc1.weight"] = torch.cat([sd[f"blocks.{i}.mlp.fc1.weight"]] * 2)
        sd[f"blocks.{i}.mlp.fc1.bias"] = torch.cat([sd[f"blocks.{i}.mlp.fc1.bias"]] * 2)
    torch.save(sd, tmp_path / "g.pth")
    with pytest.raises(CheckpointError, match="SwiGLU"):
        convert_checkpoint("timm", str(tmp_path / "g.pth"), None, num_heads=2, verbose=False)
