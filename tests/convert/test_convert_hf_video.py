"""transformers' TimeSformer, VideoMAE and ViViT -> vitasks Recognizer, checked against the
transformers models themselves (tiny random ones): logits within 1e-4 relative."""

import inspect
import json

import pytest
import torch
from safetensors.torch import save_file

from vitasks.convert import hf
from vitasks.convert.common import ConvertOptions
from vitasks.convert.hf_video import VideoSource
from vitasks.errors import CheckpointError
from vitasks.registry import MODELS

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            image_size=32, num_labels=5)


def _randomise(model):
    # HF initialises LayerNorms to (1, 0), biases and ViViT's positions to 0: perturb every
    # parameter so that each mapping matters.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _convert(path, **options):
    """hf.read (which hands video state dicts to hf_video) + the source's own mapping."""
    opts = ConvertOptions(**options)
    source = hf.read(str(path), opts)
    assert isinstance(source, VideoSource)
    return source.to_vitasks(opts)


def _recognizer(meta):
    return MODELS.build(dict(
        type="Recognizer", data_preprocessor=dict(type="BaseDataPreprocessor"),
        backbone=dict(type="VideoVisionTransformer", **meta["config_hint"]), head=meta["head_hint"],
    )).eval()


def _check(hf_model, state_dict, meta, frames: int):
    model = _recognizer(meta)
    model.load_state_dict(state_dict, strict=True)  # every tensor used, nothing missing
    clip = torch.randn(2, frames, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(clip.transpose(1, 2), mode="tensor")  # vitasks: (N, C, T, H, W)
        theirs = hf_model(pixel_values=clip).logits  # transformers: (N, T, C, H, W)
    rel = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert rel < 1e-4, rel
    return model


def _save_state_dict(model, folder, config=None):
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return folder / "model.safetensors"


@pytest.mark.parametrize("attention_type", ["divided_space_time", "joint_space_time"])
def test_timesformer(tmp_path, attention_type):
    cfg = transformers.TimesformerConfig(patch_size=8, num_frames=4, attention_type=attention_type, **TINY)
    model = _randomise(transformers.TimesformerForVideoClassification(cfg))
    model.save_pretrained(tmp_path / "hf")
    sd, meta = _convert(tmp_path / "hf")
    hint = meta["config_hint"]
    want = "divided" if attention_type == "divided_space_time" else "joint"
    assert (hint["attention_type"], hint["tubelet_size"], hint["num_frames"], hint["norm_eps"]) == (want, 1, 4, 1e-6)
    assert meta["head_hint"] == dict(type="VideoClsHead", num_classes=5, in_channels=32)
    _check(model, sd, meta, frames=4)


def test_timesformer_without_config(tmp_path):
    # Weights alone: frames from time_embeddings, size from the position table, divided from the keys.
    cfg = transformers.TimesformerConfig(patch_size=8, num_frames=4, **TINY)
    model = _randomise(transformers.TimesformerForVideoClassification(cfg))
    sd, meta = _convert(_save_state_dict(model, tmp_path / "w"), num_heads=2)
    assert (meta["config_hint"]["img_size"], meta["config_hint"]["num_frames"]) == (32, 4)
    assert any("config.json" in n for n in meta["notes"])
    _check(model, sd, meta, frames=4)


@pytest.mark.parametrize("names", ["transformers5", "hub"])
def test_videomae(tmp_path, names):
    cfg = transformers.VideoMAEConfig(patch_size=8, num_frames=4, tubelet_size=2, **TINY)
    model = _randomise(transformers.VideoMAEForVideoClassification(cfg))
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    if names == "hub":
        # The hub checkpoints keep the q and v biases as `q_bias` / `v_bias` of the attention.
        for k in [k for k in weights if k.endswith(("query.bias", "value.bias"))]:
            new = k.replace("query.bias", "q_bias").replace("value.bias", "v_bias")
            weights[new] = weights.pop(k)
    assert not any("key.bias" in k for k in weights)  # VideoMAE has no key bias
    (tmp_path / "w").mkdir()
    save_file(weights, str(tmp_path / "w" / "model.safetensors"))
    (tmp_path / "w" / "config.json").write_text(json.dumps(cfg.to_dict()))
    sd, meta = _convert(tmp_path / "w")
    hint = meta["config_hint"]
    assert (hint["pos_embed"], hint["pool"], hint["fc_norm_eps"], hint["norm_eps"]) == ("sincos", "mean", 1e-5, 1e-12)
    # The fused bias has a zero key part.
    bias = sd["backbone.blocks.0.attn.qkv.bias"]
    assert torch.equal(bias[32:64], torch.zeros(32)) and bias[:32].abs().sum() > 0
    _check(model, sd, meta, frames=4)


def test_videomae_without_qv_bias(tmp_path):
    cfg = transformers.VideoMAEConfig(patch_size=8, num_frames=4, tubelet_size=2, qv_bias=False, **TINY)
    model = _randomise(transformers.VideoMAEForVideoClassification(cfg))
    model.save_pretrained(tmp_path / "hf")
    sd, meta = _convert(tmp_path / "hf")
    assert meta["config_hint"]["qkv_bias"] is False
    _check(model, sd, meta, frames=4)


def test_vivit(tmp_path):
    cfg = transformers.VivitConfig(tubelet_size=[2, 8, 8], num_frames=4, **TINY)
    model = _randomise(transformers.VivitForVideoClassification(cfg))
    model.save_pretrained(tmp_path / "hf")
    sd, meta = _convert(tmp_path / "hf")
    hint = meta["config_hint"]
    assert (hint["pos_embed"], hint["mlp_act"], hint["num_frames"], hint["tubelet_size"]) == ("joint", "gelu_tanh", 4, 2)
    _check(model, sd, meta, frames=4)


def test_vivit_without_config_needs_it_for_the_grid(tmp_path):
    # 1 + 2 * 16 positions: with transformers' default 224 px frames the grid can't be laid out.
    cfg = transformers.VivitConfig(tubelet_size=[2, 8, 8], num_frames=4, **TINY)
    model = transformers.VivitForVideoClassification(cfg)
    with pytest.raises(CheckpointError, match="config.json"):
        _convert(_save_state_dict(model, tmp_path / "w"))


def test_head_dropped_for_new_classes_and_img_size_resampled(tmp_path):
    cfg = transformers.VivitConfig(tubelet_size=[2, 8, 8], num_frames=4, **TINY)
    model = _randomise(transformers.VivitForVideoClassification(cfg))
    model.save_pretrained(tmp_path / "hf")
    sd, meta = _convert(tmp_path / "hf", num_classes=7, img_size=48)
    assert not any(k.startswith("head.") for k in sd)
    assert meta["head_hint"]["num_classes"] == 7 and meta["config_hint"]["img_size"] == 48
    assert sd["backbone.pos_embed"].shape == (1, 1 + 2 * 36, 32)
    # The converted table is what the backbone computes itself for 48 px frames from the original.
    _, meta32 = _convert(tmp_path / "hf")
    backbone = _recognizer(meta32).backbone
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in _convert(tmp_path / "hf")[0].items()
                              if k.startswith("backbone.")})
    assert torch.allclose(backbone._joint_pos(2, (6, 6)), sd["backbone.pos_embed"], atol=1e-6)
    with pytest.raises(CheckpointError, match="does not apply"):
        _convert(tmp_path / "hf", pool="mean")


def test_unknown_weights_are_named(tmp_path):
    cfg = transformers.TimesformerConfig(patch_size=8, num_frames=4, **TINY)
    weights = transformers.TimesformerForVideoClassification(cfg).state_dict()
    weights["timesformer.embeddings.extra"] = torch.zeros(3)
    (tmp_path / "w").mkdir()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "w" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="timesformer.embeddings.extra"):
        _convert(tmp_path / "w")


def test_convert_checkpoint_command_path(tmp_path):
    """``convert_checkpoint("hf", ...)`` (what tools/convert_checkpoint.py runs) on a video folder."""
    from vitasks.convert import convert_checkpoint
    from vitasks.engine.checkpoint import load_checkpoint_file

    cfg = transformers.VideoMAEConfig(patch_size=8, num_frames=4, tubelet_size=2, **TINY)
    model = _randomise(transformers.VideoMAEForVideoClassification(cfg))
    model.save_pretrained(tmp_path / "hf")
    if '"to_vitasks"' not in inspect.getsource(convert_checkpoint):
        pytest.skip("vitasks/convert/__init__.py does not hand video sources their own mapping yet")
    convert_checkpoint("hf", str(tmp_path / "hf"), str(tmp_path / "out.pth"), verbose=True)
    ckpt = load_checkpoint_file(str(tmp_path / "out.pth"))
    _check(model, ckpt["state_dict"], ckpt["meta"], frames=4)
