"""transformers DINOv2 (Dinov2Model, Dinov2ForImageClassification, Dinov2WithRegisters*) ->
vitasks, checked against the transformers models at their own size (518 px, a 37 x 37 grid)
and at 224 px (the position embeddings resampled by each source's rule)."""

import json
from pathlib import Path

import pytest
import torch
from vit_reference import all_keys_loaded, assert_close, build_classifier

from vitasks.convert import convert_checkpoint
from vitasks.errors import CheckpointError

transformers = pytest.importorskip("transformers")

SIZES = (518, 224)


def _config(registers=0, **kw):
    cfg = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=518,
               patch_size=14, num_labels=5, layerscale_value=0.5)
    cfg.update(kw)
    if registers:
        return transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **cfg)
    return transformers.Dinov2Config(**cfg)


def _randomise(model):
    # Perturb every weight (LayerNorms start at (1, 0), LayerScale at a constant) so each
    # mapping matters; the position embeddings get a smooth-free random field, so any change
    # of the resampling rule shows.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for name, p in model.named_parameters():
            if name.endswith("position_embeddings"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def _images(size, n=2):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(size))


def _hf_features(out, num_reg):
    """transformers' last hidden state and its class token + patch mean (registers excluded)."""
    h = out.last_hidden_state
    return h, torch.cat([h[:, 0], h[:, 1 + num_reg:].mean(1)], dim=1)


@pytest.mark.parametrize("registers", [0, 3])
def test_hf_dinov2_classifier_logits_and_features_at_two_sizes(tmp_path, registers):
    cls = (transformers.Dinov2WithRegistersForImageClassification if registers
           else transformers.Dinov2ForImageClassification)
    hf = _randomise(cls(_config(registers)))
    hf.save_pretrained(tmp_path / "hf")  # hub names (encoder.layer.*.attention.attention.query)
    ck = convert_checkpoint("hf", str(tmp_path / "hf"), str(tmp_path / "out.pth"), verbose=False)
    hint = ck["meta"]["config_hint"]
    assert (hint["patch_size"], hint["img_size"], hint["num_reg_tokens"], hint["pool"]) == (14, 518, registers, "token_mean")
    assert hint["interpolate_antialias"] is bool(registers) and hint["interpolate_offset"] == 0.0
    assert hint["norm_eps"] == 1e-6 and hint["layer_scale_init_value"] is not None
    assert ck["meta"]["head_hint"] == dict(type="LinearClsHead", num_classes=5, in_channels=48)
    model = build_classifier(ck["meta"])
    all_keys_loaded(model, ck["state_dict"])
    base = hf.dinov2_with_registers if registers else hf.dinov2
    for size in SIZES:
        x = _images(size)
        with torch.no_grad():
            ref = hf(pixel_values=x).logits
            tokens, pooled = _hf_features(base(pixel_values=x), registers)
            assert_close(model(x, mode="tensor"), ref)
            assert_close(model.backbone.forward_features(x), tokens)
            assert_close(model.backbone(x)[0], pooled)


@pytest.mark.parametrize("registers", [0, 4])
def test_hf_dinov2_model_transformers5_names_at_two_sizes(tmp_path, registers):
    # The module names of transformers 5 (attention.q_proj, o_proj), no prefix, one file.
    cls = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
    cfg = _config(registers, layer_norm_eps=1e-5)
    hf = _randomise(cls(cfg))
    sd = hf.state_dict()
    assert any(".q_proj." in k for k in sd)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    ck = convert_checkpoint("hf", str(tmp_path / "model.safetensors"), None, verbose=False)
    assert ck["meta"]["config_hint"]["norm_eps"] == 1e-5
    assert not any(k.startswith("head.") for k in ck["state_dict"])
    model = build_classifier(ck["meta"], num_classes=7)
    all_keys_loaded(model, ck["state_dict"], allow_missing=("head.",))
    for size in SIZES:
        x = _images(size, n=1)
        with torch.no_grad():
            out = hf(pixel_values=x)
            tokens, pooled = _hf_features(out, registers)
            assert_close(model.backbone.forward_features(x), tokens)
            assert_close(model.backbone(x)[0], pooled)
    # pool="token": the class token, transformers' pooler_output.
    ck = convert_checkpoint("hf", str(tmp_path / "model.safetensors"), None, pool="token", verbose=False)
    model = build_classifier(ck["meta"], num_classes=7)
    model.load_state_dict(ck["state_dict"], strict=False)
    x = _images(224, n=1)
    with torch.no_grad():
        assert_close(model.backbone(x)[0], hf(pixel_values=x).pooler_output)


def test_hf_dinov2_converted_at_224_equals_resampling_on_the_fly(tmp_path):
    # img_size=224 resamples the checkpoint's position embeddings with the source's rule: a
    # 224 model then gives what transformers gives at 224 from its 518 grid.
    hf = _randomise(transformers.Dinov2WithRegistersForImageClassification(_config(2)))
    hf.save_pretrained(tmp_path / "hf")
    ck = convert_checkpoint("hf", str(tmp_path / "hf"), None, img_size=224, verbose=False)
    assert ck["meta"]["config_hint"]["img_size"] == 224
    assert ck["state_dict"]["backbone.pos_embed"].shape[1] == 1 + 16 * 16
    model = build_classifier(ck["meta"])
    all_keys_loaded(model, ck["state_dict"])
    x = _images(224)
    with torch.no_grad():
        assert_close(model(x, mode="tensor"), hf(pixel_values=x).logits)


def test_hf_dinov2_wrong_rule_differs(tmp_path):
    # The recorded rule is what makes 224 px match: either other rule is measurably off (so the
    # tests above would catch a change of rule).
    hf = _randomise(transformers.Dinov2ForImageClassification(_config()))
    hf.save_pretrained(tmp_path / "hf")
    ck = convert_checkpoint("hf", str(tmp_path / "hf"), None, verbose=False)
    x = _images(224)
    with torch.no_grad():
        ref = hf(pixel_values=x).logits
        for wrong in (dict(interpolate_antialias=True), dict(interpolate_offset=0.1)):
            model = build_classifier(ck["meta"], **wrong)
            model.load_state_dict(ck["state_dict"])
            err = (model(x, mode="tensor") - ref).abs().max() / ref.abs().max()
            assert err > 1e-3, (wrong, err)


def test_hf_dinov2_swiglu_refused(tmp_path):
    cfg = _config(use_swiglu_ffn=True)
    hf = transformers.Dinov2Model(cfg)
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="SwiGLU"):
        convert_checkpoint("hf", str(tmp_path / "hf"), None, verbose=False)
    (tmp_path / "hf" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="SwiGLU"):
        convert_checkpoint("hf", str(tmp_path / "hf"), None, verbose=False)


# ------------------------------------------------------------------------------------ the configs

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
_SHRINK = dict(embed_dim=24, depth=4, num_heads=2, mlp_ratio=2)


def test_cls_dinov2_config_gives_transformers_logits(tmp_path):
    # configs/cls_dinov2_vitb14.yaml shrunk to the tiny model by overrides of the sizes only;
    # everything else (patch 14, the 518 grid, the rule, token_mean, eps) is the config's.
    from vitasks.apis import init_model
    from vitasks.engine.architecture import architecture_mismatches, backbone_architecture

    hf = _randomise(transformers.Dinov2ForImageClassification(_config(num_hidden_layers=4)))
    hf.save_pretrained(tmp_path / "hf")
    ck = convert_checkpoint("hf", str(tmp_path / "hf"), str(tmp_path / "b14.pth"), verbose=False)
    options = {f"model.backbone.{k}": v for k, v in _SHRINK.items()}
    options.update({"model.head.in_channels": 48, "num_classes": 5})
    model = init_model(str(CONFIGS / "cls_dinov2_vitb14.yaml"), str(tmp_path / "b14.pth"), cfg_options=options).eval()
    assert not architecture_mismatches(ck["meta"]["architecture"], backbone_architecture(model.backbone))
    for key in ("interpolate_mode", "interpolate_antialias", "interpolate_offset", "pool"):
        assert getattr(model.backbone, key) == ck["meta"]["config_hint"][key], key
    assert model.backbone.img_size == (518, 518) and model.backbone.frozen and not model.backbone.training
    x = _images(224)
    with torch.no_grad():
        assert_close(model(x, mode="tensor"), hf(pixel_values=x).logits)


def test_dinov2_backbone_base_composes_with_a_segmentor(tmp_path):
    # _base_/models/vit_b14_dinov2.yaml after UperNet's model base: a DINOv2 segmentor.
    from vitasks.config import load_config
    from vitasks.registry import MODELS

    cfg_file = tmp_path / "seg_dinov2.yaml"
    cfg_file.write_text(
        "_base_:\n"
        f"  - {CONFIGS}/_base_/models/upernet_vit_b16.yaml\n"
        f"  - {CONFIGS}/_base_/models/vit_b14_dinov2.yaml\n"
        "crop_size: [70, 70]\n"
    )
    options = [f"model.backbone.{k}={v}" for k, v in _SHRINK.items()] + [
        "model.backbone.img_size=70", "model.neck.embed_dim=24", "model.decode_head.in_channels=[24,24,24,24]",
        "model.decode_head.channels=16", "model.auxiliary_head.in_channels=24", "model.auxiliary_head.channels=8",
        "model.backbone.out_indices=[0,1,2,3]",
    ]
    cfg = load_config(str(cfg_file), options)
    assert (cfg.model.backbone.patch_size, cfg.model.backbone.final_norm) == (14, False)
    model = MODELS.build(cfg.model).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 70, 70), mode="tensor")
    assert logits.shape == (1, 150, 20, 20)  # stride 4 of the 5 x 5 patch grid
