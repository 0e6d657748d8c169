"""mmdetection ViTDet -> vitasks: the released checkpoint's key list consumed exactly, with
shapes; values, class order by the recorded class names, LayerNorm epsilon recorded and checked.

The key list is written from mmdetection's model definitions (projects/ViTDet
``vitdet_mask-rcnn_vit-b-mae_lsj-100e.py`` on ``mask-rcnn_r50_fpn.py``; ``vitdet/vit.py`` ViT,
``vitdet/simple_fpn.py`` SimpleFPN with LN2d ConvModules, mmdet's RPNHead with
``num_convs=2``, ``Shared4Conv1FCBBoxHead`` and ``FCNMaskHead`` with LN2d), as a generator over
the sizes. mmcv's ``build_norm_layer`` names an ``LN2d`` layer ``norm_layer``.
"""

import collections
import os

import numpy as np
import pytest
import torch

from vitasks.cli import main
from vitasks.convert import convert_checkpoint
from vitasks.convert.dense import COCO_CLASSES, compare_with_model
from vitasks.convert.mmdet import convert_state_dict
from vitasks.errors import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def mmdet_vitdet_keys(dim=768, depth=12, heads=12, img_size=1024, patch=16, window=14, global_blocks=(2, 5, 8, 11),
                      pretrain_grid=14, mlp_ratio=4, fpn=256, conv=256, fc=1024, num_classes=80, norm="norm_layer"):
    keys = collections.OrderedDict()
    grid = img_size // patch
    keys["backbone.pos_embed"] = (1, 1 + pretrain_grid**2, dim)
    keys["backbone.patch_embed.proj.weight"], keys["backbone.patch_embed.proj.bias"] = (dim, 3, patch, patch), (dim,)
    for i in range(depth):
        b = f"backbone.blocks.{i}."
        side = grid if i in global_blocks else window
        keys[b + "norm1.weight"] = keys[b + "norm1.bias"] = (dim,)
        keys[b + "attn.rel_pos_h"] = keys[b + "attn.rel_pos_w"] = (2 * side - 1, dim // heads)
        keys[b + "attn.qkv.weight"], keys[b + "attn.qkv.bias"] = (3 * dim, dim), (3 * dim,)
        keys[b + "attn.proj.weight"], keys[b + "attn.proj.bias"] = (dim, dim), (dim,)
        keys[b + "norm2.weight"] = keys[b + "norm2.bias"] = (dim,)
        keys[b + "mlp.fc1.weight"], keys[b + "mlp.fc1.bias"] = (mlp_ratio * dim, dim), (mlp_ratio * dim,)
        keys[b + "mlp.fc2.weight"], keys[b + "mlp.fc2.bias"] = (dim, mlp_ratio * dim), (dim,)
    keys["neck.fpn1.0.weight"], keys["neck.fpn1.0.bias"] = (dim, dim // 2, 2, 2), (dim // 2,)
    keys["neck.fpn1.1.weight"] = keys["neck.fpn1.1.bias"] = (dim // 2,)
    keys["neck.fpn1.3.weight"], keys["neck.fpn1.3.bias"] = (dim // 2, dim // 4, 2, 2), (dim // 4,)
    keys["neck.fpn2.0.weight"], keys["neck.fpn2.0.bias"] = (dim, dim // 2, 2, 2), (dim // 2,)

    def conv_module(name, cin, cout, k):
        keys[f"{name}.conv.weight"] = (cout, cin, k, k)
        keys[f"{name}.{norm}.weight"] = keys[f"{name}.{norm}.bias"] = (cout,)

    for i, cin in enumerate((dim // 4, dim // 2, dim, dim)):
        conv_module(f"neck.lateral_convs.{i}", cin, fpn, 1)
        conv_module(f"neck.fpn_convs.{i}", fpn, fpn, 3)
    for k in range(2):
        keys[f"rpn_head.rpn_conv.{k}.conv.weight"], keys[f"rpn_head.rpn_conv.{k}.conv.bias"] = (fpn, fpn, 3, 3), (fpn,)
    keys["rpn_head.rpn_cls.weight"], keys["rpn_head.rpn_cls.bias"] = (3, fpn, 1, 1), (3,)
    keys["rpn_head.rpn_reg.weight"], keys["rpn_head.rpn_reg.bias"] = (12, fpn, 1, 1), (12,)
    h = "roi_head.bbox_head."
    for k in range(4):
        conv_module(f"{h}shared_convs.{k}", fpn if k == 0 else conv, conv, 3)
    keys[h + "shared_fcs.0.weight"], keys[h + "shared_fcs.0.bias"] = (fc, conv * 49), (fc,)
    keys[h + "fc_cls.weight"], keys[h + "fc_cls.bias"] = (num_classes + 1, fc), (num_classes + 1,)
    keys[h + "fc_reg.weight"], keys[h + "fc_reg.bias"] = (4 * num_classes, fc), (4 * num_classes,)
    m = "roi_head.mask_head."
    for k in range(4):
        conv_module(f"{m}convs.{k}", fpn if k == 0 else conv, conv, 3)
    keys[m + "upsample.weight"], keys[m + "upsample.bias"] = (conv, conv, 2, 2), (conv,)
    keys[m + "conv_logits.weight"], keys[m + "conv_logits.bias"] = (num_classes, conv, 1, 1), (num_classes,)
    return keys


SMALL = dict(dim=32, depth=4, heads=2, img_size=128, patch=16, window=4, global_blocks=(1, 3), pretrain_grid=4,
             fpn=16, conv=16, fc=32)


def released_meta(classes=COCO_CLASSES):
    return {"dataset_meta": {"classes": tuple(classes), "palette": [(220, 20, 60)] * len(classes)},
            "mmdet_version": "3.0.0rc6", "seed": 0, "experiment_name": "vitdet_mask-rcnn_vit-b-mae_lsj-100e"}


def test_full_size_key_list_consumed_with_shapes():
    keys = mmdet_vitdet_keys()
    src = convert_state_dict({k: torch.empty(s, device="meta") for k, s in keys.items()}, "vitdet.pth", released_meta())
    assert sorted(src.key_map) == sorted(keys) and all(src.key_map.values())
    assert len(set(src.key_map.values())) == len(keys)
    assert compare_with_model(src.state_dict, src.model) == dict(missing=[], unexpected=[], shapes=[])
    assert src.model["backbone"]["norm_eps"] == 1e-5
    # The options det_coco.yaml needs for these weights: the backbone's LayerNorm epsilon (and
    # the stored 14 x 14 position grid, until the config sets it).
    _, meta = src.to_vitasks()
    assert set(meta["cfg_options"]) <= {"model.backbone.norm_eps=1.0e-05", "model.backbone.pretrain_img_size=224"}
    from vitasks.config import load_config

    cfg = load_config(os.path.join(ROOT, "configs/det_coco.yaml"), meta["cfg_options"] or None)
    assert compare_with_model(src.state_dict, cfg.model) == dict(missing=[], unexpected=[], shapes=[])
    assert cfg.model.backbone.norm_eps == 1e-5 and cfg.model.backbone.pretrain_img_size == 224


def test_convert_pth_loads_exactly_keeps_values_and_records_eps(tmp_path):
    keys = mmdet_vitdet_keys(**SMALL)
    rng = np.random.default_rng(0)
    sd = collections.OrderedDict((k, torch.from_numpy(rng.standard_normal(s).astype(np.float32))) for k, s in keys.items())
    torch.save({"meta": released_meta(), "state_dict": sd}, tmp_path / "vitdet.pth")
    rc = main(["convert", "mmdet", str(tmp_path / "vitdet.pth"), str(tmp_path / "out.pth")])
    assert rc == 0
    ckpt = torch.load(tmp_path / "out.pth", weights_only=True)
    meta = ckpt["meta"]
    assert meta["architecture"]["norm_eps"] == 1e-5 and meta["dataset_meta"]["classes"] == list(COCO_CLASSES)

    from vitasks.engine.checkpoint import load_model_weights
    from vitasks.registry import MODELS

    # Every weight arrives unchanged under its new name (the position grid without the class
    # token's entry; COCO's class order is vitasks').
    src = convert_state_dict(sd, "vitdet.pth", released_meta())
    for old, new in src.key_map.items():
        expected = sd[old][:, 1:] if old == "backbone.pos_embed" else sd[old]
        assert torch.equal(ckpt["state_dict"][new], expected), (old, new)

    model = MODELS.build(meta["model_hint"])
    result = model.load_state_dict(ckpt["state_dict"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    own = model.state_dict()
    assert torch.equal(own["neck.levels.1.rescale.weight"], sd["neck.fpn2.0.weight"])
    assert torch.equal(own["neck.levels.2.lateral.norm.weight"], sd["neck.lateral_convs.2.norm_layer.weight"])
    assert torch.equal(own["rpn_head.convs.2.bias"], sd["rpn_head.rpn_conv.1.conv.bias"])
    assert torch.equal(own["rpn_head.objectness.weight"], sd["rpn_head.rpn_cls.weight"])
    assert torch.equal(own["roi_head.box_head.fcs.0.weight"], sd["roi_head.bbox_head.shared_fcs.0.weight"])
    assert torch.equal(own["roi_head.box_head.cls_score.weight"], sd["roi_head.bbox_head.fc_cls.weight"])
    assert torch.equal(own["roi_head.mask_head.deconv.weight"], sd["roi_head.mask_head.upsample.weight"])
    assert torch.equal(own["backbone.blocks.3.attn.qkv.bias"], sd["backbone.blocks.3.attn.qkv.bias"])
    assert model.backbone.blocks[0].norm1.eps == 1e-5

    # Loading into a detector whose backbone says eps 1e-6 warns, naming the setting.
    hint = dict(meta["model_hint"])
    hint["backbone"] = dict(hint["backbone"], norm_eps=1e-6)
    other = MODELS.build(hint)
    from vitasks.engine.checkpoint import load_checkpoint_file

    loaded = load_checkpoint_file(str(tmp_path / "out.pth"))
    report = load_model_weights(other, loaded["state_dict"], "out.pth")
    assert ("norm_eps", 1e-5, 1e-6) in report["architecture"]


def test_class_rows_follow_the_recorded_class_names():
    keys = mmdet_vitdet_keys(**SMALL)
    rng = np.random.default_rng(1)
    sd = {k: torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for k, s in keys.items()}
    names = list(COCO_CLASSES)
    names[0], names[2] = names[2], names[0]  # this checkpoint's class 0 is "car", class 2 "person"
    src = convert_state_dict(sd, "x.pth", released_meta(names))
    assert src.dataset_meta["classes"] == list(COCO_CLASSES)
    cls = sd["roi_head.bbox_head.fc_cls.weight"]
    got = src.state_dict["roi_head.box_head.cls_score.weight"]
    assert torch.equal(got[0], cls[2]) and torch.equal(got[2], cls[0]) and torch.equal(got[80], cls[80])
    reg = sd["roi_head.bbox_head.fc_reg.bias"]
    got = src.state_dict["roi_head.box_head.bbox_pred.bias"]
    assert torch.equal(got[0:4], reg[8:12]) and torch.equal(got[8:12], reg[0:4])
    masks = sd["roi_head.mask_head.conv_logits.weight"]
    assert torch.equal(src.state_dict["roi_head.mask_head.predictor.weight"][2], masks[0])


def test_errors_name_the_file_and_keys(tmp_path):
    keys = mmdet_vitdet_keys(**SMALL)
    sd = {k: torch.zeros(s) for k, s in keys.items()}
    sd["roi_head.bbox_head.reg_fcs.0.weight"] = torch.zeros(4, 4)
    with pytest.raises(CheckpointError, match=r"x\.pth.*reg_fcs"):
        convert_state_dict(sd, "x.pth")
    with pytest.raises(CheckpointError, match="options"):
        convert_checkpoint("mmdet", str(tmp_path / "none.pth"), None, num_classes=3)
    with pytest.raises(CheckpointError, match="no such"):
        convert_checkpoint("mmdet", str(tmp_path / "none.pth"), None)


STORED_CFG = """model = dict(
    type='MaskRCNN',
    backbone=dict(
        type='ViT',
        img_size=1024,
        patch_size=16,
        embed_dim=32,
        depth=4,
        num_heads=2,
        drop_path_rate=0.1,
        window_size=4,
        mlp_ratio=4,
        qkv_bias=True,
        norm_cfg=dict(type='LN', requires_grad=True),
        window_block_indexes=[
            0,
            2,
        ],
        use_rel_pos=True,
        init_cfg=dict(type='Pretrained', checkpoint='mae_pretrain_vit_base.pth')),
    neck=dict(type='SimpleFPN', backbone_channel=32, norm_cfg=dict(type='LN2d', requires_grad=True)))
"""


def test_stored_config_is_checked_against_the_weights():
    keys = mmdet_vitdet_keys(**SMALL)
    sd = {k: torch.zeros(s) for k, s in keys.items()}
    meta = dict(released_meta(), cfg=STORED_CFG)
    src = convert_state_dict(sd, "x.pth", meta)  # windows 0, 2 -> global 1, 3 as the tables say
    assert src.model["backbone"]["norm_eps"] == 1e-5 and src.model["backbone"]["global_indices"] == [1, 3]
    assert any("stored in the file" in n for n in src.notes)
    with pytest.raises(CheckpointError, match=r"x\.pth.*global_indices: weights \[1, 3\], stored config \[2, 3\]"):
        convert_state_dict(sd, "x.pth", dict(meta, cfg=STORED_CFG.replace("            2,", "            1,")))
    with pytest.raises(CheckpointError, match="depth: weights 4, stored config 12"):
        convert_state_dict(sd, "x.pth", dict(meta, cfg=STORED_CFG.replace("depth=4", "depth=12")))
    eps6 = STORED_CFG.replace("norm_cfg=dict(type='LN', requires_grad=True)", "norm_cfg=dict(type='LN', eps=1e-06)")
    assert convert_state_dict(sd, "x.pth", dict(meta, cfg=eps6)).model["backbone"]["norm_eps"] == 1e-6


def test_other_datasets_keep_their_class_order():
    keys = mmdet_vitdet_keys(**SMALL, num_classes=3)
    sd = {k: torch.randn(s) for k, s in keys.items()}
    src = convert_state_dict(sd, "x.pth", released_meta(["cat", "dog", "emu"]))
    assert src.dataset_meta == {"classes": ["cat", "dog", "emu"]}
    assert torch.equal(src.state_dict["roi_head.box_head.cls_score.weight"], sd["roi_head.bbox_head.fc_cls.weight"])
    assert src.model["roi_head"]["num_classes"] == 3 and src.published == ""
