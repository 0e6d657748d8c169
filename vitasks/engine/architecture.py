"""The backbone architecture a checkpoint records, and its comparison with the model it loads into.

Weights do not say everything about the model that produced them. LayerNorm epsilon, the MLP
activation, the pooling, where the final norm sits, the number of heads (the fused qkv weight
has the same shape for any head count) and the epsilons of a hybrid stem change the outputs
without changing one tensor shape. Loading a Hugging Face ViT-B (LayerNorm eps 1e-12) into
``configs/cls_imagenet.yaml`` (eps 1e-6) gives logits 1.8e-4 (relative) away from the original
model's, and nothing says so.

So a converted checkpoint records, in ``meta["architecture"]``, the settings of the backbone
that reproduces its source model, as :func:`backbone_architecture` reads them from a built
backbone (the converter builds the backbone of its config hint on the meta device and reads it:
one definition of what is recorded). At load time the same function reads the model's own
backbone and :func:`architecture_mismatches` lists every setting that differs;
:func:`vitasks.engine.checkpoint.load_model_weights` warns once per load, naming each.

The record is plain JSON (it is also stored in ``.safetensors`` metadata)::

    {"type": "VisionTransformer", "embed_dim": 768, "depth": 12, "num_heads": 12,
     "patch_size": 16, "mlp_ratio": 4, "qkv_bias": true, "layer_scale": false,
     "norm_eps": 1e-12, "mlp_act": "gelu", "class_token": true, "num_reg_tokens": 0,
     "pool": "token", "fc_norm": false, "final_norm": true,
     "stem": {"type": "PatchEmbed", "bias": true}}

It also records how position embeddings are resampled to another grid (``interpolate_mode``,
``interpolate_antialias``, ``interpolate_offset``: DINOv2's, timm's and transformers' rules
differ by 1e-3 at 224 px), ViTDet's windows (``window_size``, ``global_indices``), the decomposed
relative positions (``use_rel_pos``) and BEiT's relative position bias (``rel_pos_bias``:
``per_block``, ``shared`` or ``none``). A ``VideoVisionTransformer`` records its space-time
layout instead: attention type, tubelet size, frames, temporal depth, position embeddings and
inflation.

Stems add what changes their outputs: ``ConvStem`` its channels, strides, kernel size,
BatchNorm epsilon and how it downsamples (``ConvStem3D`` its temporal strides and kernel sizes
too; a video ViT records its stem when it has one instead of the tubelet embedding, and whether
its tubelets give motion energies); ``ResNetStem`` its layers, root width, GroupNorm groups
and epsilon, and the weight-standardisation form and epsilon. A setting missing on either side
(an older record, a plugin's stem) is not compared.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

__all__ = [
    "ARCHITECTURE_KEY",
    "architecture_from_config",
    "architecture_mismatches",
    "backbone_architecture",
    "checkpoint_architecture",
    "format_mismatches",
]

#: Where a checkpoint's ``meta`` holds the record.
ARCHITECTURE_KEY = "architecture"

Mismatch = Tuple[str, Any, Any]  # (key, value in the checkpoint, value in the model)


def _read(getter: Callable[[], Any]) -> Any:
    """``getter()``, or None when the module does not have that part (a subclass or plugin
    backbone laid out differently: its setting is then simply not compared)."""
    try:
        return getter()
    except (AttributeError, IndexError, TypeError):
        return None


def _number(x: float) -> Any:
    return int(x) if float(x).is_integer() else float(x)


def _is_norm(module: Optional[nn.Module]) -> bool:
    return module is not None and not isinstance(module, nn.Identity)


def _stem_architecture(stem: nn.Module) -> Dict[str, Any]:
    """The settings of a stem module that change its outputs, read from its layers."""
    name = type(stem).__name__
    record: Dict[str, Any] = {"type": name}
    if name == "PatchEmbed":
        record["bias"] = _read(lambda: stem.proj.bias is not None)
    elif name in ("ConvStem", "ConvStem3D"):
        record["channels"] = _read(lambda: [int(c) for c in stem.channels])
        record["strides"] = _read(lambda: [int(s) for s in stem.strides])
        if name == "ConvStem3D":
            record["temporal_strides"] = _read(lambda: [int(s) for s in stem.temporal_strides])
            record["temporal_kernel_sizes"] = _read(lambda: [int(c.conv.kernel_size[0]) for c in stem.convs])
        record["kernel_size"] = _read(lambda: int(stem.convs[0].conv.kernel_size[-1]))
        record["bn_eps"] = _read(lambda: float(stem.convs[0].bn.eps))
        # Max-pooling and strided convs share one state dict but not the outputs.
        record["downsample"] = _read(lambda: str(stem.downsample))
    elif name == "ResNetStem":
        root = _read(lambda: stem.backbone.stem)
        record["layers"] = _read(lambda: [int(n) for n in stem.layers])
        record["stem_channels"] = _read(lambda: int(root.conv.out_channels))
        record["num_groups"] = _read(lambda: int(root.norm.num_groups))
        record["gn_eps"] = _read(lambda: float(root.norm.eps))
        record["ws_eps"] = _read(lambda: float(root.conv.eps))
        record["ws_form"] = _read(lambda: str(root.conv.ws_form))
    return {k: v for k, v in record.items() if v is not None}


def backbone_architecture(backbone: Optional[nn.Module]) -> Optional[Dict[str, Any]]:
    """The output-changing settings a ``VisionTransformer`` (or subclass) was built with, read
    from its modules (see the module docstring); None for any other module."""
    from vitasks.models.backbones.video_vit import VideoVisionTransformer
    from vitasks.models.backbones.vit import VisionTransformer

    if isinstance(backbone, VideoVisionTransformer):
        return _video_architecture(backbone)
    if not isinstance(backbone, VisionTransformer):
        return None
    vit = backbone
    block = _read(lambda: vit.blocks[0])
    record = {
        "type": type(vit).__name__,
        "embed_dim": _read(lambda: int(vit.embed_dim)),
        "depth": _read(lambda: len(vit.blocks)),
        "num_heads": _read(lambda: int(block.attn.num_heads)),
        "patch_size": _read(lambda: int(vit.patch_size)),
        "mlp_ratio": _read(lambda: _number(block.mlp.fc1.out_features / vit.embed_dim)),
        "qkv_bias": _read(lambda: block.attn.qkv.bias is not None),
        "layer_scale": _read(lambda: not isinstance(block.ls1, nn.Identity)),
        "norm_eps": _read(lambda: float(block.norm1.eps)),
        "mlp_act": _read(lambda: str(vit.mlp_act)),
        "class_token": _read(lambda: vit.cls_token is not None),
        "num_reg_tokens": _read(lambda: int(vit.num_reg_tokens)),
        "pool": _read(lambda: str(vit.pool)),
        "fc_norm": _read(lambda: _is_norm(vit.fc_norm)),
        "final_norm": _read(lambda: _is_norm(vit.norm) or _is_norm(vit.fc_norm)),
        "stem": _read(lambda: _stem_architecture(vit.stem)),
        # how the position embeddings are resampled to another grid (DINOv2's and timm's rules differ)
        "interpolate_mode": _read(lambda: str(vit.interpolate_mode)),
        "interpolate_antialias": _read(lambda: bool(vit.interpolate_antialias)),
        "interpolate_offset": _read(lambda: _number(vit.interpolate_offset)),
        # ViTDet's attention layout and the relative positions (decomposed, or BEiT's bias table)
        "window_size": _read(lambda: int(vit.window_size)),
        "global_indices": _read(lambda: sorted(int(i) for i in vit.global_indices) if vit.window_size else None),
        "use_rel_pos": _read(lambda: bool(vit.use_rel_pos)),
        "rel_pos_bias": _read(lambda: "per_block" if vit.use_rel_pos_bias else
                              "shared" if vit.use_shared_rel_pos_bias else "none"),
    }
    return {k: v for k, v in record.items() if v is not None}


def _video_architecture(vit: nn.Module) -> Dict[str, Any]:
    """The output-changing settings of a ``VideoVisionTransformer``: the image settings it shares
    and its space-time layout (attention type, tubelets, frames, temporal encoder, position
    embeddings, how image weights are inflated)."""
    block = _read(lambda: vit.blocks[0])
    record = {
        "type": type(vit).__name__,
        "embed_dim": _read(lambda: int(vit.embed_dim)),
        "depth": _read(lambda: int(vit.spatial_depth)),
        "temporal_depth": _read(lambda: int(vit.temporal_depth)),
        "num_heads": _read(lambda: int(vit.num_heads)),
        "patch_size": _read(lambda: int(vit.patch_size)),
        "tubelet_size": _read(lambda: int(vit.tubelet_size)),
        "num_frames": _read(lambda: int(vit.num_frames)),
        "attention_type": _read(lambda: str(vit.attention_type)),
        "pos_embed": _read(lambda: str(vit.pos_embed_type)),
        "inflate": _read(lambda: str(vit.inflate)),
        "motion_energy": _read(lambda: bool(vit.stem.motion_energy) if hasattr(vit.stem, "motion_energy") else None),
        "stem": _read(lambda: None if type(vit.stem).__name__ == "TubeletEmbed" else _stem_architecture(vit.stem)),
        "qkv_bias": _read(lambda: block.attn.qkv.bias is not None),
        "norm_eps": _read(lambda: float(block.norm1.eps)),
        "mlp_act": _read(lambda: str(vit.mlp_act)),
        "class_token": _read(lambda: vit.cls_token is not None),
        "pool": _read(lambda: str(vit.pool)),
        "interpolate_mode": _read(lambda: str(vit.interpolate_mode)),
    }
    return {k: v for k, v in record.items() if v is not None}


def architecture_from_config(backbone_cfg: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The record of the backbone a ``VisionTransformer`` config (e.g. a converter's config
    hint) builds: built on the meta device (no memory, no initialisation cost) and read by
    :func:`backbone_architecture`, so the defaults the config leaves out are recorded too."""
    from vitasks.models.backbones.video_vit import VideoVisionTransformer
    from vitasks.models.backbones.vit import VisionTransformer

    kwargs = {k: v for k, v in dict(backbone_cfg).items() if k != "type"}
    cls = VideoVisionTransformer if backbone_cfg.get("type") == "VideoVisionTransformer" else VisionTransformer
    with torch.device("meta"):
        backbone = cls(**kwargs)
    return backbone_architecture(backbone)


def checkpoint_architecture(meta: Any) -> Optional[Dict[str, Any]]:
    """The architecture a checkpoint's ``meta`` records: ``meta["architecture"]``, or for a
    checkpoint converted before the record existed, the one its ``config_hint`` builds."""
    if not isinstance(meta, Mapping):
        return None
    recorded = meta.get(ARCHITECTURE_KEY)
    if isinstance(recorded, Mapping):
        return dict(recorded)
    hint = meta.get("config_hint")
    if meta.get("converted_from") and isinstance(hint, Mapping):
        from vitasks.errors import VitasksError

        try:
            return architecture_from_config(hint)
        except (VitasksError, TypeError, ValueError, RuntimeError):
            return None  # a hint this version cannot build: nothing to compare
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def architecture_mismatches(recorded: Mapping[str, Any], built: Mapping[str, Any]) -> List[Mismatch]:
    """``(key, checkpoint value, model value)`` for every setting recorded on both sides that
    differs; stem settings as ``stem.<key>`` (compared only when the stem types agree)."""
    mismatches: List[Mismatch] = []
    for key, value in recorded.items():
        if key not in built:
            continue
        other = built[key]
        if key == "stem" and isinstance(value, Mapping) and isinstance(other, Mapping):
            if value.get("type") != other.get("type"):
                mismatches.append(("stem.type", value.get("type"), other.get("type")))
                continue
            mismatches += [(f"stem.{k}", a, b) for k, a, b in architecture_mismatches(value, other)]
        elif not _same(value, other):
            mismatches.append((key, value, other))
    return mismatches


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def format_mismatches(mismatches: List[Mismatch]) -> str:
    """``"norm_eps: checkpoint 1e-12, config 1e-06; pool: checkpoint token, config mean"``."""
    return "; ".join(f"{key}: checkpoint {_show(a)}, config {_show(b)}" for key, a, b in mismatches)
