"""VideoVisionTransformer, VideoClsHead and Recognizer: the three attention layouts, loading an
image ViT (inflation, TimeSformer's temporal initialisation), multi-view averaging."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitasks.engine.checkpoint import load_model_weights
from vitasks.errors import ConfigError
from vitasks.models.backbones.video_vit import VideoVisionTransformer, sincos_position_table
from vitasks.models.layers import Attention, resample_abs_pos_embed
from vitasks.registry import MODELS
from vitasks.structures import DataSample

DIM, HEADS, PATCH, IMG, FRAMES, CLASSES = 32, 2, 8, 32, 4, 5


def _perturb(model, seed=1):
    # Zero-initialised parts (heads, temporal_fc, LayerNorm biases) would hide wrong wiring.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _backbone(**kw):
    cfg = dict(num_frames=FRAMES, img_size=IMG, patch_size=PATCH, tubelet_size=2, embed_dim=DIM, depth=2,
               num_heads=HEADS, temporal_depth=2)
    cfg.update(kw)
    return VideoVisionTransformer(**cfg)


def _recognizer(**backbone):
    cfg = dict(type="VideoVisionTransformer", num_frames=FRAMES, img_size=IMG, patch_size=PATCH, tubelet_size=2,
               embed_dim=DIM, depth=2, num_heads=HEADS)
    cfg.update(backbone)
    return MODELS.build(dict(type="Recognizer", data_preprocessor=dict(type="BaseDataPreprocessor"), backbone=cfg,
                             head=dict(type="VideoClsHead", num_classes=CLASSES, in_channels=DIM)))


def _image_classifier(img_size=IMG, **backbone):
    model = MODELS.build(dict(
        type="ImageClassifier",
        backbone=dict(type="VisionTransformer", img_size=img_size, patch_size=PATCH, embed_dim=DIM, depth=2,
                      num_heads=HEADS, **backbone),
        head=dict(type="LinearClsHead", num_classes=CLASSES, in_channels=DIM),
    ))
    return _perturb(model).eval()


def _clip(batch=2, frames=FRAMES, size=IMG, seed=3):
    return torch.randn(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ layouts


def _attention_inputs(model, x):
    """The (batch, tokens, C) shape each Attention module sees, by module name."""
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen[name] = tuple(args[0].shape)
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in model.named_modules() if isinstance(m, Attention)]
    with torch.no_grad():
        out = model.forward_features(x)
    for h in hooks:
        h.remove()
    return out, seen


def test_joint_attention_sees_every_token_at_once():
    model = _backbone(attention_type="joint").eval()
    out, seen = _attention_inputs(model, _clip())
    t, n = FRAMES // 2, (IMG // PATCH) ** 2  # 2 tubelets in time, 16 positions
    assert out.shape == (2, 1 + t * n, DIM)
    assert set(seen.values()) == {(2, 1 + t * n, DIM)}


def test_divided_attention_temporal_then_spatial_token_counts():
    model = _backbone(attention_type="divided").eval()
    out, seen = _attention_inputs(model, _clip())
    t, n = FRAMES // 2, (IMG // PATCH) ** 2
    assert out.shape == (2, 1 + t * n, DIM)
    assert seen["blocks.0.temporal_attn"] == (2 * n, t, DIM)  # each position's t tokens
    assert seen["blocks.0.attn"] == (2 * t, 1 + n, DIM)  # each frame's n tokens + class token


def test_factorised_encoder_spatial_per_frame_then_temporal():
    model = _backbone(attention_type="factorised_encoder").eval()
    out, seen = _attention_inputs(model, _clip())
    t, n = FRAMES // 2, (IMG // PATCH) ** 2
    assert out.shape == (2, 1 + t, DIM)  # temporal class token + one token per frame group
    assert seen["blocks.1.attn"] == (2 * t, 1 + n, DIM)
    assert seen["temporal_encoder.blocks.1.attn"] == (2, 1 + t, DIM)
    assert model.depth == 4 and model.get_layer_id("temporal_encoder.blocks.1.mlp.fc1.weight") == 4
    assert {"temporal_encoder.pos_embed", "temporal_encoder.cls_token"} <= model.no_weight_decay()


def test_factorised_encoder_is_an_image_vit_per_frame_then_a_temporal_transformer():
    # Tubelet 1: the spatial encoder is the image ViT on each frame; its normed class tokens are
    # what the temporal encoder reads.
    image = _image_classifier()
    video = _perturb(_recognizer(attention_type="factorised_encoder", tubelet_size=1, temporal_depth=1)).eval()
    load_model_weights(video, image.state_dict(), "image ViT")
    x = _clip()
    with torch.no_grad():
        frames = torch.stack([image.backbone.forward_features(x[:, :, i])[:, 0] for i in range(FRAMES)], dim=1)
        encoder = video.backbone.temporal_encoder
        tokens = encoder.embed(frames)
        for block in encoder.blocks:
            tokens = block(tokens)
        expected = encoder.norm(tokens)
        torch.testing.assert_close(video.backbone.forward_features(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention_type", ["joint", "divided", "factorised_encoder"])
def test_gradients_reach_every_parameter(attention_type):
    model = _perturb(_recognizer(attention_type=attention_type, temporal_depth=1, drop_path_rate=0.1))
    model.train()
    samples = [DataSample(gt_label=torch.tensor([i])) for i in range(2)]
    model(_clip(), samples, mode="loss")["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients():
    x = _clip()
    grads = []
    for with_cp in (False, True):
        torch.manual_seed(0)
        model = _perturb(_backbone(attention_type="divided", with_cp=with_cp))
        model(x)[0].square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


def test_sincos_table_is_videomaes():
    n, d = 12, 10
    # VideoMAE's definition, written out.
    table = np.array([[p / np.power(10000, 2 * (j // 2) / d) for j in range(d)] for p in range(n)])
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    torch.testing.assert_close(sincos_position_table(n, d), torch.tensor(table, dtype=torch.float32)[None])


def test_other_clip_lengths_and_sizes_run():
    for pos_embed in ("learned", "joint", "sincos"):
        model = _backbone(pos_embed=pos_embed, class_token=pos_embed != "sincos",
                          pool="token" if pos_embed != "sincos" else "mean").eval()
        with torch.no_grad():
            assert model(_clip(frames=8, size=48))[0].shape == (2, DIM)


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="attention_type"):
        _backbone(attention_type="space_time")
    with pytest.raises(ConfigError, match="factorised_encoder takes pos_embed: learned"):
        _backbone(attention_type="factorised_encoder", pos_embed="sincos")
    with pytest.raises(ConfigError, match="num_frames 5"):
        _backbone(num_frames=5)
    with pytest.raises(ConfigError, match="tubelets"):
        _backbone()(_clip(frames=3))


# ------------------------------------------------------------------------------------ from an image ViT


MEAN_POOLED = dict(class_token=False, pool="mean")


@pytest.mark.parametrize(
    "backbone",
    [
        dict(attention_type="joint", inflate="center", **MEAN_POOLED),
        dict(attention_type="joint", inflate="average", pos_embed="joint", **MEAN_POOLED),
        dict(attention_type="joint", inflate="center", tubelet_size=1, num_frames=3, **MEAN_POOLED),
        dict(attention_type="divided", inflate="center"),
        dict(attention_type="divided", inflate="average", tubelet_size=1, class_token=False, pool="mean"),
    ],
    ids=["joint-center", "joint-average-joint-table", "joint-one-frame-tubelets", "divided-center-2-frames",
         "divided-mean-pooled"],
)
def test_inflated_image_model_on_a_static_clip_is_the_image_model(backbone):
    # Joint attention with a class token is not exact: the class token is one key among T' copies
    # of each patch key, so its attention weight shrinks (see the backbone's docstring).
    pooled = dict(class_token=False, pool="mean") if backbone.get("pool") == "mean" else {}
    image = _image_classifier(**pooled)
    video = _recognizer(**backbone).eval()
    result = load_model_weights(video, image.state_dict(), "image ViT")
    assert result["missing"] == [] and result["unexpected"] == []
    frames = backbone.get("num_frames", FRAMES)
    frame = _clip(frames=1)[:, :, 0]
    static = frame.unsqueeze(2).expand(-1, -1, frames, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(video(static, mode="tensor"), image(frame, mode="tensor"), rtol=1e-5, atol=1e-5)
    kernel = video.backbone.stem.proj.weight
    if backbone["inflate"] == "center" and kernel.shape[2] == 2:
        assert kernel[:, :, 0].abs().sum() == 0  # only the central frame (index 1) is used
        torch.testing.assert_close(kernel[:, :, 1], image.backbone.stem.proj.weight)


def test_timesformer_from_an_image_model_is_the_image_model_on_a_static_clip():
    image = _image_classifier()
    video = _recognizer(attention_type="divided", tubelet_size=1).eval()
    result = load_model_weights(video, image.state_dict(), "image ViT")
    assert result["missing"] == [] and result["unexpected"] == []
    block = video.backbone.blocks[1]
    torch.testing.assert_close(block.temporal_attn.qkv.weight, image.backbone.blocks[1].attn.qkv.weight)
    assert block.temporal_fc.weight.abs().sum() == 0 and video.backbone.time_embed.abs().sum() == 0
    frame = _clip(frames=1)[:, :, 0]
    static = frame.unsqueeze(2).expand(-1, -1, FRAMES, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(video(static, mode="tensor"), image(frame, mode="tensor"), rtol=1e-5, atol=1e-5)
        # ... and the temporal branch is there: a clip that moves gives another output once it is on.
        _perturb(block.temporal_fc)
        assert not torch.allclose(video(_clip(), mode="tensor"), video(static[:, :, :1].expand_as(_clip()), mode="tensor"))


def test_image_checkpoint_of_another_size_is_resampled():
    image = _image_classifier(img_size=48)
    video = _recognizer().eval()
    load_model_weights(video, image.state_dict(), "image ViT")
    expected = resample_abs_pos_embed(image.backbone.pos_embed.detach(), (4, 4), (6, 6), 1)
    torch.testing.assert_close(video.backbone.pos_embed.detach(), expected)


def test_image_checkpoint_into_sincos_model_without_class_token():
    image = _image_classifier()
    video = _recognizer(pos_embed="sincos", class_token=False, pool="mean")
    result = load_model_weights(video, image.state_dict(), "image ViT")
    # The class token and learned positions are dropped on purpose (not "unexpected"); the image
    # model's final norm has no place in a mean-pooled model (fc_norm starts fresh).
    assert sorted(result["unexpected"]) == ["backbone.norm.bias", "backbone.norm.weight"]
    assert sorted(result["missing"]) == ["backbone.fc_norm.bias", "backbone.fc_norm.weight"]
    torch.testing.assert_close(video.backbone.blocks[0].attn.qkv.weight, image.backbone.blocks[0].attn.qkv.weight)


# ------------------------------------------------------------------------------------ head and views


def _head(average_clips):
    head = MODELS.build(dict(type="VideoClsHead", num_classes=CLASSES, in_channels=DIM, average_clips=average_clips))
    return _perturb(head).eval()


@pytest.mark.parametrize("average_clips", ["prob", "score"])
def test_multi_view_averaging(average_clips):
    head = _head(average_clips)
    views = [3, 2]  # the preprocessor records each video's num_views
    feats = torch.randn(sum(views), DIM)
    samples = [DataSample(metainfo=dict(num_views=v)) for v in views]
    out = head.predict((feats,), samples)
    W, b = head.fc.weight.detach(), head.fc.bias.detach()
    start = 0
    for sample, v in zip(out, views):
        rows = []
        for r in range(start, start + v):
            logits = [float(feats[r] @ W[k] + b[k]) for k in range(CLASSES)]
            if average_clips == "prob":
                top = max(logits)
                exp = [math.exp(z - top) for z in logits]
                logits = [e / sum(exp) for e in exp]
            rows.append(logits)
        expected = torch.tensor(rows).mean(dim=0)
        torch.testing.assert_close(sample.pred_score, expected, rtol=1e-5, atol=1e-6)
        assert int(sample.pred_label) == int(expected.argmax())
        start += v


def test_views_without_num_views_are_split_evenly_and_mismatches_named():
    head = _head("score")
    feats = torch.randn(6, DIM)
    out = head.predict((feats,), [DataSample(), DataSample()])
    torch.testing.assert_close(out[1].pred_score, head(feats)[3:].mean(dim=0))
    with pytest.raises(ValueError, match="num_views"):
        head.predict((feats,), [DataSample(metainfo=dict(num_views=2)), DataSample(metainfo=dict(num_views=2))])


def test_loss_trains_every_view_on_its_videos_label():
    head = MODELS.build(dict(type="VideoClsHead", num_classes=CLASSES, in_channels=DIM, dropout_ratio=0.5,
                             loss=dict(type="CrossEntropyLoss", label_smoothing=0.1)))
    _perturb(head).eval()  # eval: no dropout
    feats = torch.randn(5, DIM)
    samples = [DataSample(metainfo=dict(num_views=2), gt_label=torch.tensor([1])),
               DataSample(metainfo=dict(num_views=3), gt_label=torch.tensor([4]))]
    expected = F.cross_entropy(head(feats), torch.tensor([1, 1, 4, 4, 4]), label_smoothing=0.1)
    torch.testing.assert_close(head.loss((feats,), samples)["loss"], expected)


def test_recognizer_modes():
    model = _recognizer().eval()
    x = _clip(batch=4)
    assert model(x, mode="tensor").shape == (4, CLASSES)
    samples = [DataSample(metainfo=dict(num_views=2)), DataSample(metainfo=dict(num_views=2))]
    out = model(x, samples, mode="predict")
    assert len(out) == 2 and out[0].pred_score.shape == (CLASSES,)
    with pytest.raises(ValueError, match="unknown mode"):
        model(x, mode="logits")
