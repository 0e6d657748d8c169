"""transformers BEiT and Data2Vec-vision checkpoints -> vitasks.

``BeitForSemanticSegmentation`` and ``Data2VecVisionForSemanticSegmentation`` become an
``EncoderDecoder`` state dict: ``backbone.*`` (a ``VisionTransformer`` with BEiT's relative
position bias and LayerScale), ``neck.*`` (``Feature2Pyramid``: fpn1 deconv-BN-GELU-deconv, fpn2
deconv, fpn3 identity, fpn4 max pooling), ``decode_head.*`` (``UPerHead``) and
``auxiliary_head.*`` (``FCNHead``). ``BeitModel`` / ``Data2VecVisionModel`` (and their
``ForImageClassification``) become a classifier state dict (``backbone.*`` + ``head.fc.*``).
:func:`vitasks.convert.hf.read` hands a state dict here when its keys start with ``beit.`` or
``data2vec_vision.``; :class:`BeitSource` then maps itself (``to_vitasks``).

Names read (each piece independently, so mixed checkpoints work too):

=============================  ==================================================  =========================================
vitasks                        transformers 4.x (hub files)                        transformers 5.x modules
=============================  ==================================================  =========================================
blocks.i.attn.qkv (q, k, v)    encoder.layer.i.attention.attention.query/key/value  layers.i.attention.q_proj/k_proj/v_proj
blocks.i.attn.proj             encoder.layer.i.attention.output.dense               layers.i.attention.o_proj
blocks.i.mlp.fc1 / fc2         intermediate.dense / output.dense                    mlp.fc1 / mlp.fc2
blocks.i.ls1 / ls2 .gamma      lambda_1 / lambda_2                                  lambda_1 / lambda_2
blocks.i.attn.rel_pos_bias     attention.attention.relative_position_bias.          relative_position_bias.
  .table                       relative_position_bias_table                         relative_position_bias_table
rel_pos_bias.table (shared)    encoder.relative_position_bias.*                     shared_position_bias.*
neck.ops.0.{0,1,3}, ops.1      fpn1.{0,1,3}, fpn2.0                                 fpn.fpn1.{conv_transpose1,normalization,
                                                                                    conv_transpose2}, fpn.fpn2
decode_head.psp.stages.j.1     decode_head.psp_modules.j.1.{conv,bn}                psp_modules.blocks.j.conv.{convolution,
                                                                                    normalization}
decode_head.bottleneck         decode_head.bottleneck                               decode_head.psp_bottleneck
*.conv / *.bn                  *.conv / *.bn                                        *.convolution / *.normalization
conv_seg                       classifier                                           classifier
=============================  ==================================================  =========================================

What the source fixes: BEiT has query and value biases and no key bias (the fused ``qkv`` bias
gets a zero key part: a key bias shifts all logits of a query equally, softmax ignores it);
without absolute position embeddings (BEiT's fine-tuning) ``pos_embed`` is zero (resampling
zeros gives zeros); LayerNorm eps from ``config.json`` (transformers' default 1e-12);
``out_indices``: transformers reads ``hidden_states[i - 1]`` for each ``i`` of its config's
``out_indices``, where ``hidden_states[0]`` is the embedding output, i.e. the output of block
``i - 2`` (0-based): its ``[3, 5, 7, 11]`` are vitasks' ``[1, 3, 5, 9]``. BEiT's own code (and
mmseg) reads blocks ``[3, 5, 7, 11]``, the blocks the published ADE20K weights were trained
with; the converter records transformers' (the outputs then equal transformers' logits) and says
so in a note.
"""

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from vitasks.convert.common import HF_LAYER_PARTS, ConvertOptions, HFEncoderNames, Source, StateDict, _compact, _num, _pair
from vitasks.errors import CheckpointError

PREFIXES = ("beit.", "data2vec_vision.")
HF_DEFAULT_EPS = 1e-12

_LAYER_PARTS = {
    **HF_LAYER_PARTS,
    "lambda_1": "ls1.gamma",
    "lambda_2": "ls2.gamma",
    "attention.attention.relative_position_bias.relative_position_bias_table": "attn.rel_pos_bias.table",
    "relative_position_bias.relative_position_bias_table": "attn.rel_pos_bias.table",
}
_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "stem.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "stem.proj.bias",
    "encoder.relative_position_bias.relative_position_bias_table": "rel_pos_bias.table",
    "shared_position_bias.relative_position_bias_table": "rel_pos_bias.table",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "pooler.layernorm.weight": "fc_norm.weight",
    "pooler.layernorm.bias": "fc_norm.bias",
}
_DROPPED = ("embeddings.mask_token",)
# Segmentation parts outside the backbone (no prefix), after _conv_names: regex -> replacement.
_NECK = [
    (r"^(?:fpn1\.0|fpn\.fpn1\.conv_transpose1)\.", "neck.ops.0.0."),
    (r"^(?:fpn1\.1|fpn\.fpn1\.normalization)\.", "neck.ops.0.1."),
    (r"^(?:fpn1\.3|fpn\.fpn1\.conv_transpose2)\.", "neck.ops.0.3."),
    (r"^(?:fpn2\.0|fpn\.fpn2)\.", "neck.ops.1."),
]
_HEADS = [
    (r"^decode_head\.psp_modules\.(?:blocks\.)?(\d+)\.(?:1|conv)\.", r"decode_head.psp.stages.\1.1."),
    (r"^decode_head\.(?:psp_)?bottleneck\.", "decode_head.bottleneck."),
    (r"^decode_head\.(lateral_convs|fpn_convs)\.(\d+)\.", r"decode_head.\1.\2."),
    (r"^decode_head\.fpn_bottleneck\.", "decode_head.fpn_bottleneck."),
    (r"^(decode_head|auxiliary_head)\.classifier\.", r"\1.conv_seg."),
    (r"^auxiliary_head\.convs\.(\d+)\.", r"auxiliary_head.convs.\1."),
    (r"^auxiliary_head\.conv_cat\.", "auxiliary_head.conv_cat."),
]
_REST_HEADS = ("fpn", "decode_head.", "auxiliary_head.")
_BN_FIELDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


_BARE_MARKERS = re.compile(r"^(?:encoder\.layer|layers)\.\d+\.(?:lambda_1|.*relative_position_bias_table)$|"
                           r"^(?:encoder\.relative_position_bias|shared_position_bias)\.")


def detect(sd: StateDict) -> Optional[str]:
    """The key prefix of a transformers BEiT or Data2Vec-vision state dict (``"beit."``,
    ``"data2vec_vision."``, or ``""`` for a bare ``BeitModel`` saved on its own, recognised by
    its LayerScale or relative position tables), else None."""
    for p in PREFIXES:
        if any(k.startswith(p) for k in sd):
            return p
    if any(_BARE_MARKERS.match(k) for k in sd):
        return ""
    return None


@dataclass
class BeitSource(Source):
    """A transformers BEiT / Data2Vec-vision checkpoint already in vitasks names (with their
    ``backbone.`` / ``neck.`` / ``decode_head.`` / ``auxiliary_head.`` / ``head.`` prefixes),
    and the configs that reproduce it."""

    model: str = ""
    backbone: Dict[str, Any] = field(default_factory=dict)
    hints: Dict[str, Any] = field(default_factory=dict)
    segmentation: bool = False

    def to_vitasks(self, opts: ConvertOptions) -> Tuple[StateDict, Dict[str, Any]]:
        return _to_vitasks(self, opts)

    def describe(self, meta: Dict[str, Any]) -> str:
        return describe_beit(meta)


def _conv_names(key: str) -> str:
    """transformers 5's ``convolution`` / ``normalization`` -> mmcv's ``conv`` / ``bn``."""
    key = re.sub(r"\.convolution\.", ".conv.", key)
    return re.sub(r"\.normalization\.", ".bn.", key)


def _rename(sd: StateDict, prefix: str, path: str, notes: List[str]) -> Tuple[StateDict, StateDict]:
    """(backbone, rest): vitasks names without ``backbone.`` for the backbone, full names for
    the neck and heads (``head.fc`` for a classifier)."""
    rest: StateDict = {}
    names = HFEncoderNames(_TOP, _LAYER_PARTS)
    for key, v in sd.items():
        if key.startswith(prefix) and not (prefix == "" and key.startswith(("classifier.",) + _REST_HEADS)):
            k = key[len(prefix):]
            if not (k in _DROPPED or k.endswith("relative_position_index") or names.place(k, v)):
                names.unknown.append(key)
            continue
        if key.startswith("classifier."):
            rest["head.fc." + key.split(".", 1)[1]] = v
            continue
        k = _conv_names(key)
        for pattern, repl in _NECK + _HEADS:
            new, n = re.subn(pattern, repl, k)
            if n:
                rest[new] = v
                break
        else:
            names.unknown.append(key)
    backbone = names.result(path, "BEiT / Data2Vec-vision model",
                            "embeddings, layers, fpn, decode_head, auxiliary_head, classifier", zero_missing_bias=True)
    if any("attn.qkv.bias" in k for k in backbone) and not any(
        k.startswith(prefix) and re.search(r"(attention\.key|k_proj)\.bias$", k) for k in sd
    ):
        notes.append("BEiT has no key bias: the fused qkv bias has a zero key part (softmax ignores it)")
    return backbone, rest


def _config_value(cfg: Dict[str, Any], key: str, default):
    value = cfg.get(key, default)
    return default if value is None else value


def read(sd: StateDict, cfg: Dict[str, Any], path: str, opts: ConvertOptions, folder: str) -> BeitSource:
    """Map a transformers BEiT / Data2Vec-vision state dict (with ``config.json`` as ``cfg``,
    possibly empty) to a :class:`BeitSource`."""
    prefix = detect(sd)
    if prefix is None:
        raise CheckpointError(f"{path}: not a transformers BEiT / Data2Vec-vision state dict")
    notes: List[str] = []
    backbone, rest = _rename(sd, prefix, path, notes)
    segmentation = any(k.startswith("decode_head.") for k in rest)
    model = ("Data2VecVision" if prefix == "data2vec_vision." or "data2vec" in str(cfg.get("model_type", "")) else "Beit") + (
        "ForSemanticSegmentation" if segmentation else ("ForImageClassification" if "head.fc.weight" in rest else "Model")
    )
    if not cfg:
        notes.append(f"no config.json beside the weights: layer_norm_eps={HF_DEFAULT_EPS} and the other "
                     "transformers defaults assumed where the weights don't tell")

    if "stem.proj.weight" not in backbone or "cls_token" not in backbone:
        raise CheckpointError(f"{path}: no patch embedding or class token found")
    depth = 1 + max(int(k.split(".")[1]) for k in backbone if k.startswith("blocks."))
    embed_dim, in_channels, patch, _ = backbone["stem.proj.weight"].shape
    patch = int(_config_value(cfg, "patch_size", patch))
    num_heads = int(_config_value(cfg, "num_attention_heads", 0)) or None
    per_block = "blocks.0.attn.rel_pos_bias.table" in backbone
    shared = "rel_pos_bias.table" in backbone
    if num_heads is None:
        table = backbone.get("blocks.0.attn.rel_pos_bias.table", backbone.get("rel_pos_bias.table"))
        if table is None:
            raise CheckpointError(f"{path}: no config.json and no relative position table: cannot tell the heads")
        num_heads = int(table.shape[1])
    image_size = _config_value(cfg, "image_size", None)
    if image_size is None:
        table = backbone.get("blocks.0.attn.rel_pos_bias.table", backbone.get("rel_pos_bias.table"))
        side = int(round(((table.shape[0] - 3) ** 0.5 + 1) / 2)) if table is not None else 14
        image_size = side * patch
    img = _pair(image_size, "image_size")
    grid = (img[0] // patch, img[1] // patch)
    if "pos_embed" not in backbone:
        backbone["pos_embed"] = torch.zeros(1, 1 + grid[0] * grid[1], embed_dim)
        notes.append("no absolute position embeddings (BEiT's fine-tuning): pos_embed is zero")
    act = _config_value(cfg, "hidden_act", "gelu")
    if act != "gelu":
        notes.append(f"hidden_act={act!r}: vitasks' MLP uses exact GELU here, so outputs will differ")
    layer_scale = "blocks.0.ls1.gamma" in backbone
    mean_pool = "fc_norm.weight" in backbone or (not segmentation and "norm.weight" not in backbone)
    hint: Dict[str, Any] = dict(
        img_size=img[0] if img[0] == img[1] else list(img),
        patch_size=patch,
        in_channels=int(in_channels),
        embed_dim=int(embed_dim),
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=_num(backbone["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim),
        qkv_bias="blocks.0.attn.qkv.bias" in backbone,
        layer_scale_init_value=float(_config_value(cfg, "layer_scale_init_value", 0.1)) if layer_scale else None,
        norm_eps=float(_config_value(cfg, "layer_norm_eps", HF_DEFAULT_EPS)),
        mlp_act="gelu",
        class_token=True,
        pool="mean" if mean_pool else "token",
        fc_norm=mean_pool and "fc_norm.weight" in backbone,
        final_norm="fc_norm.weight" in backbone or "norm.weight" in backbone,
        use_rel_pos_bias=per_block,
        use_shared_rel_pos_bias=shared and not per_block,
        stem=dict(type="PatchEmbed"),
    )
    if shared and per_block:
        raise CheckpointError(f"{path}: both a shared and per-layer relative position tables")
    hints: Dict[str, Any] = {}
    if segmentation:
        hf_out = cfg.get("out_indices") or cfg.get("_out_indices") or cfg.get("segmentation_indices")
        if not hf_out:
            hf_out = [3, 5, 7, 11] if depth == 12 else [depth // 4 * k - 1 for k in (2, 3, 4)]
            notes.append(f"no out_indices in config.json: transformers' {hf_out} assumed")
        hf_out = [int(i) for i in hf_out]
        if len(hf_out) != 4 or min(hf_out) < 2 or max(hf_out) > depth + 1:
            raise CheckpointError(
                f"{path}: out_indices {hf_out} cannot be reproduced: transformers reads hidden_states[i - 1] "
                f"(the output of block i - 2), so each i must be in 2..{depth + 1}"
            )
        hint["out_indices"] = [i - 2 for i in hf_out]
        hint["final_norm"] = False
        hint["pool"] = "token"
        hint["fc_norm"] = False
        for k in [k for k in backbone if k.startswith(("norm.", "fc_norm."))]:
            backbone.pop(k)
        notes.append(
            f"out_indices {hint['out_indices']}: transformers' out_indices {hf_out} read hidden_states[i - 1], "
            f"the outputs of blocks {hint['out_indices']} (0-based); BEiT's own code reads blocks {hf_out} "
            "(set model.backbone.out_indices to that for the blocks the original weights were trained with)"
        )
        channels = int(rest["decode_head.conv_seg.weight"].shape[1])
        num_classes = int(rest["decode_head.conv_seg.weight"].shape[0])
        pool_scales = sorted(int(m.group(1)) for k in rest for m in [re.match(r"decode_head\.psp\.stages\.(\d+)\.1\.conv\.weight$", k)] if m)
        scales = [int(s) for s in _config_value(cfg, "pool_scales", [1, 2, 3, 6])]
        if len(scales) != len(pool_scales):
            raise CheckpointError(f"{path}: {len(pool_scales)} pyramid pooling stages but pool_scales {scales}")
        hints["neck"] = dict(type="Feature2Pyramid", embed_dim=int(embed_dim), rescales=[4, 2, 1, 0.5])
        hints["decode_head"] = dict(
            type="UPerHead", in_channels=[int(embed_dim)] * 4, in_index=[0, 1, 2, 3], pool_scales=scales,
            channels=channels, dropout_ratio=0.1, num_classes=num_classes, align_corners=False,
        )
        if "auxiliary_head.conv_seg.weight" in rest:
            num_convs = len({k.split(".")[2] for k in rest if k.startswith("auxiliary_head.convs.")})
            aux_channels = int(rest["auxiliary_head.conv_seg.weight"].shape[1])
            hints["auxiliary_head"] = dict(
                type="FCNHead", in_channels=int(embed_dim), in_index=2, channels=aux_channels,
                num_convs=num_convs, concat_input="auxiliary_head.conv_cat.conv.weight" in rest,
                dropout_ratio=0.1, num_classes=num_classes, align_corners=False,
                loss_decode=dict(type="CrossEntropyLoss", loss_weight=float(_config_value(cfg, "auxiliary_loss_weight", 0.4))),
            )
    elif "head.fc.weight" in rest:
        hints["head"] = dict(type="LinearClsHead", num_classes=int(rest["head.fc.weight"].shape[0]), in_channels=int(embed_dim))
    state = {"backbone." + k: v for k, v in backbone.items()}
    state.update(rest)
    return BeitSource(
        fmt="hf", path=path, state_dict=state, norm_eps=hint["norm_eps"], num_heads=num_heads,
        input_norm=_input_norm(folder), notes=notes, model=model, backbone=hint, hints=hints,
        segmentation=segmentation,
    )


def _input_norm(folder: str) -> Dict[str, List[float]]:
    """The processor's normalisation in 0-255 units; BEiT's (0.5, 0.5) when none is given."""
    from vitasks.convert.hf import _read_config

    pre = _read_config(os.path.join(folder, "preprocessor_config.json")) if folder else {}
    mean, std = pre.get("image_mean", [0.5] * 3), pre.get("image_std", [0.5] * 3)
    return dict(mean=[round(float(m) * 255, 4) for m in mean], std=[round(float(s) * 255, 4) for s in std])


def _to_vitasks(src: BeitSource, opts: ConvertOptions) -> Tuple[StateDict, Dict[str, Any]]:
    for name in ("drop_final_norm", "pool", "keep_pre_logits"):
        if getattr(opts, name):
            raise CheckpointError(f"{name} does not apply to a {src.model} checkpoint")
    from vitasks.engine.architecture import architecture_from_config
    from vitasks.models.layers.pos_embed import resample_abs_pos_embed
    from vitasks.models.layers.rel_pos_bias import resize_rel_pos_bias_table

    hint = dict(src.backbone)
    hints = {k: dict(v) for k, v in src.hints.items()}
    notes = list(src.notes)
    sd = dict(src.state_dict)
    patch = hint["patch_size"]
    source_img = list(_pair(hint["img_size"], "img_size"))
    if opts.img_size is not None:
        img = _pair(opts.img_size, "img_size")
        if img[0] % patch or img[1] % patch:
            raise CheckpointError(f"img_size {img} must be divisible by the patch size {patch}")
        old, new = (source_img[0] // patch, source_img[1] // patch), (img[0] // patch, img[1] // patch)
        if old != new:
            sd["backbone.pos_embed"] = resample_abs_pos_embed(sd["backbone.pos_embed"], new, old, 1, mode="bicubic")
            for k in [k for k in sd if k.endswith("rel_pos_bias.table")]:
                sd[k] = resize_rel_pos_bias_table(sd[k], new, old)
            notes.append(f"position embeddings and relative position tables resampled from {old[0]}x{old[1]} to "
                         f"{new[0]}x{new[1]} patches, as the backbone would on loading")
        hint["img_size"] = img[0] if img[0] == img[1] else list(img)
    classifier_keys = ("decode_head.conv_seg.", "auxiliary_head.conv_seg.", "head.fc.")
    src_classes = next((int(v.shape[0]) for k, v in sd.items() if k.startswith(classifier_keys)), None)
    if src_classes is not None and (opts.drop_head or (opts.num_classes is not None and opts.num_classes != src_classes)):
        for k in [k for k in sd if k.startswith(classifier_keys)]:
            sd.pop(k)
        notes.append("classifier(s) dropped" + (" (drop_head)" if opts.drop_head else
                     f": {src_classes} classes in the checkpoint, {opts.num_classes} wanted"))
        for h in hints.values():
            if "num_classes" in h and opts.num_classes is not None:
                h["num_classes"] = opts.num_classes
    out = {k: _compact(v) for k, v in sd.items()}
    meta = dict(
        converted_from="hf",
        source=os.path.abspath(src.path),
        source_model=src.model,
        task_model="EncoderDecoder" if src.segmentation else "ImageClassifier",
        config_hint=hint,
        architecture=architecture_from_config(hint),
        head_hint=hints.get("head"),
        neck_hint=hints.get("neck"),
        decode_head_hint=hints.get("decode_head"),
        auxiliary_head_hint=hints.get("auxiliary_head"),
        data_preprocessor_hint=src.input_norm,
        source_img_size=source_img,
        notes=notes,
    )
    return out, meta


def describe_beit(meta: Dict[str, Any]) -> str:
    """What was converted and the model section of a config that reproduces it."""
    import yaml

    h = meta["config_hint"]
    model: Dict[str, Any] = {"type": meta["task_model"]}
    if meta.get("data_preprocessor_hint"):
        model["data_preprocessor"] = meta["data_preprocessor_hint"]
    model["backbone"] = {"type": "VisionTransformer", **h}
    for part in ("neck", "decode_head", "auxiliary_head", "head"):
        if meta.get(part + "_hint"):
            model[part] = meta[part + "_hint"]
    lines = [
        f"converted {meta['source_model']} checkpoint {meta['source']}",
        f"  architecture: VisionTransformer embed_dim={h['embed_dim']} depth={h['depth']} num_heads={h['num_heads']} "
        f"patch_size={h['patch_size']} img_size={h['img_size']} relative position bias: "
        + ("per block" if h.get("use_rel_pos_bias") else "shared" if h.get("use_shared_rel_pos_bias") else "none"),
        "  matching config: configs/seg_ade20k_beit.yaml" if meta["task_model"] == "EncoderDecoder" else
        "  matching config: none shipped",
        "  set these in the config (norm_eps, out_indices and the relative position bias matter for exact outputs):",
    ]
    lines += ["    " + line for line in yaml.safe_dump({"model": model}, sort_keys=False, default_flow_style=None).rstrip().splitlines()]
    lines += [f"  note: {n}" for n in meta.get("notes", [])]
    return "\n".join(lines)
