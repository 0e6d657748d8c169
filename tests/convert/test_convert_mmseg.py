"""mmsegmentation UperNet (ViT-B + MLN, MAE, BEiT) -> vitasks: the released key lists consumed
exactly, with shapes; q/v bias merge, BEiT's relative-position index, the neck and head values;
outputs of the converted MultiLevelNeck and relative-position bias against the formulas.

The key lists are written from mmsegmentation's model definitions: ``backbones/vit.py``
(mmcv ``MultiheadAttention`` -> ``attn.attn.in_proj_*``, ``FFN`` -> ``ffn.layers.0.0`` /
``ffn.layers.1``, ``PatchEmbed.projection``, final ``ln1``), ``backbones/beit.py`` and
``mae.py`` (``BEiTAttention``: ``qkv``, ``q_bias``/``v_bias`` or a full ``qkv`` bias,
``relative_position_bias_table`` and the ``relative_position_index`` buffer, ``gamma_1/2``),
``necks/multilevel_neck.py``, ``necks/featurepyramid.py`` (``Feature2Pyramid``: upsample_4x,
upsample_2x), ``decode_heads/uper_head.py`` (``psp_modules``, ``bottleneck``, ``lateral_convs``,
``fpn_convs``, ``fpn_bottleneck``) and ``fcn_head.py``, with the configs
``vit_vit-b16_mln_upernet_8xb2-160k_ade20k-512x512``, ``mae-base_upernet_8xb2-amp-160k_ade20k-512x512``
and ``beit-base_upernet_8xb2-160k_ade20k-640x640``.
"""

import collections
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitasks.convert import convert_checkpoint
from vitasks.convert.dense import compare_with_model
from vitasks.convert.mmseg import convert_state_dict, recorded_settings
from vitasks.errors import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def beit_index(side):
    """BEiT's relative_position_index buffer as mmseg's BEiTAttention builds it."""
    coords = torch.stack(torch.meshgrid([torch.arange(side), torch.arange(side)], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += side - 1
    rel[:, :, 1] += side - 1
    rel[:, :, 0] *= 2 * side - 1
    n = (2 * side - 1) ** 2 + 3
    index = torch.zeros((side * side + 1,) * 2, dtype=torch.long)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:] = n - 3
    index[0:, 0] = n - 2
    index[0, 0] = n - 1
    return index


def mmseg_keys(family, dim=768, depth=12, heads=12, img_size=512, patch=16, channels=None, aux_channels=256,
               num_classes=150, final_norm=False):
    """name -> shape (or a tensor for buffers) of mmseg's UperNet state dict for a family."""
    keys = collections.OrderedDict()
    grid = img_size // patch
    b = "backbone."
    index = beit_index(grid) if family != "vit" else None  # a buffer, the same in every block
    keys[b + "cls_token"] = (1, 1, dim)
    if family != "beit":
        keys[b + "pos_embed"] = (1, 1 + grid * grid, dim)
    keys[b + "patch_embed.projection.weight"], keys[b + "patch_embed.projection.bias"] = (dim, 3, patch, patch), (dim,)
    for i in range(depth):
        layer = f"{b}layers.{i}."
        keys[layer + "ln1.weight"] = keys[layer + "ln1.bias"] = (dim,)
        if family == "vit":
            keys[layer + "attn.attn.in_proj_weight"], keys[layer + "attn.attn.in_proj_bias"] = (3 * dim, dim), (3 * dim,)
            keys[layer + "attn.attn.out_proj.weight"], keys[layer + "attn.attn.out_proj.bias"] = (dim, dim), (dim,)
        else:
            if family == "beit":
                keys[layer + "attn.q_bias"] = keys[layer + "attn.v_bias"] = (dim,)
            keys[layer + "attn.relative_position_bias_table"] = ((2 * grid - 1) ** 2 + 3, heads)
            keys[layer + "attn.relative_position_index"] = index
            keys[layer + "attn.qkv.weight"] = (3 * dim, dim)
            if family == "mae":
                keys[layer + "attn.qkv.bias"] = (3 * dim,)
            keys[layer + "attn.proj.weight"], keys[layer + "attn.proj.bias"] = (dim, dim), (dim,)
        keys[layer + "ln2.weight"] = keys[layer + "ln2.bias"] = (dim,)
        keys[layer + "ffn.layers.0.0.weight"], keys[layer + "ffn.layers.0.0.bias"] = (4 * dim, dim), (4 * dim,)
        keys[layer + "ffn.layers.1.weight"], keys[layer + "ffn.layers.1.bias"] = (dim, 4 * dim), (dim,)
        if family != "vit":
            keys[layer + "gamma_1"] = keys[layer + "gamma_2"] = (dim,)
    if final_norm:
        keys[b + "ln1.weight"] = keys[b + "ln1.bias"] = (dim,)

    def bn(name, c):
        for p in BN:
            keys[f"{name}.{p}"] = () if p == "num_batches_tracked" else (c,)

    if family == "vit":  # MultiLevelNeck(in_channels=[768]*4, out_channels=768, scales=[4, 2, 1, 0.5])
        for i in range(4):
            keys[f"neck.lateral_convs.{i}.conv.weight"], keys[f"neck.lateral_convs.{i}.conv.bias"] = (dim, dim, 1, 1), (dim,)
            keys[f"neck.convs.{i}.conv.weight"], keys[f"neck.convs.{i}.conv.bias"] = (dim, dim, 3, 3), (dim,)
        channels = channels or 512
    else:  # Feature2Pyramid(embed_dim=768, rescales=[4, 2, 1, 0.5]) with SyncBN
        keys["neck.upsample_4x.0.weight"], keys["neck.upsample_4x.0.bias"] = (dim, dim, 2, 2), (dim,)
        bn("neck.upsample_4x.1", dim)
        keys["neck.upsample_4x.3.weight"], keys["neck.upsample_4x.3.bias"] = (dim, dim, 2, 2), (dim,)
        keys["neck.upsample_2x.0.weight"], keys["neck.upsample_2x.0.bias"] = (dim, dim, 2, 2), (dim,)
        channels = channels or 768
    d = "decode_head."

    def conv_module(name, cin, cout, k):
        keys[f"{name}.conv.weight"] = (cout, cin, k, k)
        bn(f"{name}.bn", cout)

    for j in range(4):
        conv_module(f"{d}psp_modules.{j}.1", dim, channels, 1)
    conv_module(d + "bottleneck", dim + 4 * channels, channels, 3)
    for i in range(3):
        conv_module(f"{d}lateral_convs.{i}", dim, channels, 1)
        conv_module(f"{d}fpn_convs.{i}", channels, channels, 3)
    conv_module(d + "fpn_bottleneck", 4 * channels, channels, 3)
    keys[d + "conv_seg.weight"], keys[d + "conv_seg.bias"] = (num_classes, channels, 1, 1), (num_classes,)
    conv_module("auxiliary_head.convs.0", dim, aux_channels, 3)
    keys["auxiliary_head.conv_seg.weight"] = (num_classes, aux_channels, 1, 1)
    keys["auxiliary_head.conv_seg.bias"] = (num_classes,)
    return keys


def make(keys, device=None, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for k, s in keys.items():
        if isinstance(s, torch.Tensor):
            out[k] = s.to(device) if device == "meta" else s.clone()
        elif device == "meta":
            out[k] = torch.empty(s, device="meta", dtype=torch.long if k.endswith("num_batches_tracked") else torch.float32)
        elif k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(160000)
        elif k.endswith("running_var"):
            out[k] = torch.from_numpy(rng.uniform(0.5, 2.0, s).astype(np.float32))
        else:
            out[k] = torch.from_numpy(rng.standard_normal(s).astype(np.float32))
    return out


SMALL = dict(dim=32, depth=4, heads=2, img_size=64, patch=16, channels=16, aux_channels=8)
FULL = {"vit": dict(), "mae": dict(), "beit": dict(img_size=640)}


@pytest.mark.parametrize("family", ["vit", "mae", "beit"])
def test_full_size_key_lists_consumed_with_shapes(family):
    keys = mmseg_keys(family, **FULL[family])
    src = convert_state_dict(make(keys, "meta"), f"{family}.pth")
    assert sorted(src.key_map) == sorted(keys)
    assert compare_with_model(src.state_dict, src.model) == dict(missing=[], unexpected=[], shapes=[])
    _, meta = src.to_vitasks()
    assert meta["dataset_meta"]["family"] == family
    # The options that make the shipped config hold these weights, exactly.
    from vitasks.config import load_config

    cfg = load_config(os.path.join(ROOT, meta["config"]), meta["cfg_options"] or None)
    assert compare_with_model(src.state_dict, cfg.model) == dict(missing=[], unexpected=[], shapes=[])
    b = src.model["backbone"]
    assert (b["embed_dim"], b["depth"], b["num_heads"], b["img_size"]) == (768, 12, 12, FULL[family].get("img_size", 512))
    assert b["use_rel_pos_bias"] is (family != "vit")
    # What the recorded --cfg-options (listed in docs/model_zoo.md) give the shipped config, per
    # family (whatever the config already says itself).
    m = cfg.model
    if family == "vit":
        assert m.backbone.out_indices == [2, 5, 8, 11] and m.neck.type == "MultiLevelNeck"
        assert m.decode_head.channels == 512 and m.auxiliary_head.in_index == 3
    else:
        assert m.neck.type == "Feature2Pyramid" and m.backbone.out_indices == [3, 5, 7, 11]
        assert m.backbone.use_rel_pos_bias is True and m.backbone.layer_scale_init_value
    if family == "beit":
        assert m.backbone.norm_eps == 1e-6 and list(m.data_preprocessor.mean) == [123.675, 116.28, 103.53]


@pytest.mark.parametrize("family", ["vit", "mae", "beit"])
def test_small_conversion_loads_exactly_and_keeps_values(tmp_path, family):
    keys = mmseg_keys(family, **SMALL, final_norm=family == "vit")
    sd = make(keys)
    torch.save({"meta": {"CLASSES": [f"c{i}" for i in range(150)]}, "state_dict": sd}, tmp_path / "m.pth")
    ckpt = convert_checkpoint("mmseg", str(tmp_path / "m.pth"), str(tmp_path / "out.pth"), verbose=False)
    from vitasks.registry import MODELS

    model = MODELS.build(ckpt["meta"]["model_hint"])
    result = model.load_state_dict(torch.load(tmp_path / "out.pth", weights_only=True)["state_dict"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    own = model.state_dict()
    src = convert_state_dict(sd, "m.pth")
    for old, new in src.key_map.items():  # renamed unchanged, but BEiT's q/v biases (merged below)
        if not old.endswith(("q_bias", "v_bias")) and new:
            assert torch.equal(own[new], sd[old]), (old, new)
    assert sorted(k for k, v in src.key_map.items() if not v) == sorted(k for k in sd if k.endswith("relative_position_index"))
    layer = "backbone.layers.1."
    if family == "vit":
        assert torch.equal(own["backbone.blocks.1.attn.qkv.weight"], sd[layer + "attn.attn.in_proj_weight"])
        assert torch.equal(own["backbone.norm.weight"], sd["backbone.ln1.weight"])
        assert torch.equal(own["neck.lateral_convs.2.weight"], sd["neck.lateral_convs.2.conv.weight"])
    else:
        qkv_bias = own["backbone.blocks.1.attn.qkv.bias"]
        if family == "beit":  # q and v biases merged, zero key bias
            assert torch.equal(qkv_bias, torch.cat([sd[layer + "attn.q_bias"], torch.zeros(32), sd[layer + "attn.v_bias"]]))
            assert not own["backbone.pos_embed"].any()
        else:
            assert torch.equal(qkv_bias, sd[layer + "attn.qkv.bias"])
        assert torch.equal(own["backbone.blocks.1.attn.rel_pos_bias.table"], sd[layer + "attn.relative_position_bias_table"])
        assert torch.equal(own["backbone.blocks.1.ls2.gamma"], sd[layer + "gamma_2"])
        assert torch.equal(own["neck.ops.0.1.running_var"], sd["neck.upsample_4x.1.running_var"])
    assert torch.equal(own["decode_head.psp.stages.3.1.bn.running_mean"], sd["decode_head.psp_modules.3.1.bn.running_mean"])
    assert torch.equal(own["decode_head.fpn_bottleneck.conv.weight"], sd["decode_head.fpn_bottleneck.conv.weight"])
    assert torch.equal(own["auxiliary_head.conv_seg.bias"], sd["auxiliary_head.conv_seg.bias"])
    assert ckpt["meta"]["dataset_meta"]["classes"][3] == "c3"


def test_relative_position_bias_is_beits_formula():
    """The converted table, indexed by vitasks, gives the bias mmseg's BEiTAttention adds."""
    keys = mmseg_keys("beit", **SMALL)
    sd = make(keys, seed=3)
    src = convert_state_dict(sd, "beit.pth")
    from vitasks.registry import MODELS

    model = MODELS.build(src.model)
    model.load_state_dict(src.state_dict, strict=True)
    table = sd["backbone.layers.0.attn.relative_position_bias_table"]
    index = beit_index(4)
    expected = table[index.view(-1)].view(17, 17, -1).permute(2, 0, 1)
    with torch.no_grad():
        got = model.backbone.blocks[0].attn.rel_pos_bias((4, 4), 1)
    assert torch.equal(got[0], expected)


def test_multilevel_neck_is_mmsegs():
    """Lateral 1x1 conv, bilinear resize by the scale (mmseg's resize), 3x3 conv; no norm, no act."""
    keys = mmseg_keys("vit", **SMALL)
    sd = make(keys, seed=4)
    src = convert_state_dict(sd, "vit.pth")
    from vitasks.registry import MODELS

    neck = MODELS.build(src.model["neck"])
    neck.load_state_dict({k[len("neck."):]: v for k, v in src.state_dict.items() if k.startswith("neck.")})
    xs = [torch.randn(1, 32, 4, 4) for _ in range(4)]
    outs = neck(xs)
    for i, (x, scale) in enumerate(zip(xs, (4, 2, 1, 0.5))):
        lat = F.conv2d(x, sd[f"neck.lateral_convs.{i}.conv.weight"], sd[f"neck.lateral_convs.{i}.conv.bias"])
        lat = F.interpolate(lat, scale_factor=scale, mode="bilinear", align_corners=False)
        ref = F.conv2d(lat, sd[f"neck.convs.{i}.conv.weight"], sd[f"neck.convs.{i}.conv.bias"], padding=1)
        assert outs[i].shape == ref.shape and torch.allclose(outs[i], ref, atol=1e-5)


def test_recorded_config_text_wins_and_bad_index_is_refused():
    text = ("model = dict(type='EncoderDecoder', backbone=dict(type='VisionTransformer', out_indices=(1, 2, 3, 3), "
            "norm_cfg=dict(type='LN', eps=1e-05)), neck=dict(type='MultiLevelNeck'), "
            "auxiliary_head=dict(type='FCNHead', in_index=1))")
    assert recorded_settings(text) == dict(out_indices=[1, 2, 3, 3], norm_eps=1e-5, aux_in_index=1)
    assert recorded_settings("backbone=dict(num_heads=16, out_indices=[7, 11, 15, 23]), neck=dict(num_heads=3)") == dict(
        num_heads=16, out_indices=[7, 11, 15, 23])
    keys = mmseg_keys("vit", **SMALL)
    src = convert_state_dict(make(keys), "vit.pth", {"config": text.replace("(1, 2, 3, 3)", "(0, 1, 2, 3)")})
    assert src.model["backbone"]["out_indices"] == [0, 1, 2, 3] and src.model["backbone"]["norm_eps"] == 1e-5
    assert src.model["auxiliary_head"]["in_index"] == 1
    keys = mmseg_keys("beit", **SMALL)
    sd = make(keys)
    sd["backbone.layers.2.attn.relative_position_index"] = sd["backbone.layers.2.attn.relative_position_index"].flip(0)
    with pytest.raises(CheckpointError, match=r"layers\.2\.attn\.relative_position_index"):
        convert_state_dict(sd, "beit.pth")


def mmseg_backbone_reference(sd, family, x, out_indices, heads, final_norm=False, eps=1e-6):
    """mmseg's VisionTransformer / MAE / BEiT forward, written from its definitions, on the source
    state dict: the maps of ``out_indices`` (class token removed, NCHW)."""
    b = "backbone."
    w = sd[b + "patch_embed.projection.weight"]
    p = w.shape[-1]
    t = F.conv2d(x, w, sd[b + "patch_embed.projection.bias"], stride=p)
    B, C, h, wd = t.shape
    t = torch.cat([sd[b + "cls_token"].expand(B, -1, -1), t.flatten(2).transpose(1, 2)], dim=1)
    if b + "pos_embed" in sd:
        t = t + sd[b + "pos_embed"]
    depth = len({k.split(".")[2] for k in sd if k.startswith(b + "layers.")})
    outs = []
    for i in range(depth):
        L = f"{b}layers.{i}."
        y = F.layer_norm(t, (C,), sd[L + "ln1.weight"], sd[L + "ln1.bias"], eps)
        if family == "vit":
            qkv = F.linear(y, sd[L + "attn.attn.in_proj_weight"], sd[L + "attn.attn.in_proj_bias"])
        elif family == "beit":
            bias = torch.cat([sd[L + "attn.q_bias"], torch.zeros(C), sd[L + "attn.v_bias"]])
            qkv = F.linear(y, sd[L + "attn.qkv.weight"], bias)
        else:
            qkv = F.linear(y, sd[L + "attn.qkv.weight"], sd[L + "attn.qkv.bias"])
        q, k, v = qkv.reshape(B, -1, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attn = (q * (C // heads) ** -0.5) @ k.transpose(-2, -1)
        if family != "vit":
            n = h * wd + 1
            index = sd[L + "attn.relative_position_index"].view(-1)
            attn = attn + sd[L + "attn.relative_position_bias_table"][index].view(n, n, -1).permute(2, 0, 1)
        y = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B, -1, C)
        if family == "vit":
            y = F.linear(y, sd[L + "attn.attn.out_proj.weight"], sd[L + "attn.attn.out_proj.bias"])
        else:
            y = F.linear(y, sd[L + "attn.proj.weight"], sd[L + "attn.proj.bias"]) * sd[L + "gamma_1"]
        t = t + y
        y = F.layer_norm(t, (C,), sd[L + "ln2.weight"], sd[L + "ln2.bias"], eps)
        y = F.linear(F.gelu(F.linear(y, sd[L + "ffn.layers.0.0.weight"], sd[L + "ffn.layers.0.0.bias"])),
                     sd[L + "ffn.layers.1.weight"], sd[L + "ffn.layers.1.bias"])
        t = t + (y if family == "vit" else y * sd[L + "gamma_2"])
        if i == depth - 1 and final_norm:
            t = F.layer_norm(t, (C,), sd[b + "ln1.weight"], sd[b + "ln1.bias"], eps)
        if i in out_indices:
            outs.append(t[:, 1:].transpose(1, 2).reshape(B, C, h, wd))
    return outs


@pytest.mark.parametrize("family", ["vit", "mae", "beit"])
def test_converted_backbone_and_neck_give_mmsegs_outputs(family):
    """The converted vitasks backbone (+ Feature2Pyramid's first level) against mmseg's forward
    computed from the source weights: same maps for the same blocks."""
    keys = mmseg_keys(family, **SMALL, final_norm=family == "vit")
    sd = make(keys, seed=5)
    for k in [k for k in sd if k.endswith(("gamma_1", "gamma_2"))]:
        sd[k] = sd[k] * 0.1  # LayerScale-sized values keep the random network well conditioned
    # mmseg's stored config text (the ViT's head count is not in its weights)
    text = "model = dict(backbone=dict(type='X', num_heads=2, norm_cfg=dict(type='LN', eps=1e-06)), neck=dict())"
    src = convert_state_dict(sd, f"{family}.pth", {"config": text})
    assert src.model["backbone"]["num_heads"] == 2
    from vitasks.registry import MODELS

    model = MODELS.build(src.model).eval()
    model.load_state_dict(src.state_dict, strict=True)
    x = torch.randn(2, 3, 64, 64)
    out_indices = src.model["backbone"]["out_indices"]
    with torch.no_grad():
        got = model.backbone(x)
        ref = mmseg_backbone_reference(sd, family, x, out_indices, heads=2, final_norm=family == "vit")
        for a, r in zip(got, ref):
            assert torch.allclose(a, r, atol=1e-4, rtol=1e-4), (a - r).abs().max()
        if family != "vit":  # upsample_4x: deconv, BN (eval), GELU, deconv
            n = "neck.upsample_4x."
            y = F.conv_transpose2d(ref[0], sd[n + "0.weight"], sd[n + "0.bias"], stride=2)
            y = F.batch_norm(y, sd[n + "1.running_mean"], sd[n + "1.running_var"], sd[n + "1.weight"], sd[n + "1.bias"])
            y = F.conv_transpose2d(F.gelu(y), sd[n + "3.weight"], sd[n + "3.bias"], stride=2)
            assert torch.allclose(model.neck(got)[0], y, atol=1e-4, rtol=1e-4)
