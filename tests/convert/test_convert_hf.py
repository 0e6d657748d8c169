"""Hugging Face transformers ViT / DeiT -> vitasks, checked against the transformers models."""

import json

import pytest
import torch
from safetensors.torch import save_file
from vit_reference import all_keys_loaded, assert_close, build_classifier, image_batch

from vitasks.convert import convert_checkpoint
from vitasks.errors import CheckpointError

transformers = pytest.importorskip("transformers")


def _config(**kw):
    cfg = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
               image_size=32, patch_size=8, num_labels=5, layer_norm_eps=1e-12)
    cfg.update(kw)
    return transformers.ViTConfig(**cfg)


def _randomise(model):
    # HF initialises LayerNorms to (1, 0) and biases to 0: perturb so every mapping matters.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def test_hf_vit_for_image_classification_folder(tmp_path):
    cfg = _config(qkv_bias=True)
    hf = _randomise(transformers.ViTForImageClassification(cfg))
    hf.save_pretrained(tmp_path / "hf")  # hub names (vit.encoder.layer.*.attention.attention.query)
    ck = convert_checkpoint("hf", str(tmp_path / "hf"), str(tmp_path / "out.pth"), verbose=False)
    hint = ck["meta"]["config_hint"]
    assert (hint["num_heads"], hint["norm_eps"], hint["mlp_ratio"], hint["img_size"]) == (3, 1e-12, 2, 32)
    assert ck["meta"]["head_hint"]["num_classes"] == 5
    model = build_classifier(ck["meta"])
    all_keys_loaded(model, ck["state_dict"])
    x = image_batch()
    with torch.no_grad():
        assert_close(model(x, mode="tensor"), hf(pixel_values=x).logits)


def test_hf_transformers5_names_and_no_qkv_bias(tmp_path):
    # A state dict of transformers 5 modules (vit.layers.*.attention.q_proj, mlp.fc1) in a
    # single .safetensors file, config.json beside it.
    cfg = _config(qkv_bias=False, layer_norm_eps=1e-6)
    hf = _randomise(transformers.ViTForImageClassification(cfg))
    sd = hf.state_dict()
    assert any(".q_proj." in k for k in sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "weights.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    ck = convert_checkpoint("hf", str(tmp_path / "weights.safetensors"), None, verbose=False)
    assert ck["meta"]["config_hint"]["qkv_bias"] is False
    model = build_classifier(ck["meta"])
    all_keys_loaded(model, ck["state_dict"])
    x = image_batch()
    with torch.no_grad():
        assert_close(model(x, mode="tensor"), hf(pixel_values=x).logits)


def test_hf_vit_model_pooler_dropped(tmp_path):
    cfg = _config()
    hf = _randomise(transformers.ViTModel(cfg))  # with the tanh pooler (= pre-logits)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    ck = convert_checkpoint("hf", str(tmp_path), None, num_classes=10, verbose=False)
    assert not any(k.startswith("head.") for k in ck["state_dict"])
    assert any("pre_logits" in n for n in ck["meta"]["notes"])
    model = build_classifier(ck["meta"])
    all_keys_loaded(model, ck["state_dict"], allow_missing=("head.",))
    x = image_batch()
    with torch.no_grad():
        out = hf(pixel_values=x)
        assert_close(model.backbone(x)[0], out.last_hidden_state[:, 0])
    # keep_pre_logits: the pooler becomes MLPClsHead.hidden (its fc starts at zero).
    ck = convert_checkpoint("hf", str(tmp_path), None, keep_pre_logits=True, verbose=False)
    assert ck["meta"]["head_hint"]["type"] == "MLPClsHead"
    model = build_classifier(ck["meta"], num_classes=4)
    all_keys_loaded(model, ck["state_dict"], allow_missing=("head.fc.",))
    with torch.no_grad():
        feats = model.extract_feat(x)[-1]
        assert_close(torch.tanh(model.head.hidden(feats)), out.pooler_output)


def test_hf_deit_with_teacher(tmp_path):
    cfg = transformers.DeiTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                  intermediate_size=96, image_size=32, patch_size=8, num_labels=5)
    hf = _randomise(transformers.DeiTForImageClassificationWithTeacher(cfg))
    hf.save_pretrained(tmp_path / "deit")
    ck = convert_checkpoint("hf", str(tmp_path / "deit"), None, verbose=False)
    assert ck["meta"]["config_hint"]["num_reg_tokens"] == 1
    model = build_classifier(ck["meta"])
    all_keys_loaded(model, ck["state_dict"])
    x = image_batch()
    with torch.no_grad():
        out = hf(pixel_values=x)
        assert_close(model(x, mode="tensor"), out.cls_logits)


def test_hf_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        convert_checkpoint("hf", str(tmp_path), None, verbose=False)


def test_hf_foreign_weights_refused(tmp_path):
    torch.save({"bert.embeddings.word_embeddings.weight": torch.zeros(3, 4)}, tmp_path / "x.bin")
    with pytest.raises(CheckpointError, match="transformers ViT"):
        convert_checkpoint("hf", str(tmp_path / "x.bin"), None, verbose=False)


def test_hf_preprocessor_config_gives_the_input_normalisation(tmp_path):
    hf = _randomise(transformers.ViTForImageClassification(_config()))
    hf.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 32}})
    )
    ck = convert_checkpoint("hf", str(tmp_path / "model.safetensors"), None, verbose=False)
    assert ck["meta"]["data_preprocessor_hint"] == dict(mean=[127.5] * 3, std=[127.5] * 3)
