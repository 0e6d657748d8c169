"""transformers' BEiT / Data2Vec-vision (semantic segmentation and plain models) -> vitasks,
checked against the transformers models themselves (tiny random ones): logits within 1e-4
relative, at the training size and another one; and tools/test.py on a converted segmentor."""

import json
import os
import re

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vitasks.convert import convert_checkpoint
from vitasks.registry import MODELS

transformers = pytest.importorskip("transformers")

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "seg_ade20k_beit.yaml")
TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=5, num_attention_heads=2,
            intermediate_size=64, num_labels=5, use_relative_position_bias=True,
            use_absolute_position_embeddings=False, layer_scale_init_value=0.1, out_indices=[2, 3, 4, 5],
            auxiliary_channels=16, pool_scales=[1, 2, 3], use_auxiliary_head=True)


def _randomise(model):
    """Perturb every parameter and BatchNorm statistic (HF starts tables and biases at zero)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if "relative_position_bias_table" in name or "lambda" in name else 0.1
            p.add_(torch.randn(p.shape, generator=g) * scale)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model.eval()


def _segmentor(meta, **backbone):
    return MODELS.build(dict(
        type="EncoderDecoder", backbone=dict(type="VisionTransformer", **{**meta["config_hint"], **backbone}),
        neck=meta["neck_hint"], decode_head=meta["decode_head_hint"], auxiliary_head=meta["auxiliary_head_hint"],
    )).eval()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _check_logits(hf_model, model, sizes):
    for size in sizes:
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(size[0]))
        if hasattr(hf_model, "data2vec_vision"):
            hf_model.config.image_size = size[0]  # Data2Vec reshapes its maps by config.image_size
        with torch.no_grad():
            theirs = hf_model(pixel_values=x).logits
            ours = model(x, mode="tensor")
        # Logits at 1/4 of the patch stride (UperNet on the x4 level): H/2 for 8-pixel patches.
        assert ours.shape == theirs.shape == (2, 5, size[0] // 8 * 4, size[1] // 8 * 4)
        assert _rel(ours, theirs) < 1e-4, (size, _rel(ours, theirs))


@pytest.fixture(scope="module")
def beit_seg(tmp_path_factory):
    torch.manual_seed(0)
    model = _randomise(transformers.BeitForSemanticSegmentation(transformers.BeitConfig(**TINY)))
    folder = tmp_path_factory.mktemp("beit_seg")
    model.save_pretrained(folder)
    return model, folder


def test_beit_segmentation_logits(beit_seg, tmp_path):
    hf_model, folder = beit_seg
    ckpt = convert_checkpoint("hf", str(folder), str(tmp_path / "beit.pth"), verbose=False)
    meta = ckpt["meta"]
    assert meta["source_model"] == "BeitForSemanticSegmentation" and meta["task_model"] == "EncoderDecoder"
    hint = meta["config_hint"]
    assert hint["use_rel_pos_bias"] and hint["layer_scale_init_value"] == 0.1 and hint["norm_eps"] == 1e-12
    assert hint["out_indices"] == [0, 1, 2, 3]  # transformers' [2, 3, 4, 5] read hidden_states[i - 1]
    assert "backbone.blocks.4.attn.rel_pos_bias.table" in ckpt["state_dict"]
    model = _segmentor(meta)
    model.load_state_dict(ckpt["state_dict"], strict=True)  # every tensor used, nothing missing
    _check_logits(hf_model, model, [(32, 32), (48, 40)])
    # The saved file reads back the same (safe loading).
    saved = torch.load(tmp_path / "beit.pth", weights_only=True)
    assert saved["meta"]["config_hint"] == hint


def _v4_names(sd):
    """transformers 5's module names -> the hub files' (transformers 4) names, written from
    transformers' conversion mapping read backwards."""
    out = {}
    for k, v in sd.items():
        k = k.replace("beit.layers.", "beit.encoder.layer.")
        k = re.sub(r"attention\.(q|k|v)_proj", lambda m: "attention.attention." + dict(q="query", k="key", v="value")[m.group(1)], k)
        k = k.replace("attention.o_proj", "attention.output.dense")
        k = re.sub(r"(layer\.\d+)\.mlp\.fc1", r"\1.intermediate.dense", k)
        k = re.sub(r"(layer\.\d+)\.mlp\.fc2", r"\1.output.dense", k)
        k = re.sub(r"(layer\.\d+)\.relative_position_bias\.",
                   r"\1.attention.attention.relative_position_bias.", k)
        k = k.replace("fpn.fpn1.conv_transpose1.", "fpn1.0.").replace("fpn.fpn1.normalization.", "fpn1.1.")
        k = k.replace("fpn.fpn1.conv_transpose2.", "fpn1.3.").replace("fpn.fpn2.", "fpn2.0.")
        k = re.sub(r"psp_modules\.blocks\.(\d+)\.conv\.convolution\.", r"psp_modules.\1.1.conv.", k)
        k = re.sub(r"psp_modules\.blocks\.(\d+)\.conv\.normalization\.", r"psp_modules.\1.1.bn.", k)
        k = k.replace("psp_bottleneck.", "bottleneck.").replace(".convolution.", ".conv.").replace(".normalization.", ".bn.")
        out[k] = v
    return out


def test_transformers4_names_convert_the_same(beit_seg, tmp_path):
    hf_model, folder = beit_seg
    new = convert_checkpoint("hf", str(folder), None, verbose=False)
    sd = load_file(os.path.join(folder, "model.safetensors"))
    old_sd = _v4_names(sd)
    assert "beit.encoder.layer.0.attention.attention.query.weight" in old_sd
    assert "decode_head.psp_modules.0.1.conv.weight" in old_sd and "fpn1.3.weight" in old_sd
    old_dir = tmp_path / "v4"
    old_dir.mkdir()
    save_file({k: v.contiguous() for k, v in old_sd.items()}, str(old_dir / "model.safetensors"))
    (old_dir / "config.json").write_text((folder / "config.json").read_text())
    old = convert_checkpoint("hf", str(old_dir), None, verbose=False)
    assert old["state_dict"].keys() == new["state_dict"].keys()
    for k in new["state_dict"]:
        torch.testing.assert_close(old["state_dict"][k], new["state_dict"][k], rtol=0, atol=0)


def test_data2vec_segmentation_logits(tmp_path):
    torch.manual_seed(0)
    cfg = {k: v for k, v in TINY.items()}
    hf_model = _randomise(transformers.Data2VecVisionForSemanticSegmentation(transformers.Data2VecVisionConfig(**cfg)))
    hf_model.save_pretrained(tmp_path)
    ckpt = convert_checkpoint("hf", str(tmp_path), None, verbose=False)
    assert ckpt["meta"]["source_model"] == "Data2VecVisionForSemanticSegmentation"
    model = _segmentor(ckpt["meta"])
    model.load_state_dict(ckpt["state_dict"], strict=True)
    _check_logits(hf_model, model, [(32, 32), (48, 48)])


@pytest.mark.parametrize("shared", [True, False])
def test_beit_model_features(tmp_path, shared):
    """BeitModel (shared or per-layer table, absolute positions, mean pooling) -> a classifier
    backbone: the tokens equal last_hidden_state, the pooled features pooler_output."""
    torch.manual_seed(0)
    cfg = transformers.BeitConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        use_relative_position_bias=not shared, use_shared_relative_position_bias=shared,
        use_absolute_position_embeddings=True, layer_scale_init_value=0.1, use_mean_pooling=True,
    )
    hf_model = _randomise(transformers.BeitModel(cfg))
    hf_model.save_pretrained(tmp_path)
    ckpt = convert_checkpoint("hf", str(tmp_path), None, verbose=False)
    hint = ckpt["meta"]["config_hint"]
    assert hint["use_shared_rel_pos_bias"] == shared and hint["use_rel_pos_bias"] == (not shared)
    backbone = MODELS.build(dict(type="VisionTransformer", **hint)).eval()
    sd = {k[len("backbone."):]: v for k, v in ckpt["state_dict"].items()}
    backbone.load_state_dict(sd, strict=True)
    for size in [(32, 32), (48, 40)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            out = hf_model(pixel_values=x, interpolate_pos_encoding=size != (32, 32))
            tokens = backbone.forward_features(x)
            pooled = backbone(x)[0]
        assert _rel(tokens, out.last_hidden_state) < 1e-4
        assert _rel(pooled, out.pooler_output) < 1e-4
    if shared:
        # The shared pre-training table loads into a per-block model (BEiT's fine-tuning).
        per_block = MODELS.build(dict(type="VisionTransformer", **{**hint, "use_shared_rel_pos_bias": False,
                                                                   "use_rel_pos_bias": True})).eval()
        per_block.load_state_dict(sd, strict=True)
        with torch.no_grad():
            assert _rel(per_block.forward_features(x), tokens) < 1e-5


def _miou(pred_dir, ann_dir, num_classes):
    """aAcc / mIoU / mAcc (percent) from the dumped PNGs and the ADE annotations (0 ignored,
    1..K -> 0..K-1), mmseg's definitions: classes absent from labels and predictions skipped."""
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    label_area = np.zeros(num_classes)
    for name in sorted(os.listdir(ann_dir)):
        label = cv2.imread(os.path.join(ann_dir, name), cv2.IMREAD_UNCHANGED).astype(np.int64) - 1
        pred = cv2.imread(os.path.join(pred_dir, name), cv2.IMREAD_UNCHANGED).astype(np.int64) - 1
        valid = label >= 0
        for c in range(num_classes):
            gt, pr = (label == c) & valid, (pred == c) & valid
            inter[c] += (gt & pr).sum()
            union[c] += (gt | pr).sum()
            label_area[c] += gt.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc = inter / union, inter / label_area
    return dict(aAcc=100 * inter.sum() / label_area.sum(), mIoU=100 * np.nanmean(iou), mAcc=100 * np.nanmean(acc))


def test_tools_test_on_converted_segmentor(beit_seg, tmp_path):
    """tools/test.py (launch.test) with configs/seg_ade20k_beit.yaml shrunk to the tiny model, on
    a generated ADE-layout set: the dumped label maps are transformers' predictions and
    metrics.json holds their aAcc / mIoU / mAcc."""
    from vitasks.config import load_config
    from vitasks.data.synthetic.seg import make_seg_dataset
    from vitasks.engine import launch

    hf_model, folder = beit_seg
    ckpt_path = str(tmp_path / "beit.pth")
    meta = convert_checkpoint("hf", str(folder), ckpt_path, verbose=False)["meta"]
    data = make_seg_dataset(str(tmp_path / "ade"), num_train=1, num_val=3, img_size=32, num_classes=5, style="plain")
    h = meta["config_hint"]
    options = [
        f"data_root={data}", "num_classes=5", "img_size=32", "crop_size=[32,32]",
        f"model.backbone.patch_size={h['patch_size']}", f"model.backbone.embed_dim={h['embed_dim']}",
        f"model.backbone.depth={h['depth']}", f"model.backbone.num_heads={h['num_heads']}",
        f"model.backbone.out_indices={h['out_indices']}", "model.backbone.mlp_ratio=2",
        "model.neck.embed_dim=32", "model.decode_head.in_channels=[32,32,32,32]", "model.decode_head.channels=32",
        "model.decode_head.pool_scales=[1,2,3]", "model.auxiliary_head.in_channels=32",
        "model.auxiliary_head.channels=16", "model.test_cfg.crop_size=[32,32]", "model.test_cfg.stride=[21,21]",
        "test_dataloader.dataset.pipeline.1.scale=[128,32]", "test_dataloader.num_workers=0",
        "test_dataloader.persistent_workers=false", "test_dataloader.pin_memory=false",  # no accelerator here
    ]
    cfg = load_config(CONFIG, options)
    cfg.optim_wrapper.pop("dtype")  # float32, to compare with transformers' float32 logits
    dump = str(tmp_path / "dump")
    metrics = launch.test(cfg, ckpt_path, work_dir=str(tmp_path / "work"), dump=dump)
    assert set(metrics) == {"aAcc", "mIoU", "mAcc"}
    with open(tmp_path / "work" / "metrics.json") as f:
        assert json.load(f) == metrics

    # The dumped maps are transformers' predictions: its logits (normalised to [-1, 1]) resized
    # bilinearly to the image, argmax, + 1 (ADE values).
    img_dir = os.path.join(data, "images", "validation")
    agree = []
    for name in sorted(os.listdir(img_dir)):
        rgb = cv2.imread(os.path.join(img_dir, name))[:, :, ::-1].astype(np.float32)
        x = torch.from_numpy((rgb - 127.5) / 127.5).permute(2, 0, 1)[None]
        with torch.no_grad():
            logits = F.interpolate(hf_model(pixel_values=x).logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        expected = logits.argmax(1)[0].numpy() + 1
        got = cv2.imread(os.path.join(dump, name.replace(".jpg", ".png")), cv2.IMREAD_UNCHANGED)
        agree.append((got == expected).mean())
    assert min(agree) > 0.999, agree
    reference = _miou(dump, os.path.join(data, "annotations", "validation"), 5)
    for key, value in reference.items():
        assert metrics[key] == pytest.approx(value, abs=0.006), (key, metrics, reference)


def _unilm_names(sd):
    """transformers 5 BeitForImageClassification names -> BEiT's own checkpoint names
    (microsoft/unilm beit/modeling_finetune.py): fused qkv weight, q_bias / v_bias, gamma_1/2."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"^beit\.layers\.(\d+)\.(.+)$", k)
        if m:
            i, part = m.groups()
            if part.startswith("attention.k_proj"):
                continue
            if part == "attention.q_proj.weight":
                out[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
                    [v, sd[f"beit.layers.{i}.attention.k_proj.weight"], sd[f"beit.layers.{i}.attention.v_proj.weight"]])
                continue
            if part == "attention.v_proj.weight":
                continue
            name = {"attention.q_proj.bias": "attn.q_bias", "attention.v_proj.bias": "attn.v_bias",
                    "attention.o_proj.weight": "attn.proj.weight", "attention.o_proj.bias": "attn.proj.bias",
                    "lambda_1": "gamma_1", "lambda_2": "gamma_2",
                    "relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
                    }.get(part, part.replace("layernorm_before", "norm1").replace("layernorm_after", "norm2"))
            out[f"blocks.{i}.{name}"] = v
            continue
        name = {"beit.embeddings.cls_token": "cls_token", "beit.embeddings.position_embeddings": "pos_embed",
                "beit.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
                "beit.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
                "beit.shared_position_bias.relative_position_bias_table": "rel_pos_bias.relative_position_bias_table",
                "beit.pooler.layernorm.weight": "fc_norm.weight", "beit.pooler.layernorm.bias": "fc_norm.bias",
                "classifier.weight": "head.weight", "classifier.bias": "head.bias"}[k]
        out[name] = v
    return out


@pytest.mark.parametrize("shared", [False, True])
def test_beit_own_checkpoint_through_the_mae_converter(tmp_path, shared):
    """BEiT's own (unilm) checkpoint naming, read by `convert_checkpoint.py mae`: logits equal
    transformers' BeitForImageClassification with the same weights; a shared table also loads
    into a per-block model (BEiT's fine-tuning)."""
    torch.manual_seed(0)
    cfg = transformers.BeitConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        use_relative_position_bias=not shared, use_shared_relative_position_bias=shared,
        use_absolute_position_embeddings=False, layer_scale_init_value=0.1, use_mean_pooling=True, num_labels=4,
        layer_norm_eps=1e-6,
    )
    hf_model = _randomise(transformers.BeitForImageClassification(cfg))
    sd = _unilm_names(hf_model.state_dict())
    torch.save({"model": sd}, tmp_path / "beit.pth")
    ckpt = convert_checkpoint("mae", str(tmp_path / "beit.pth"), None, verbose=False)
    hint = ckpt["meta"]["config_hint"]
    assert hint["use_shared_rel_pos_bias"] == shared and hint["use_rel_pos_bias"] == (not shared)
    variants = [hint] + ([{**hint, "use_shared_rel_pos_bias": False, "use_rel_pos_bias": True}] if shared else [])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        theirs = hf_model(pixel_values=x).logits
    for backbone in variants:
        model = MODELS.build(dict(type="ImageClassifier", backbone=dict(type="VisionTransformer", **backbone),
                                  head=ckpt["meta"]["head_hint"])).eval()
        model.load_state_dict(ckpt["state_dict"], strict=True)
        with torch.no_grad():
            ours = model(x, mode="tensor")
        assert _rel(ours, theirs) < 1e-4


def test_beit_pretraining_tables_resampled_by_beits_rule(tmp_path):
    """`mae` with img_size: BEiT's pre-training table goes to the fine-tuning grid by BEiT's own
    geometric rule (not the backbone's bilinear one), and the model loads it unchanged."""
    pytest.importorskip("scipy")
    from vitasks.models.layers.rel_pos_bias import resize_rel_pos_bias_table_geometric

    torch.manual_seed(0)
    cfg = transformers.BeitConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        use_shared_relative_position_bias=True, use_absolute_position_embeddings=False, use_mean_pooling=True,
        num_labels=4,
    )
    sd = _unilm_names(_randomise(transformers.BeitForImageClassification(cfg)).state_dict())
    torch.save({"model": sd}, tmp_path / "beit.pth")
    ckpt = convert_checkpoint("mae", str(tmp_path / "beit.pth"), None, img_size=56, verbose=False)
    table = ckpt["state_dict"]["backbone.rel_pos_bias.table"]
    assert table.shape == (13 * 13 + 3, 2)
    expected = resize_rel_pos_bias_table_geometric(sd["rel_pos_bias.relative_position_bias_table"], (7, 7))
    torch.testing.assert_close(table, expected)
    hint = {**ckpt["meta"]["config_hint"], "use_shared_rel_pos_bias": False, "use_rel_pos_bias": True}
    backbone = MODELS.build(dict(type="VisionTransformer", **hint))
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")})
    torch.testing.assert_close(backbone.blocks[1].attn.rel_pos_bias.table.detach(), expected)
