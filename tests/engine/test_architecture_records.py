"""The architecture record names the settings that change outputs without changing a tensor
shape: the position-embedding resampling rule, ViTDet's windows, the relative positions, and a
video backbone's space-time layout (vitasks/engine/architecture.py)."""

from vitasks.engine.architecture import architecture_from_config, architecture_mismatches, backbone_architecture
from vitasks.models.backbones import VideoVisionTransformer, VisionTransformer

SMALL = dict(type="VisionTransformer", img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2)


def _mismatched_keys(a: dict, b: dict) -> set:
    return {key for key, _, _ in architecture_mismatches(architecture_from_config(a), architecture_from_config(b))}


def test_position_resampling_rules_differ():
    timm_rule = dict(SMALL, interpolate_mode="bicubic", interpolate_antialias=True)
    hf_rule = dict(SMALL, interpolate_mode="bicubic", interpolate_antialias=False)
    dinov2_rule = dict(SMALL, interpolate_mode="bicubic", interpolate_offset=0.1)
    assert _mismatched_keys(timm_rule, hf_rule) == {"interpolate_antialias"}
    assert _mismatched_keys(hf_rule, dinov2_rule) == {"interpolate_offset"}
    assert _mismatched_keys(hf_rule, hf_rule) == set()


def test_vitdet_windows_and_relative_positions_are_recorded():
    plain = dict(SMALL, class_token=False, pool="mean")
    windowed = dict(plain, window_size=2, global_indices=[1], use_rel_pos=True)
    # global_indices mean something only with windows: recorded (and compared) only then
    assert _mismatched_keys(plain, windowed) == {"window_size", "use_rel_pos"}
    other_globals = dict(windowed, global_indices=[0])
    assert _mismatched_keys(windowed, other_globals) == {"global_indices"}
    beit = dict(SMALL, use_rel_pos_bias=True)
    shared = dict(SMALL, use_shared_rel_pos_bias=True)
    record = architecture_from_config(beit)
    assert record["rel_pos_bias"] == "per_block"
    assert _mismatched_keys(beit, shared) == {"rel_pos_bias"}
    assert backbone_architecture(VisionTransformer(**{k: v for k, v in SMALL.items() if k != "type"}))["rel_pos_bias"] == "none"


def test_video_backbones_have_a_record():
    video = dict(type="VideoVisionTransformer", img_size=32, patch_size=16, num_frames=4, tubelet_size=2,
                 embed_dim=16, depth=2, num_heads=2)
    record = architecture_from_config(video)
    assert record["type"] == "VideoVisionTransformer"
    assert record["num_frames"] == 4 and record["tubelet_size"] == 2 and record["depth"] == 2
    divided = dict(video, attention_type="divided")
    assert "attention_type" in _mismatched_keys(video, divided)
    built = VideoVisionTransformer(**{k: v for k, v in divided.items() if k != "type"})
    assert backbone_architecture(built) == architecture_from_config(divided)
