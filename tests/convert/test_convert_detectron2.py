"""detectron2 ViTDet -> vitasks: the model zoo's key lists consumed exactly, with shapes; the
restricted unpickler; class order; the shipped configs hold the converted weights.

The key lists below are written from detectron2's model definitions (projects/ViTDet configs,
``modeling/backbone/vit.py`` ViT + SimpleFeaturePyramid, ``proposal_generator/rpn.py``
StandardRPNHead with ``conv_dims=[-1, -1]``, ``roi_heads/box_head.py`` FastRCNNConvFCHead
with 4 LN convs + 1 fc, ``fast_rcnn.py`` FastRCNNOutputLayers, ``mask_head.py``
MaskRCNNConvUpsampleHead, ``cascade_rcnn.py``), as a generator over the sizes.
"""

import collections
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitasks.convert import convert_checkpoint
from vitasks.convert.dense import COCO_CATEGORY_IDS, build_meta_model, compare_with_model
from vitasks.convert.detectron2 import convert_state_dict
from vitasks.convert.safe_pickle import load_plain_pickle
from vitasks.errors import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def detectron2_vitdet_keys(
    dim=768, depth=12, heads=12, img_size=1024, patch=16, window=14, global_blocks=(2, 5, 8, 11),
    pretrain_grid=14, mlp_ratio=4, fpn=256, conv=256, fc=1024, num_classes=80, cascade=False,
):
    """name -> shape of detectron2's ViTDet Mask R-CNN (or Cascade) state dict ("model")."""
    keys = collections.OrderedDict()
    grid = img_size // patch
    net = "backbone.net."
    keys[net + "pos_embed"] = (1, 1 + pretrain_grid**2, dim)
    keys[net + "patch_embed.proj.weight"] = (dim, 3, patch, patch)
    keys[net + "patch_embed.proj.bias"] = (dim,)
    for i in range(depth):
        b = f"{net}blocks.{i}."
        side = grid if i in global_blocks else window
        keys[b + "norm1.weight"] = keys[b + "norm1.bias"] = (dim,)
        keys[b + "attn.rel_pos_h"] = keys[b + "attn.rel_pos_w"] = (2 * side - 1, dim // heads)
        keys[b + "attn.qkv.weight"], keys[b + "attn.qkv.bias"] = (3 * dim, dim), (3 * dim,)
        keys[b + "attn.proj.weight"], keys[b + "attn.proj.bias"] = (dim, dim), (dim,)
        keys[b + "norm2.weight"] = keys[b + "norm2.bias"] = (dim,)
        keys[b + "mlp.fc1.weight"], keys[b + "mlp.fc1.bias"] = (mlp_ratio * dim, dim), (mlp_ratio * dim,)
        keys[b + "mlp.fc2.weight"], keys[b + "mlp.fc2.bias"] = (dim, mlp_ratio * dim), (dim,)

    def conv_ln(name, cin, k):
        keys[name + ".weight"] = (fpn, cin, k, k)
        keys[name + ".norm.weight"] = keys[name + ".norm.bias"] = (fpn,)

    keys["backbone.simfp_2.0.weight"], keys["backbone.simfp_2.0.bias"] = (dim, dim // 2, 2, 2), (dim // 2,)
    keys["backbone.simfp_2.1.weight"] = keys["backbone.simfp_2.1.bias"] = (dim // 2,)
    keys["backbone.simfp_2.3.weight"], keys["backbone.simfp_2.3.bias"] = (dim // 2, dim // 4, 2, 2), (dim // 4,)
    conv_ln("backbone.simfp_2.4", dim // 4, 1)
    conv_ln("backbone.simfp_2.5", fpn, 3)
    keys["backbone.simfp_3.0.weight"], keys["backbone.simfp_3.0.bias"] = (dim, dim // 2, 2, 2), (dim // 2,)
    conv_ln("backbone.simfp_3.1", dim // 2, 1)
    conv_ln("backbone.simfp_3.2", fpn, 3)
    conv_ln("backbone.simfp_4.0", dim, 1)
    conv_ln("backbone.simfp_4.1", fpn, 3)
    conv_ln("backbone.simfp_5.1", dim, 1)  # simfp_5.0 is the max pool
    conv_ln("backbone.simfp_5.2", fpn, 3)

    rpn = "proposal_generator.rpn_head."
    for k in range(2):
        keys[f"{rpn}conv.conv{k}.weight"], keys[f"{rpn}conv.conv{k}.bias"] = (fpn, fpn, 3, 3), (fpn,)
    keys[rpn + "objectness_logits.weight"], keys[rpn + "objectness_logits.bias"] = (3, fpn, 1, 1), (3,)
    keys[rpn + "anchor_deltas.weight"], keys[rpn + "anchor_deltas.bias"] = (12, fpn, 1, 1), (12,)

    def box(head, predictor, agnostic):
        for k in range(1, 5):
            keys[f"{head}.conv{k}.weight"] = (conv, fpn if k == 1 else conv, 3, 3)
            keys[f"{head}.conv{k}.norm.weight"] = keys[f"{head}.conv{k}.norm.bias"] = (conv,)
        keys[f"{head}.fc1.weight"], keys[f"{head}.fc1.bias"] = (fc, conv * 7 * 7), (fc,)
        keys[f"{predictor}.cls_score.weight"], keys[f"{predictor}.cls_score.bias"] = (num_classes + 1, fc), (num_classes + 1,)
        reg = 4 if agnostic else 4 * num_classes
        keys[f"{predictor}.bbox_pred.weight"], keys[f"{predictor}.bbox_pred.bias"] = (reg, fc), (reg,)

    if cascade:
        for s in range(3):
            box(f"roi_heads.box_head.{s}", f"roi_heads.box_predictor.{s}", True)
    else:
        box("roi_heads.box_head", "roi_heads.box_predictor", False)
    m = "roi_heads.mask_head."
    for k in range(1, 5):
        keys[f"{m}mask_fcn{k}.weight"] = (conv, fpn if k == 1 else conv, 3, 3)
        keys[f"{m}mask_fcn{k}.norm.weight"] = keys[f"{m}mask_fcn{k}.norm.bias"] = (conv,)
    keys[m + "deconv.weight"], keys[m + "deconv.bias"] = (conv, conv, 2, 2), (conv,)
    keys[m + "predictor.weight"], keys[m + "predictor.bias"] = (num_classes, conv, 1, 1), (num_classes,)
    return keys


SMALL = dict(dim=32, depth=4, heads=2, img_size=128, patch=16, window=4, global_blocks=(1, 3), pretrain_grid=4,
             fpn=16, conv=16, fc=32)


def random_weights(keys, seed=0):
    rng = np.random.default_rng(seed)
    return collections.OrderedDict((k, rng.standard_normal(s).astype(np.float32)) for k, s in keys.items())


def write_zoo_pkl(path, weights):
    # As detectron2's model zoo files: {"model": {name: ndarray}, "__author__": ..., ...}
    with open(path, "wb") as f:
        pickle.dump({"model": weights, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}, f)


def meta_weights(keys):
    return {k: torch.empty(s, device="meta") for k, s in keys.items()}


@pytest.mark.parametrize("cascade", [False, True])
def test_full_size_vitdet_b_key_list_consumed_with_shapes(cascade):
    """ViT-B at full size, shapes only (meta tensors): every detectron2 key used once, every key
    of the vitasks model present with the same shape (pos_embed: 14x14, resampled at load)."""
    keys = detectron2_vitdet_keys(cascade=cascade)
    src = convert_state_dict(meta_weights(keys), "model_final.pkl")
    assert sorted(src.key_map) == sorted(keys)
    assert all(src.key_map.values())  # every source key has a vitasks counterpart
    assert len(set(src.key_map.values())) == len(keys)
    report = compare_with_model(src.state_dict, src.model)
    assert report == dict(missing=[], unexpected=[], shapes=[])
    assert tuple(src.state_dict["backbone.pos_embed"].shape) == (1, 196, 768)
    b = src.model["backbone"]
    assert b["pretrain_img_size"] == 224
    assert (b["embed_dim"], b["depth"], b["num_heads"], b["window_size"], b["global_indices"], b["img_size"]) == (
        768, 12, 12, 14, [2, 5, 8, 11], 1024)
    assert b["norm_eps"] == 1e-6
    assert src.model["type"] == ("CascadeMaskRCNN" if cascade else "MaskRCNN")


@pytest.mark.parametrize("cascade", [False, True])
def test_shipped_config_holds_the_weights_with_the_recorded_options(cascade):
    """The converter's recorded --cfg-options make configs/det_coco*.yaml build exactly the model
    of the converted state dict (checked on the meta device at full size)."""
    from vitasks.config import load_config

    src = convert_state_dict(meta_weights(detectron2_vitdet_keys(cascade=cascade)), "model_final.pkl")
    _, meta = src.to_vitasks()
    config = os.path.join(ROOT, meta["config"])
    cfg = load_config(config, meta["cfg_options"] or None)
    assert compare_with_model(src.state_dict, cfg.model) == dict(missing=[], unexpected=[], shapes=[])
    # ViTDet's architecture is what the shipped configs say, but for the stored 14 x 14
    # position grid (pretrain_img_size, until the configs set it).
    assert set(meta["cfg_options"]) <= {"model.backbone.pretrain_img_size=224"}
    assert cfg.model.backbone.pretrain_img_size == 224 and cfg.model.backbone.get("norm_eps", 1e-6) == 1e-6


def test_convert_pkl_loads_exactly_and_keeps_values(tmp_path):
    keys = detectron2_vitdet_keys(**SMALL)
    weights = random_weights(keys)
    write_zoo_pkl(tmp_path / "model_final.pkl", weights)
    ckpt = convert_checkpoint("detectron2", str(tmp_path / "model_final.pkl"), str(tmp_path / "out.pth"), verbose=False)
    meta = ckpt["meta"]
    assert meta["converted_from"] == "detectron2" and meta["task"] == "MaskRCNN"
    assert meta["dataset_meta"]["cat_ids"] == list(COCO_CATEGORY_IDS)
    assert meta["dataset_meta"]["classes"][0] == "person" and len(meta["dataset_meta"]["classes"]) == 80

    from vitasks.registry import MODELS

    torch.manual_seed(0)
    model = MODELS.build(meta["model_hint"])
    saved = torch.load(tmp_path / "out.pth", weights_only=True)
    result = model.load_state_dict(saved["state_dict"], strict=True)  # every key, no other
    assert not result.missing_keys and not result.unexpected_keys
    own = model.state_dict()
    t = lambda k: torch.from_numpy(weights[k])  # noqa: E731
    # Every weight arrives unchanged under its new name (the position grid without the class
    # token's entry; COCO's class order is vitasks').
    key_map = convert_state_dict(weights, "model_final.pkl").key_map
    for old, new in key_map.items():
        expected = t(old)[:, 1:] if old.endswith("pos_embed") else t(old)
        assert torch.equal(own[new], expected), (old, new)
    # qkv stays fused in the same (q, k, v) order; relative-position tables as they are.
    assert torch.equal(own["backbone.blocks.1.attn.qkv.weight"], t("backbone.net.blocks.1.attn.qkv.weight"))
    assert torch.equal(own["backbone.blocks.0.attn.rel_pos_h"], t("backbone.net.blocks.0.attn.rel_pos_h"))
    # The neck's x4 branch: deconv, LN, deconv, then the lateral conv and its norm.
    assert torch.equal(own["neck.levels.0.rescale.3.weight"], t("backbone.simfp_2.3.weight"))
    assert torch.equal(own["neck.levels.0.lateral.norm.bias"], t("backbone.simfp_2.4.norm.bias"))
    assert torch.equal(own["neck.levels.3.output.conv.weight"], t("backbone.simfp_5.2.weight"))
    assert torch.equal(own["rpn_head.convs.2.weight"], t("proposal_generator.rpn_head.conv.conv1.weight"))
    # COCO in detectron2's order is vitasks' order: rows unchanged, background last.
    assert torch.equal(own["roi_head.box_head.cls_score.weight"], t("roi_heads.box_predictor.cls_score.weight"))
    assert torch.equal(own["roi_head.box_head.bbox_pred.bias"], t("roi_heads.box_predictor.bbox_pred.bias"))
    assert torch.equal(own["roi_head.box_head.convs.3.1.weight"], t("roi_heads.box_head.conv4.norm.weight"))
    assert torch.equal(own["roi_head.mask_head.predictor.weight"], t("roi_heads.mask_head.predictor.weight"))
    # pos_embed: the stored 4 x 4 grid without the class token's entry; in the forward pass
    # detectron2's get_abs_pos (bicubic to the input's grid, align_corners=False).
    assert torch.equal(own["backbone.pos_embed"], t("backbone.net.pos_embed")[:, 1:])
    pos = t("backbone.net.pos_embed")[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(pos, size=(8, 8), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 64, 32)
    with torch.no_grad():
        assert torch.allclose(model.backbone._pos_embed_for((8, 8)), expected, atol=1e-6)


def test_cascade_small_and_class_order_permutation():
    keys = detectron2_vitdet_keys(**SMALL, cascade=True)
    weights = random_weights(keys, seed=1)
    # A checkpoint whose classes come in another order: category ids reversed.
    ids = list(reversed(COCO_CATEGORY_IDS))
    src = convert_state_dict(weights, "x.pkl", source_cat_ids=ids)
    assert src.model["type"] == "CascadeMaskRCNN"
    assert src.dataset_meta["cat_ids"] == sorted(ids)
    cls = torch.from_numpy(weights["roi_heads.box_predictor.2.cls_score.weight"])
    got = src.state_dict["roi_head.box_heads.2.cls_score.weight"]
    assert torch.equal(got[:80], cls[:80].flip(0)) and torch.equal(got[80], cls[80])  # background stays last
    # class-agnostic cascade boxes are not permuted; the class-specific mask predictor is
    mask = torch.from_numpy(weights["roi_heads.mask_head.predictor.bias"])
    assert torch.equal(src.state_dict["roi_head.mask_head.predictor.bias"], mask.flip(0))
    assert torch.equal(src.state_dict["roi_head.box_heads.0.bbox_pred.weight"],
                       torch.from_numpy(weights["roi_heads.box_predictor.0.bbox_pred.weight"]))
    from vitasks.registry import MODELS

    model = MODELS.build(src.model)
    result = model.load_state_dict(src.state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_class_specific_boxes_permuted_in_groups_of_four():
    keys = detectron2_vitdet_keys(**SMALL)
    weights = random_weights(keys, seed=2)
    ids = list(COCO_CATEGORY_IDS)
    ids[0], ids[1] = ids[1], ids[0]  # the checkpoint's class 0 is COCO id 2 (bicycle)
    src = convert_state_dict(weights, "x.pkl", source_cat_ids=ids)
    reg = torch.from_numpy(weights["roi_heads.box_predictor.bbox_pred.weight"])
    got = src.state_dict["roi_head.box_head.bbox_pred.weight"]
    assert torch.equal(got[0:4], reg[4:8]) and torch.equal(got[4:8], reg[0:4]) and torch.equal(got[8:], reg[8:])


def test_leftover_and_missing_keys_are_errors_naming_them():
    keys = detectron2_vitdet_keys(**SMALL)
    weights = random_weights(keys)
    weights["backbone.net.blocks.0.residual.conv1.weight"] = np.zeros((4, 32, 1, 1), np.float32)
    with pytest.raises(CheckpointError, match=r"residual\.conv1\.weight"):
        convert_state_dict(weights, "extra.pkl")
    weights = random_weights(keys)
    del weights["roi_heads.mask_head.deconv.bias"]
    with pytest.raises(CheckpointError, match=r"missing\.pkl.*mask_head\.deconv\.bias"):
        convert_state_dict(weights, "missing.pkl")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_a_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / "was_run"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"backbone.net.pos_embed": _RunsCode(str(marker))}, "__author__": "x"}, f)
    with pytest.raises(CheckpointError, match=r"evil\.pkl.*system"):
        load_plain_pickle(str(path))
    with pytest.raises(CheckpointError, match=r"evil\.pkl"):
        convert_checkpoint("detectron2", str(path), None, verbose=False)
    assert not marker.exists()
    # Object arrays would unpickle Python objects: refused too.
    with open(path, "wb") as f:
        pickle.dump({"model": {"a": np.array([1, "x"], dtype=object)}}, f)
    with pytest.raises(CheckpointError, match="object"):
        load_plain_pickle(str(path))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickler_reads_plain_data(tmp_path, protocol):
    data = {"model": collections.OrderedDict(a=np.arange(6, dtype=np.float32).reshape(2, 3), b=np.float64(2.5)),
            "__author__": "Detectron2 Model Zoo", "matching_heuristics": True, "list": [1, "two", (3.0,)]}
    with open(tmp_path / "ok.pkl", "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    out = load_plain_pickle(str(tmp_path / "ok.pkl"))
    assert np.array_equal(out["model"]["a"], data["model"]["a"]) and out["model"]["a"].dtype == np.float32
    assert out["model"]["b"] == 2.5 and out["list"] == [1, "two", (3.0,)]


def test_meta_model_is_the_hint():
    src = convert_state_dict(random_weights(detectron2_vitdet_keys(**SMALL)), "x.pkl")
    model = build_meta_model(src.model)
    assert model.backbone.window_size == 4 and model.backbone.global_indices == (1, 3)


# ------------------------------------------------------------------------------------------------
# detectron2's forward, written from its definitions (modeling/backbone/vit.py and utils.py,
# layers/batch_norm.py LayerNorm, rpn.py, box_head.py, fast_rcnn.py, mask_head.py), on the source
# weights: the converted vitasks modules must give the same outputs.


def _ln2d(x, w, b, eps=1e-6):  # detectron2's channels-first LayerNorm
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    return w[:, None, None] * ((x - u) / torch.sqrt(s + eps)) + b[:, None, None]


def _rel_pos(q_size, k_size, table):
    length = 2 * max(q_size, k_size) - 1
    if table.shape[0] != length:
        table = F.interpolate(table.reshape(1, table.shape[0], -1).permute(0, 2, 1), size=length, mode="linear")
        table = table.reshape(-1, length).permute(1, 0)
    q = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    return table[((q - k) + (k_size - 1) * max(q_size / k_size, 1.0)).long()]


def _vit_reference(w, x, heads, window, global_blocks, pretrain_grid):
    n = "backbone.net."
    x = F.conv2d(x, w[n + "patch_embed.proj.weight"], w[n + "patch_embed.proj.bias"], stride=16).permute(0, 2, 3, 1)
    B, H, W, C = x.shape
    pos = w[n + "pos_embed"][:, 1:].reshape(1, pretrain_grid, pretrain_grid, C).permute(0, 3, 1, 2)
    x = x + F.interpolate(pos, size=(H, W), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    depth = len({k.split(".")[3] for k in w if k.startswith(n + "blocks.")})
    for i in range(depth):
        p = f"{n}blocks.{i}."
        shortcut = x
        y = F.layer_norm(x, (C,), w[p + "norm1.weight"], w[p + "norm1.bias"], 1e-6)
        ws = 0 if i in global_blocks else window
        if ws:
            ph, pw = (ws - H % ws) % ws, (ws - W % ws) % ws
            y = F.pad(y, (0, 0, 0, pw, 0, ph))
            Hp, Wp = H + ph, W + pw
            y = y.view(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, C)
        b_, h, wd, _ = y.shape
        qkv = F.linear(y, w[p + "attn.qkv.weight"], w[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b_, h * wd, 3, heads, -1).permute(2, 0, 3, 1, 4).reshape(3, b_ * heads, h * wd, -1).unbind(0)
        attn = (q * (C // heads) ** -0.5) @ k.transpose(-2, -1)
        Rh, Rw = _rel_pos(h, h, w[p + "attn.rel_pos_h"]), _rel_pos(wd, wd, w[p + "attn.rel_pos_w"])
        r_q = q.reshape(-1, h, wd, C // heads)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw)
        attn = (attn.view(-1, h, wd, h, wd) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).view(-1, h * wd, h * wd)
        y = (attn.softmax(-1) @ v).view(b_, heads, h, wd, -1).permute(0, 2, 3, 1, 4).reshape(b_, h, wd, -1)
        y = F.linear(y, w[p + "attn.proj.weight"], w[p + "attn.proj.bias"])
        if ws:
            y = y.view(B, Hp // ws, Wp // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)[:, :H, :W]
        x = shortcut + y
        y = F.layer_norm(x, (C,), w[p + "norm2.weight"], w[p + "norm2.bias"], 1e-6)
        y = F.linear(F.gelu(F.linear(y, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"])), w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
        x = x + y
    return x.permute(0, 3, 1, 2)


def _conv_ln(w, name, x, padding):
    return _ln2d(F.conv2d(x, w[name + ".weight"], padding=padding), w[name + ".norm.weight"], w[name + ".norm.bias"])


def _simfp_reference(w, x):
    s = "backbone.simfp_"
    outs = []
    y = F.conv_transpose2d(x, w[s + "2.0.weight"], w[s + "2.0.bias"], stride=2)
    y = F.gelu(_ln2d(y, w[s + "2.1.weight"], w[s + "2.1.bias"]))
    y = F.conv_transpose2d(y, w[s + "2.3.weight"], w[s + "2.3.bias"], stride=2)
    outs.append(_conv_ln(w, s + "2.5", _conv_ln(w, s + "2.4", y, 0), 1))
    y = F.conv_transpose2d(x, w[s + "3.0.weight"], w[s + "3.0.bias"], stride=2)
    outs.append(_conv_ln(w, s + "3.2", _conv_ln(w, s + "3.1", y, 0), 1))
    outs.append(_conv_ln(w, s + "4.1", _conv_ln(w, s + "4.0", x, 0), 1))
    y = F.max_pool2d(x, 2, 2)
    outs.append(_conv_ln(w, s + "5.2", _conv_ln(w, s + "5.1", y, 0), 1))
    outs.append(F.max_pool2d(outs[-1], 1, 2))  # LastLevelMaxPool
    return outs


def test_converted_modules_give_detectron2s_outputs():
    keys = detectron2_vitdet_keys(**SMALL)
    w = {k: torch.from_numpy(v) for k, v in random_weights(keys, seed=3).items()}
    for k in w:  # keep the random network well conditioned
        if k.endswith(("attn.proj.weight", "mlp.fc2.weight")):
            w[k] = w[k] * 0.05
    src = convert_state_dict({k: v.numpy() for k, v in w.items()}, "x.pkl")
    from vitasks.registry import MODELS

    model = MODELS.build(src.model).eval()
    model.load_state_dict(src.state_dict, strict=True)
    x = torch.randn(1, 3, 96, 128)  # 6 x 8 patches: padded windows, resampled global tables
    with torch.no_grad():
        feat = model.backbone(x)[0]
        ref = _vit_reference(w, x, heads=2, window=4, global_blocks=(1, 3), pretrain_grid=4)
        assert torch.allclose(feat, ref, atol=1e-4, rtol=1e-4), (feat - ref).abs().max()
        pyramid = model.neck((ref,))
        for a, b in zip(pyramid, _simfp_reference(w, ref)):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4, rtol=1e-4)
        r = "proposal_generator.rpn_head."
        objectness, deltas = model.rpn_head(list(pyramid))
        for level, p in enumerate(pyramid):
            t = F.relu(F.conv2d(p, w[r + "conv.conv0.weight"], w[r + "conv.conv0.bias"], padding=1))
            t = F.relu(F.conv2d(t, w[r + "conv.conv1.weight"], w[r + "conv.conv1.bias"], padding=1))
            assert torch.allclose(objectness[level], F.conv2d(t, w[r + "objectness_logits.weight"], w[r + "objectness_logits.bias"]), atol=1e-4)
            assert torch.allclose(deltas[level], F.conv2d(t, w[r + "anchor_deltas.weight"], w[r + "anchor_deltas.bias"]), atol=1e-4)
        pooled = torch.randn(5, 16, 7, 7)
        t = pooled
        for k in range(1, 5):
            t = F.relu(_conv_ln(w, f"roi_heads.box_head.conv{k}", t, 1))
        t = F.relu(F.linear(t.flatten(1), w["roi_heads.box_head.fc1.weight"], w["roi_heads.box_head.fc1.bias"]))
        scores, boxes = model.roi_head.box_head(pooled)
        p = "roi_heads.box_predictor."
        assert torch.allclose(scores, F.linear(t, w[p + "cls_score.weight"], w[p + "cls_score.bias"]), atol=1e-4, rtol=1e-4)
        assert torch.allclose(boxes, F.linear(t, w[p + "bbox_pred.weight"], w[p + "bbox_pred.bias"]), atol=1e-4, rtol=1e-4)
        pooled = torch.randn(3, 16, 14, 14)
        t = pooled
        for k in range(1, 5):
            t = F.relu(_conv_ln(w, f"roi_heads.mask_head.mask_fcn{k}", t, 1))
        m = "roi_heads.mask_head."
        t = F.relu(F.conv_transpose2d(t, w[m + "deconv.weight"], w[m + "deconv.bias"], stride=2))
        expected = F.conv2d(t, w[m + "predictor.weight"], w[m + "predictor.bias"])
        assert torch.allclose(model.roi_head.mask_head(pooled), expected, atol=1e-4, rtol=1e-4)
