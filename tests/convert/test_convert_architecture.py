"""Converted checkpoints record the architecture they came from; loading one into a model whose
backbone differs in a setting that changes outputs warns once, naming each setting and both values
(vitasks/engine/architecture.py, vitasks/engine/checkpoint.py)."""

import os

import pytest
import torch
import yaml
from PIL import Image
from vit_reference import (
    assert_close,
    build_classifier,
    image_batch,
    timm_resnet_weights,
    timm_vit_weights,
    to_google_npz,
)

import vitasks.engine.checkpoint as checkpoint_module
from vitasks.apis import init_model
from vitasks.convert import convert_checkpoint
from vitasks.engine import launch
from vitasks.engine.checkpoint import load_model_weights

transformers = pytest.importorskip("transformers")

ARCH_WARNING = "records a backbone that differs"


@pytest.fixture
def logged(monkeypatch):
    """The messages load_model_weights logs, in order."""
    messages = []
    monkeypatch.setattr(checkpoint_module, "print_log", lambda msg, *a, **kw: messages.append(msg))
    return messages


def arch_warnings(messages):
    return [m for m in messages if ARCH_WARNING in m]


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory):
    """A tiny Hugging Face ViT with LayerNorm eps 1e-12 (HF's default), saved as on the hub, and
    its conversion (.pth and .safetensors)."""
    root = tmp_path_factory.mktemp("hf_vit")
    cfg = transformers.ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
                                 image_size=32, patch_size=8, num_labels=5, layer_norm_eps=1e-12)
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():  # HF initialises norms to (1, 0), biases to 0: perturb all
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        # Small embeddings: token variances of 1e-5..1e-4, where an epsilon of 1e-6 instead of
        # 1e-12 is a visible effect (in ViT-B it is 1.8e-4 of the logits; here about 8%).
        emb = hf.vit.embeddings
        for p in (emb.cls_token, emb.position_embeddings, emb.patch_embeddings.projection.weight,
                  emb.patch_embeddings.projection.bias):
            p.mul_(1e-2)
    hf.eval()
    hf.save_pretrained(root / "hf")
    ck = convert_checkpoint("hf", str(root / "hf"), str(root / "vit.pth"), verbose=False)
    convert_checkpoint("hf", str(root / "hf"), str(root / "vit.safetensors"), verbose=False)
    return hf, ck, root


def write_config(path, hint, num_classes=5, test_data=None, **backbone):
    cfg = {
        "default_scope": "vitasks",
        "num_classes": num_classes,
        "model": {
            "type": "ImageClassifier",
            "data_preprocessor": {"type": "ClsDataPreprocessor", "mean": [0, 0, 0], "std": [1, 1, 1]},
            "backbone": {"type": "VisionTransformer", **hint, **backbone},
            "head": {"type": "LinearClsHead", "num_classes": "${num_classes}", "in_channels": hint["embed_dim"]},
        },
    }
    if test_data is not None:
        cfg.update({
            "test_dataloader": {
                "batch_size": 4, "num_workers": 0,
                "sampler": {"type": "DefaultSampler", "shuffle": False},
                "dataset": {"type": "ImageNetFolder", "data_root": str(test_data), "split": "val",
                            "num_classes": "${num_classes}", "test_mode": True,
                            "pipeline": [{"type": "LoadImage"}, {"type": "PackInputs"}]},
            },
            "test_cfg": {},
            "test_evaluator": {"type": "Accuracy", "topk": [1]},
        })
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_the_record_is_what_the_source_model_is(hf_vit):
    _, ck, _ = hf_vit
    arch = ck["meta"]["architecture"]
    # The HF config's values (independent of the converter's inference).
    assert arch["norm_eps"] == 1e-12 and arch["num_heads"] == 3 and arch["embed_dim"] == 48
    assert (arch["depth"], arch["patch_size"], arch["mlp_ratio"]) == (2, 8, 2)
    assert (arch["pool"], arch["class_token"], arch["fc_norm"], arch["final_norm"]) == ("token", True, False, True)
    assert (arch["mlp_act"], arch["qkv_bias"], arch["layer_scale"], arch["num_reg_tokens"]) == ("gelu", True, False, 0)
    assert arch["stem"] == {"type": "PatchEmbed", "bias": True}


@pytest.mark.parametrize("fmt", ["vit.pth", "vit.safetensors"])
def test_hf_eps_mismatch_warns_once_and_matching_config_does_not(tmp_path, hf_vit, logged, fmt):
    hf, ck, root = hf_vit
    hint = ck["meta"]["config_hint"]
    x = image_batch()
    with torch.no_grad():
        reference = hf(pixel_values=x).logits

    # A config with the checkpoint's settings: no warning, HF's logits.
    matching = init_model(write_config(tmp_path / "matching.yaml", hint), str(root / fmt))
    assert arch_warnings(logged) == []
    with torch.no_grad():
        assert_close(matching(x, mode="tensor"), reference, rel=1e-5)

    # timm's / vitasks' default epsilon (configs/cls_imagenet.yaml): one warning, naming the
    # key and both values, and logits measurably off.
    mismatched = init_model(write_config(tmp_path / "default_eps.yaml", hint, norm_eps=1e-6), str(root / fmt))
    warnings = arch_warnings(logged)
    assert len(warnings) == 1
    assert "norm_eps: checkpoint 1e-12, config 1e-06" in warnings[0]
    assert str(root / fmt) in warnings[0]
    for other in ("num_heads", "mlp_act", "pool", "stem"):  # nothing else differs
        assert f"{other}:" not in warnings[0] and f"{other}." not in warnings[0]
    with torch.no_grad():
        off = (mismatched(x, mode="tensor") - reference).abs().max() / reference.abs().max()
    assert off > 1e-3


def test_tools_test_warns_through_the_runner(tmp_path, hf_vit, logged):
    """``tools/test.py`` (and ``load_from``) load through the Runner: the same single warning."""
    _, ck, root = hf_vit
    data = tmp_path / "data"
    g = torch.Generator().manual_seed(0)
    for c in range(5):
        (data / "val" / f"class{c}").mkdir(parents=True)
        pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(data / "val" / f"class{c}" / "0.png")
    config = write_config(tmp_path / "test.yaml", ck["meta"]["config_hint"], test_data=data, norm_eps=1e-6)
    metrics = launch.test(config, str(root / "vit.pth"), work_dir=str(tmp_path / "wd"))
    assert "accuracy/top1" in metrics
    warnings = arch_warnings(logged)
    assert len(warnings) == 1 and "norm_eps: checkpoint 1e-12, config 1e-06" in warnings[0]


def test_every_differing_setting_is_named(tmp_path, logged):
    sd = timm_vit_weights(dim=48, num_classes=5)
    torch.save(sd, tmp_path / "vit.pth")
    ck = convert_checkpoint("timm", str(tmp_path / "vit.pth"), str(tmp_path / "out.pth"), num_heads=3, verbose=False)
    changes = dict(num_heads=4, mlp_act="gelu_tanh", pool="mean", fc_norm=False, qkv_bias=False)
    model = build_classifier(ck["meta"], **changes)
    loaded = checkpoint_module.load_checkpoint_file(str(tmp_path / "out.pth"))
    result = load_model_weights(model, loaded["state_dict"], "out.pth")
    hint = ck["meta"]["config_hint"]
    expected = {(k, hint[k], v) for k, v in changes.items() if hint[k] != v}
    assert {k for k, _, _ in expected} == {"num_heads", "mlp_act", "pool", "qkv_bias"}  # fc_norm agrees
    assert set(result["architecture"]) == expected
    (message,) = arch_warnings(logged)
    for key, was, now in expected:
        assert f"{key}: checkpoint {was}, config {now}" in message
    assert "fc_norm" not in message


def test_hybrid_stem_conventions_are_compared(tmp_path, logged):
    sd = timm_vit_weights(dim=64, patch=1, grid=4, in_chans=256, num_classes=5)
    sd.update(timm_resnet_weights(stem=32, layers=(2, 1), widths=(128, 256)))
    to_google_npz(sd, str(tmp_path / "r50.npz"), num_heads=4)
    ck = convert_checkpoint("npz", str(tmp_path / "r50.npz"), str(tmp_path / "r50.pth"), verbose=False)
    stem = ck["meta"]["architecture"]["stem"]
    # Google's JAX conventions, as the npz converter documents them.
    assert (stem["type"], stem["ws_form"], stem["ws_eps"], stem["gn_eps"]) == ("ResNetStem", "std", 1e-5, 1e-6)
    assert ck["meta"]["architecture"]["mlp_act"] == "gelu_tanh"
    # The same weights in a model with timm's hybrid conventions (the ResNetStem defaults).
    timm_stem = {k: v for k, v in ck["meta"]["config_hint"]["stem"].items() if k not in ("ws_form", "ws_eps", "gn_eps")}
    model = build_classifier(ck["meta"], stem=timm_stem)
    loaded = checkpoint_module.load_checkpoint_file(str(tmp_path / "r50.pth"))
    result = load_model_weights(model, loaded["state_dict"], "r50.pth")
    assert set(result["architecture"]) == {
        ("stem.ws_form", "std", "var"), ("stem.ws_eps", 1e-5, 1e-8), ("stem.gn_eps", 1e-6, 1e-5)}
    (message,) = arch_warnings(logged)
    assert "stem.ws_form: checkpoint std, config var" in message
    assert "stem.ws_eps: checkpoint 1e-05, config 1e-08" in message


def test_a_checkpoint_converted_before_the_record_is_checked_from_its_hint(tmp_path, hf_vit, logged):
    _, ck, _ = hf_vit
    old_meta = {k: v for k, v in ck["meta"].items() if k != "architecture"}
    torch.save({"state_dict": ck["state_dict"], "meta": old_meta}, tmp_path / "old.pth")
    init_model(write_config(tmp_path / "cfg.yaml", ck["meta"]["config_hint"], norm_eps=1e-6), str(tmp_path / "old.pth"))
    (message,) = arch_warnings(logged)
    assert "norm_eps: checkpoint 1e-12, config 1e-06" in message


def test_weights_without_a_record_are_not_checked(tmp_path, hf_vit, logged):
    _, ck, _ = hf_vit
    torch.save(ck["state_dict"], tmp_path / "bare.pth")  # a bare state dict: nothing recorded
    torch.save({"state_dict": ck["state_dict"], "meta": {"epoch": 3}}, tmp_path / "trained.pth")
    for name in ("bare.pth", "trained.pth"):
        init_model(write_config(tmp_path / "cfg.yaml", ck["meta"]["config_hint"], norm_eps=1e-6), str(tmp_path / name))
    assert arch_warnings(logged) == []
