"""Hugging Face transformers video classifiers -> a vitasks ``Recognizer`` checkpoint.

``TimesformerForVideoClassification``, ``VideoMAEForVideoClassification`` and
``VivitForVideoClassification`` state dicts (``timesformer.*``, ``videomae.*``, ``vivit.*`` +
``classifier``), with or without ``config.json``, become ``backbone.*`` (a
``VideoVisionTransformer``) + ``head.fc.*`` (a ``VideoClsHead``). :func:`vitasks.convert.hf.read`
hands a state dict here when it sees one of those prefixes; :class:`VideoSource` then maps itself
(``to_vitasks``) instead of going through the image ViT's timm-named route.

What each source fixes (besides renaming; q/k/v are fused into ``qkv``, rows q, k, v):

============  ===================================================================================
TimeSformer   Conv2d patch kernel -> a 1-frame tubelet; spatial ``position_embeddings`` ->
              ``pos_embed``, ``time_embeddings`` -> ``time_embed``; ``divided_space_time`` ->
              ``attention_type: divided`` (``temporal_attention`` / ``temporal_layernorm`` /
              ``temporal_dense`` -> ``temporal_attn`` / ``temporal_norm`` / ``temporal_fc``),
              ``joint_space_time`` -> ``joint``; LayerNorm eps 1e-6 by default; class token.
VideoMAE      2-frame tubelets; fixed sin-cos positions (``pos_embed: sincos``, nothing stored);
              separate q and v biases and no k bias -> a fused qkv bias whose k part is zero
              (a key bias shifts every score of a query equally: softmax ignores it); mean
              pooling + ``fc_norm`` (its eps is PyTorch's 1e-5, the blocks' 1e-12).
ViViT         2-frame tubelets; one learned table over class token + the whole T' x h x w grid
              (``pos_embed: joint``); ``gelu_fast`` = the tanh GELU (``mlp_act: gelu_tanh``);
              eps 1e-6; class token; the pooler (unused by the classifier) is dropped.
============  ===================================================================================

Both the names of the hub checkpoints (``encoder.layer.{i}.attention.attention.query``,
``q_bias``, ``intermediate.dense``) and those of transformers 5 modules (``layers.{i}.attention.q_proj``,
``mlp.fc1``) are read. Without ``config.json`` the architecture comes from the weights where
they hold it and transformers' defaults otherwise (said in the notes).
"""

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple


from vitasks.convert.common import (HF_LAYER_PARTS, HF_LAYER_RE, NUM_HEADS_BY_WIDTH, ConvertOptions, HFEncoderNames, Source,
                                    StateDict, _compact, _pair)
from vitasks.convert.hf import _read_config
from vitasks.errors import CheckpointError

#: Checkpoint prefix -> (transformers class, transformers' config defaults that matter here).
VIDEO_MODELS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "timesformer": ("TimesformerForVideoClassification",
                    dict(layer_norm_eps=1e-6, hidden_act="gelu", image_size=224, num_frames=8,
                         attention_type="divided_space_time")),
    "videomae": ("VideoMAEForVideoClassification",
                 dict(layer_norm_eps=1e-12, hidden_act="gelu", image_size=224, num_frames=16, use_mean_pooling=True)),
    "vivit": ("VivitForVideoClassification",
              dict(layer_norm_eps=1e-6, hidden_act="gelu_fast", image_size=224, num_frames=32)),
}

#: transformers activations -> vitasks' ``mlp_act``.
_ACTS = {"gelu": "gelu", "gelu_fast": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}

# Per-layer module names (hub and transformers 5) -> the block's module names in vitasks.
_LAYER_PARTS = {
    **HF_LAYER_PARTS,
    "attention.attention.qkv": "attn.qkv",
    "temporal_layernorm": "temporal_norm",
    "temporal_attention.attention.qkv": "temporal_attn.qkv",
    "temporal_attention.output.dense": "temporal_attn.proj",
    "temporal_dense": "temporal_fc",
}
# VideoMAE's hub checkpoints hold the q and v biases as parameters of the attention itself.
_SEPARATE_BIASES = {"attention.attention.q_bias": "q", "attention.attention.v_bias": "v"}


def detect_video_model(sd: StateDict) -> Optional[str]:
    """``"timesformer"``, ``"videomae"`` or ``"vivit"`` when the state dict is one of
    transformers' video models (by its prefix), else None."""
    for prefix in VIDEO_MODELS:
        if any(k.startswith(prefix + ".") for k in sd):
            return prefix
    return None


@dataclass
class VideoSource(Source):
    """A transformers video checkpoint already in vitasks names (without ``backbone.``/``head.``
    prefixes: ``state_dict`` holds the backbone, ``head`` the classifier), with the
    ``VideoVisionTransformer`` arguments that reproduce it (``backbone``)."""

    model: str = ""
    backbone: Dict[str, Any] = field(default_factory=dict)
    head: StateDict = field(default_factory=dict)

    def to_vitasks(self, opts: ConvertOptions) -> Tuple[StateDict, Dict[str, Any]]:
        """The vitasks state dict (``backbone.*`` + ``head.fc.*``) and the meta dict, with the
        fine-tuning options applied (``num_classes``/``drop_head`` drop the head, ``img_size``
        resamples the spatial positions)."""
        return _to_vitasks(self, opts)

    def describe(self, meta: Dict[str, Any]) -> str:
        """A human summary: the source model and the config section that reproduces it."""
        return describe_video(meta)


# --------------------------------------------------------------------------------------------
# Reading


def read(sd: StateDict, cfg: Dict[str, Any], path: str, opts: ConvertOptions, folder: str) -> VideoSource:
    """Map a transformers video state dict ``sd`` (read from ``path``, with the ``config.json``
    of ``folder`` as ``cfg``, possibly empty) to a :class:`VideoSource`."""
    kind = detect_video_model(sd)
    if kind is None:
        raise CheckpointError(f"{path}: not a transformers TimeSformer, VideoMAE or ViViT state dict")
    class_name, defaults = VIDEO_MODELS[kind]
    notes: List[str] = []
    if not cfg:
        notes.append(f"no config.json beside the weights: transformers' {class_name} defaults assumed where the "
                     f"weights don't tell ({', '.join(f'{k}={v}' for k, v in defaults.items())})")
    settings = {**defaults, **{k: v for k, v in cfg.items() if k in defaults}}
    backbone, head = _rename(sd, kind, path, notes)
    hint = _architecture(kind, backbone, settings, cfg, opts, path, notes)
    act = settings["hidden_act"]
    if act not in _ACTS:
        notes.append(f"hidden_act={act!r}: vitasks' MLP has exact or tanh GELU only, so outputs will differ")
    return VideoSource(
        fmt="hf", path=path, state_dict=backbone, norm_eps=hint["norm_eps"], mlp_act=hint["mlp_act"],
        num_heads=hint["num_heads"], input_norm=_input_norm(folder), notes=notes, model=class_name, backbone=hint, head=head,
    )


def _input_norm(folder: str) -> Optional[Dict[str, List[float]]]:
    """The processor's normalisation (``preprocessor_config.json``) in 0-255 units, if any."""
    pre = _read_config(os.path.join(folder, "preprocessor_config.json"))
    if isinstance(pre.get("image_mean"), list) and isinstance(pre.get("image_std"), list):
        # transformers' processors normalise 0-1 frames; vitasks' preprocessor 0-255 ones.
        return dict(mean=[round(float(m) * 255, 4) for m in pre["image_mean"]],
                    std=[round(float(s) * 255, 4) for s in pre["image_std"]])
    return None


def _rename(sd: StateDict, kind: str, path: str, notes: List[str]) -> Tuple[StateDict, StateDict]:
    """(backbone tensors in vitasks names, head tensors)."""
    head: StateDict = {}
    names = HFEncoderNames({
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.time_embeddings": "time_embed",
        "embeddings.patch_embeddings.projection.weight": "stem.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "stem.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }, _LAYER_PARTS)
    for key, value in sd.items():
        k = key[len(kind) + 1:]
        layer = HF_LAYER_RE.match(k)
        if key in ("classifier.weight", "classifier.bias"):
            head["fc." + key.split(".")[1]] = value
        elif key in ("fc_norm.weight", "fc_norm.bias"):  # VideoMAE's, outside the base model
            names.out[key] = value
        elif not key.startswith(kind + "."):
            names.unknown.append(key)
        elif k.startswith("pooler."):
            notes.append(f"{key} dropped: the classifier does not use the pooler")
        elif layer and layer.group(2) in _SEPARATE_BIASES:
            names.add_qkv(layer.group(1), "bias", _SEPARATE_BIASES[layer.group(2)], value)
        elif not names.place(k, value):
            names.unknown.append(key)
    # VideoMAE has no key bias
    out = names.result(path, VIDEO_MODELS[kind][0], f"{kind}.embeddings.*, {kind}.encoder.layer.* or "
                       f"{kind}.layers.*, classifier", zero_missing_bias=True)
    kernel = out.get("stem.proj.weight")
    if kernel is None:
        raise CheckpointError(f"{path}: no patch embedding ({kind}.embeddings.patch_embeddings.projection.weight)")
    if kernel.ndim == 4:  # TimeSformer's per-frame Conv2d: a one-frame tubelet
        out["stem.proj.weight"] = kernel.unsqueeze(2)
    if kind == "videomae" and "norm.weight" in out:
        raise CheckpointError(
            f"{path}: a VideoMAE model with use_mean_pooling=False (a final layernorm, the first token "
            "classified) is not supported; VideoMAE's classifiers use mean pooling + fc_norm"
        )
    return out, head


def _architecture(kind: str, sd: StateDict, settings: Dict[str, Any], cfg: Dict[str, Any],
                  opts: ConvertOptions, path: str, notes: List[str]) -> Dict[str, Any]:
    """The ``VideoVisionTransformer`` arguments that reproduce the source model."""
    kernel = sd["stem.proj.weight"]
    embed_dim, in_channels, tubelet, patch = kernel.shape[0], kernel.shape[1], kernel.shape[2], kernel.shape[-1]
    if kernel.shape[-2] != patch:
        raise CheckpointError(f"{path}: non-square patches {tuple(kernel.shape[-2:])} are not supported")
    depth_ids = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")})
    if not depth_ids or depth_ids != list(range(len(depth_ids))):
        raise CheckpointError(f"{path}: expected layers 0..N-1, found {depth_ids[:10]}")
    num_heads = opts.num_heads or cfg.get("num_attention_heads")
    if num_heads is None:
        num_heads = NUM_HEADS_BY_WIDTH.get(embed_dim, max(embed_dim // 64, 1))
        notes.append(f"num_heads={num_heads} assumed from the width; pass num_heads to override")
    if embed_dim % num_heads:
        raise CheckpointError(f"num_heads={num_heads} does not divide the width {embed_dim}")
    mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    hint: Dict[str, Any] = dict(
        type="VideoVisionTransformer",
        num_frames=int(settings["num_frames"]),
        img_size=settings["image_size"],
        patch_size=int(patch),
        tubelet_size=int(tubelet),
        in_channels=int(in_channels),
        embed_dim=int(embed_dim),
        depth=len(depth_ids),
        num_heads=int(num_heads),
        mlp_ratio=mlp_hidden / embed_dim if mlp_hidden % embed_dim else mlp_hidden // embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        norm_eps=float(settings["layer_norm_eps"]),
        mlp_act=_ACTS.get(settings["hidden_act"], "gelu"),
    )
    if kind == "timesformer":
        attention = settings["attention_type"]
        if "blocks.0.temporal_attn.qkv.weight" in sd:
            attention = "divided_space_time"
        elif not cfg:
            attention = "joint_space_time" if "time_embed" in sd else "space_only"
        if attention == "space_only":
            raise CheckpointError(
                f"{path}: TimeSformer with attention_type space_only (frames classified one by one) is not "
                "supported; divided_space_time and joint_space_time are"
            )
        table = sd["pos_embed"]
        side = math.isqrt(table.shape[1] - 1)
        if side * side != table.shape[1] - 1:
            raise CheckpointError(f"{path}: position_embeddings {tuple(table.shape)} are not a class token + square grid")
        if not cfg:
            hint["img_size"] = side * patch
            hint["num_frames"] = int(sd["time_embed"].shape[1]) if "time_embed" in sd else hint["num_frames"]
        hint.update(attention_type="divided" if attention == "divided_space_time" else "joint",
                    pos_embed="learned", class_token=True, pool="token", fc_norm=False)
    elif kind == "videomae":
        if not cfg:
            notes.append("VideoMAE stores no position table: image_size and num_frames are transformers' "
                         "defaults (the sin-cos positions follow the input size anyway)")
        hint.update(attention_type="joint", pos_embed="sincos", class_token=False, pool="mean", fc_norm=True,
                    # VideoMAEForVideoClassification's fc_norm is nn.LayerNorm(hidden_size): eps 1e-5.
                    fc_norm_eps=1e-5)
        if "fc_norm.weight" not in sd:
            raise CheckpointError(f"{path}: a VideoMAE classifier without fc_norm (mean pooling) was expected")
    else:
        hint.update(attention_type="joint", pos_embed="joint", class_token=True, pool="token", fc_norm=False)
        num_grid = sd["pos_embed"].shape[1] - 1
        img = _pair(hint["img_size"], "image_size")
        spatial = (img[0] // patch) * (img[1] // patch)
        if num_grid % spatial:
            raise CheckpointError(
                f"{path}: position_embeddings hold {num_grid} grid positions, not a multiple of the "
                f"{spatial} tubelets of a {img[0]}x{img[1]} frame; put the model's config.json beside the weights"
            )
        hint["num_frames"] = num_grid // spatial * tubelet
    img = _pair(hint["img_size"], "image_size")
    hint["img_size"] = img[0] if img[0] == img[1] else list(img)
    return hint


# --------------------------------------------------------------------------------------------
# Mapping and options


def _to_vitasks(src: VideoSource, opts: ConvertOptions) -> Tuple[StateDict, Dict[str, Any]]:
    for name in ("drop_final_norm", "pool", "keep_pre_logits"):
        if getattr(opts, name):
            raise CheckpointError(f"{name} does not apply to a video checkpoint ({src.model})")
    hint = dict(src.backbone)
    notes = list(src.notes)
    sd = dict(src.state_dict)
    head = dict(src.head)
    src_classes = head["fc.weight"].shape[0] if "fc.weight" in head else None
    if head and opts.drop_head:
        head = {}
        notes.append("head dropped (drop_head): the new head starts at zero")
    elif head and opts.num_classes is not None and opts.num_classes != src_classes:
        head = {}
        notes.append(f"head dropped: {src_classes} classes in the checkpoint, {opts.num_classes} wanted; "
                     "the new head starts at zero")
    source_img = list(_pair(hint["img_size"], "img_size"))
    if opts.img_size is not None:
        img = _pair(opts.img_size, "img_size")
        patch = hint["patch_size"]
        if img[0] % patch or img[1] % patch:
            raise CheckpointError(f"img_size {img} must be divisible by the patch size {patch}")
        if list(img) != source_img:
            _resample_positions(sd, hint, source_img, img)
            notes.append(f"position embeddings resampled from {source_img[0]}x{source_img[1]} to {img[0]}x{img[1]} "
                         "frames, as the backbone would at load time")
        hint["img_size"] = img[0] if img[0] == img[1] else list(img)

    num_classes = src_classes if head else opts.num_classes
    out = {"backbone." + k: _compact(v) for k, v in sd.items()}
    out.update({"head." + k: _compact(v) for k, v in head.items()})
    meta = dict(
        converted_from="hf",
        source=os.path.abspath(src.path),
        source_model=src.model,
        task_model="Recognizer",
        config_hint={k: v for k, v in hint.items() if k != "type"},
        head_hint=dict(type="VideoClsHead", num_classes=num_classes, in_channels=hint["embed_dim"]),
        data_preprocessor_hint=src.input_norm,
        source_img_size=source_img,
        source_num_frames=hint["num_frames"],
        notes=notes,
    )
    return out, meta


def _resample_positions(sd: StateDict, hint: Dict[str, Any], old: List[int], new: Tuple[int, int]) -> None:
    """Resample the learned position tables to frames of size ``new``, as the backbone does."""
    from vitasks.models.backbones.video_vit import _resample_joint
    from vitasks.models.layers.pos_embed import resample_abs_pos_embed

    if "pos_embed" not in sd:
        return  # sin-cos positions follow the input
    patch = hint["patch_size"]
    old_grid, new_grid = (old[0] // patch, old[1] // patch), (new[0] // patch, new[1] // patch)
    if hint["pos_embed"] == "joint":
        t = hint["num_frames"] // hint["tubelet_size"]
        sd["pos_embed"] = _resample_joint(sd["pos_embed"], (t, *old_grid), (t, *new_grid), 1)
    else:
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_grid, old_grid, 1, mode="bicubic")


def describe_video(meta: Dict[str, Any]) -> str:
    """What was converted and the model section of a config that reproduces it."""
    import yaml

    h = meta["config_hint"]
    section = {"model": {"type": "Recognizer", "backbone": {"type": "VideoVisionTransformer", **h},
                         "head": meta.get("head_hint") or {}}}
    if meta.get("data_preprocessor_hint"):
        section["model"]["data_preprocessor"] = meta["data_preprocessor_hint"]
    lines = [
        f"converted {meta['source_model']} checkpoint {meta['source']}",
        f"  architecture: VideoVisionTransformer attention_type={h['attention_type']} pos_embed={h['pos_embed']} "
        f"embed_dim={h['embed_dim']} depth={h['depth']} num_heads={h['num_heads']} "
        f"tubelet {h['tubelet_size']}x{h['patch_size']}x{h['patch_size']} num_frames={h['num_frames']} "
        f"img_size={h['img_size']}",
        "  set these in the config (norm epsilons, mlp_act, pooling and positions matter for exact outputs):",
    ]
    lines += ["    " + line for line in yaml.safe_dump(section, sort_keys=False, default_flow_style=None).rstrip().splitlines()]
    lines += [f"  note: {n}" for n in meta.get("notes", [])]
    return "\n".join(lines)
