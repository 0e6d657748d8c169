"""mmsegmentation's ViT UperNet segmentors (ViT-B + MLN, MAE, BEiT on ADE20K) -> vitasks
``EncoderDecoder``.

The released ``.pth`` (``{"meta": ..., "state_dict": ...}``) is read with
``torch.load(weights_only=True)``. Three backbones (told apart by their keys):

- ``VisionTransformer`` (``configs/vit``): ``layers.{i}.attn.attn.in_proj_weight`` (mmcv's
  ``MultiheadAttention`` around ``nn.MultiheadAttention``: q, k, v stacked as timm's fused
  ``qkv``), ``out_proj``, ``ffn.layers.0.0`` / ``ffn.layers.1``, an optional final ``ln1``;
  neck ``MultiLevelNeck``.
- ``MAE`` (``configs/mae``): BEiT's layers with a full ``qkv`` bias, LayerScale
  (``gamma_1/2``), absolute position embeddings *and* a relative position bias table per block
  (mmseg's MAE builds BEiT's attention, its tables start at zero and are fine-tuned);
  neck ``Feature2Pyramid``.
- ``BEiT`` (``configs/beit``): query and value biases only (``q_bias``, ``v_bias``: the fused
  ``qkv`` bias gets a zero key part, which softmax ignores), LayerScale, a relative position bias
  table per block and no absolute position embedding (vitasks' ``pos_embed`` is written as
  zeros); neck ``Feature2Pyramid``.

Names (mmseg -> vitasks): ``backbone.patch_embed.projection`` -> ``backbone.stem.proj``;
``backbone.layers.{i}.{ln1,ln2}`` -> ``backbone.blocks.{i}.{norm1,norm2}``;
``attn.relative_position_bias_table`` -> ``attn.rel_pos_bias.table`` (the same row layout: BEiT's
index, checked against the checkpoint's ``relative_position_index`` buffer, which is then
dropped); ``gamma_1/2`` -> ``ls1/ls2.gamma``; ``ffn.layers.0.0`` / ``ffn.layers.1`` ->
``mlp.fc1`` / ``mlp.fc2``; ``backbone.ln1`` -> ``backbone.norm``; ``neck.upsample_4x.{0,1,3}``,
``neck.upsample_2x.0`` -> ``neck.ops.0.{0,1,3}``, ``neck.ops.1``;
``neck.{lateral_convs,convs}.{i}.conv`` -> ``neck.{lateral_convs,convs}.{i}``;
``decode_head.psp_modules.{j}.1`` -> ``decode_head.psp.stages.{j}.1``; the other UperNet and FCN
``ConvModule`` names (``conv``, ``bn``) are vitasks'.

Which blocks feed the neck (``out_indices``) and the auxiliary head's input level are not in
the weights: they are read from the config text mmseg stores in ``meta["config"]`` when present,
else the family's released values ((2, 5, 8, 11) and 3 for ViT; (3, 5, 7, 11) and 2 for MAE and
BEiT). ADE20K's classes keep mmseg's order (label value - 1), which is vitasks' ADE20K order.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

import torch

from vitasks.convert.dense import DenseSource, KeyTaker, read_openmmlab_file
from vitasks.errors import CheckpointError

IMAGENET_MEAN = [123.675, 116.28, 103.53]
IMAGENET_STD = [58.395, 57.12, 57.375]
PUBLISHED = {
    "vit": "ADE20K val mIoU 46.75 (160k; 47.71 at 80k; 47.73 with the final LN: ln_mln), single scale "
           "(mmseg configs/vit/metafile.yaml)",
    "mae": "ADE20K val mIoU 48.13 single scale, 48.7 ms+flip (mmseg configs/mae/metafile.yaml)",
    "beit": "ADE20K val mIoU 53.08 single scale, 53.84 ms+flip (mmseg configs/beit/metafile.yaml)",
}
CONFIGS = {"vit": "configs/seg_ade20k.yaml", "mae": "configs/seg_ade20k.yaml", "beit": "configs/seg_ade20k_beit.yaml"}
DEFAULT_OUT = {"vit": ([2, 5, 8, 11], 3), "mae": ([3, 5, 7, 11], 2), "beit": ([3, 5, 7, 11], 2)}
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def read_file(path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(state_dict, meta)`` of an mmsegmentation checkpoint, read with weights_only."""
    return read_openmmlab_file(path, "mmsegmentation")


def _ints(text: str) -> List[int]:
    return [int(x) for x in re.findall(r"-?\d+", text)]


def recorded_settings(config_text: Optional[str]) -> Dict[str, Any]:
    """``out_indices``, ``num_heads``, the backbone's LayerNorm ``eps`` and the auxiliary head's
    ``in_index`` from the config text mmseg stores in a checkpoint's meta (what it finds)."""
    found: Dict[str, Any] = {}
    if not isinstance(config_text, str):
        return found
    backbone = config_text.split("backbone=dict(", 1)[-1] if "backbone=dict(" in config_text else ""
    m = re.search(r"out_indices=[\(\[]([\d,\s]+)[\)\]]", backbone)
    if m:
        found["out_indices"] = _ints(m.group(1))
    m = re.search(r"\bnum_heads=(\d+)", backbone.split("neck=dict(", 1)[0])
    if m:
        found["num_heads"] = int(m.group(1))
    m = re.search(r"norm_cfg=dict\(type='LN',\s*eps=([0-9.eE+-]+)\)", backbone.split("neck=dict(", 1)[0])
    if m:
        found["norm_eps"] = float(m.group(1))
    if "auxiliary_head=dict(" in config_text:
        m = re.search(r"in_index=(-?\d+)", config_text.split("auxiliary_head=dict(", 1)[1])
        if m:
            found["aux_in_index"] = int(m.group(1))
    return found


def _family(t: KeyTaker) -> str:
    if t.has("backbone.layers.0.attn.attn.in_proj_weight"):
        return "vit"
    if t.has("backbone.layers.0.attn.qkv.weight"):
        return "beit" if t.has("backbone.layers.0.attn.q_bias") else "mae"
    raise CheckpointError(
        f"{t.source}: not an mmseg ViT, MAE or BEiT backbone (no backbone.layers.0.attn.attn.in_proj_weight "
        "or backbone.layers.0.attn.qkv.weight)"
    )


def _backbone(t: KeyTaker, family: str, notes: List[str]) -> Dict[str, Any]:
    p = "backbone."
    proj = t.get(p + "patch_embed.projection.weight")
    embed_dim, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    t.move(p + "patch_embed.projection.weight", "backbone.stem.proj.weight")
    t.move(p + "patch_embed.projection.bias", "backbone.stem.proj.bias")
    depth_ids = t.indices(p + "layers.")
    if depth_ids != list(range(len(depth_ids))) or not depth_ids:
        raise CheckpointError(f"{t.source}: expected backbone.layers.0 .. N-1, found {depth_ids[:10]}")
    mlp_hidden = t.shape(p + "layers.0.ffn.layers.0.0.weight")[0]
    t.move(p + "cls_token", "backbone.cls_token")
    use_rel_pos_bias = family in ("mae", "beit")
    grid = None
    num_heads = None
    for i in depth_ids:
        src, dst = f"{p}layers.{i}.", f"backbone.blocks.{i}."
        t.move_prefix(src + "ln1.", dst + "norm1.", ("weight", "bias"))
        t.move_prefix(src + "ln2.", dst + "norm2.", ("weight", "bias"))
        t.move_prefix(src + "ffn.layers.0.0.", dst + "mlp.fc1.", ("weight", "bias"))
        t.move_prefix(src + "ffn.layers.1.", dst + "mlp.fc2.", ("weight", "bias"))
        if family == "vit":
            t.move(src + "attn.attn.in_proj_weight", dst + "attn.qkv.weight")
            t.move(src + "attn.attn.in_proj_bias", dst + "attn.qkv.bias")
            t.move_prefix(src + "attn.attn.out_proj.", dst + "attn.proj.", ("weight", "bias"))
            continue
        t.move(src + "attn.qkv.weight", dst + "attn.qkv.weight")
        if family == "beit":  # q and v biases, no k bias: the fused bias with a zero key part
            q, v = t.take(src + "attn.q_bias"), t.take(src + "attn.v_bias")
            t.out[dst + "attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
            t.taken[src + "attn.q_bias"] = t.taken[src + "attn.v_bias"] = dst + "attn.qkv.bias"
        else:
            t.move(src + "attn.qkv.bias", dst + "attn.qkv.bias")
        t.move_prefix(src + "attn.proj.", dst + "attn.proj.", ("weight", "bias"))
        t.move(src + "gamma_1", dst + "ls1.gamma")
        t.move(src + "gamma_2", dst + "ls2.gamma")
        table = t.take(src + "attn.relative_position_bias_table", dst + "attn.rel_pos_bias.table")
        side = (round((table.shape[0] - 3) ** 0.5) + 1) // 2
        if (2 * side - 1) ** 2 + 3 != table.shape[0]:
            raise CheckpointError(f"{t.source}: {src}attn.relative_position_bias_table has {table.shape[0]} rows, not (2S-1)^2+3")
        if grid not in (None, side):
            raise CheckpointError(f"{t.source}: blocks with relative-position tables of different grids")
        grid, num_heads = side, table.shape[1]
        index_key = src + "attn.relative_position_index"
        if t.has(index_key):
            from vitasks.models.layers.rel_pos_bias import relative_position_index

            index = t.take(index_key)
            if not index.is_meta and not torch.equal(index.long(), relative_position_index((side, side), 1)):
                raise CheckpointError(f"{t.source}: {index_key} is not BEiT's index for a {side}x{side} grid")
    if family == "vit":
        num_heads = None
    img_size = None
    if t.has(p + "pos_embed"):
        pos = t.take(p + "pos_embed", "backbone.pos_embed")
        pos_side = round((pos.shape[1] - 1) ** 0.5)
        if pos_side**2 + 1 != pos.shape[1]:
            raise CheckpointError(f"{t.source}: backbone.pos_embed {tuple(pos.shape)} is not a class token + square grid")
        img_size = pos_side * patch
        if grid is not None and grid != pos_side:
            raise CheckpointError(f"{t.source}: position grid {pos_side} and relative-position grid {grid} differ")
    else:
        img_size = grid * patch
        t.out["backbone.pos_embed"] = torch.zeros(1, 1 + grid * grid, embed_dim, device=proj.device)
        notes.append("BEiT has no absolute position embedding: vitasks' pos_embed is written as zeros")
    final_norm = t.has(p + "ln1.weight")
    if final_norm:
        t.move_prefix(p + "ln1.", "backbone.norm.", ("weight", "bias"))
    if num_heads is None:
        from vitasks.convert.common import NUM_HEADS_BY_WIDTH

        num_heads = NUM_HEADS_BY_WIDTH.get(embed_dim, max(embed_dim // 64, 1))
        notes.append(f"num_heads={num_heads} from the width (mmseg's ViT-B/DeiT sizes)")
    hint = dict(
        type="VisionTransformer",
        img_size=img_size,
        patch_size=patch,
        in_channels=in_channels,
        embed_dim=embed_dim,
        depth=len(depth_ids),
        num_heads=num_heads,
        mlp_ratio=mlp_hidden // embed_dim if mlp_hidden % embed_dim == 0 else mlp_hidden / embed_dim,
        qkv_bias=True,
        norm_eps=1e-6,
        mlp_act="gelu",
        class_token=True,
        num_reg_tokens=0,
        final_norm=final_norm,
        # LayerScale's initial value of the recipe (mmseg: MAE 1.0, BEiT 0.1; only the presence
        # matters for these weights)
        layer_scale_init_value={"vit": None, "mae": 1.0, "beit": 0.1}[family],
        use_rel_pos_bias=use_rel_pos_bias,
        stem=dict(type="PatchEmbed"),
    )
    return hint


def _neck(t: KeyTaker, embed_dim: int) -> Dict[str, Any]:
    if t.indices("neck.lateral_convs."):
        lat = t.indices("neck.lateral_convs.")
        for i in lat:
            t.move_prefix(f"neck.lateral_convs.{i}.conv.", f"neck.lateral_convs.{i}.", ("weight", "bias"))
        out = t.indices("neck.convs.")
        for i in out:
            t.move_prefix(f"neck.convs.{i}.conv.", f"neck.convs.{i}.", ("weight", "bias"))
        in_channels = [t.out[f"neck.lateral_convs.{i}.weight"].shape[1] for i in lat]
        out_channels = t.out["neck.lateral_convs.0.weight"].shape[0]
        scales = [4, 2, 1, 0.5] if len(out) == 4 else None
        if scales is None:
            raise CheckpointError(f"{t.source}: MultiLevelNeck with {len(out)} levels; the scales are known for 4")
        return dict(type="MultiLevelNeck", in_channels=in_channels, out_channels=out_channels, scales=scales), [out_channels] * 4
    rescales = []
    if t.has("neck.upsample_4x.0.weight"):
        t.move_prefix("neck.upsample_4x.0.", f"neck.ops.{len(rescales)}.0.", ("weight", "bias"))
        t.move_prefix("neck.upsample_4x.1.", f"neck.ops.{len(rescales)}.1.", _BN)
        t.move_prefix("neck.upsample_4x.3.", f"neck.ops.{len(rescales)}.3.", ("weight", "bias"))
        rescales.append(4)
    if t.has("neck.upsample_2x.0.weight"):
        t.move_prefix("neck.upsample_2x.0.", f"neck.ops.{len(rescales)}.", ("weight", "bias"))
        rescales.append(2)
    if len(rescales) != 2:
        raise CheckpointError(f"{t.source}: expected mmseg's Feature2Pyramid (neck.upsample_4x, neck.upsample_2x) or MultiLevelNeck")
    return dict(type="Feature2Pyramid", embed_dim=embed_dim, rescales=[4, 2, 1, 0.5]), [embed_dim] * 4


def _conv_bn(t: KeyTaker, src: str, dst: str) -> Tuple[int, int]:
    w = t.take(f"{src}.conv.weight", f"{dst}.conv.weight")
    t.move_prefix(f"{src}.bn.", f"{dst}.bn.", _BN)
    return w.shape[0], w.shape[1]


def _heads(t: KeyTaker, neck_channels: List[int], aux_in_index: int) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
    d = "decode_head."
    pools = t.indices(d + "psp_modules.")
    channels = 0
    for j in pools:
        channels, _ = _conv_bn(t, f"{d}psp_modules.{j}.1", f"decode_head.psp.stages.{j}.1")
    _conv_bn(t, d + "bottleneck", "decode_head.bottleneck")
    laterals = t.indices(d + "lateral_convs.")
    in_channels = []
    for i in laterals:
        _, cin = _conv_bn(t, f"{d}lateral_convs.{i}", f"decode_head.lateral_convs.{i}")
        in_channels.append(cin)
    for i in t.indices(d + "fpn_convs."):
        _conv_bn(t, f"{d}fpn_convs.{i}", f"decode_head.fpn_convs.{i}")
    _conv_bn(t, d + "fpn_bottleneck", "decode_head.fpn_bottleneck")
    num_classes = t.take(d + "conv_seg.weight", "decode_head.conv_seg.weight").shape[0]
    t.move(d + "conv_seg.bias", "decode_head.conv_seg.bias")
    if len(pools) != 4:
        raise CheckpointError(f"{t.source}: UPerHead with {len(pools)} pooling scales; known for 4 (1, 2, 3, 6)")
    in_channels.append(t.out["decode_head.psp.stages.0.1.conv.weight"].shape[1])  # the last level's
    pool_scales = [1, 2, 3, 6]
    decode = dict(
        type="UPerHead", in_channels=in_channels, in_index=list(range(len(in_channels))), pool_scales=pool_scales,
        channels=channels, dropout_ratio=0.1, num_classes=num_classes, align_corners=False,
    )
    aux = None
    a = "auxiliary_head."
    if any(k.startswith(a) for k in t.sd):
        convs = t.indices(a + "convs.")
        aux_channels, aux_in = 0, neck_channels[aux_in_index]
        for i in convs:
            aux_channels, cin = _conv_bn(t, f"{a}convs.{i}", f"auxiliary_head.convs.{i}")
            if i == 0:
                aux_in = cin
        concat = t.has(a + "conv_cat.conv.weight")
        if concat:
            _conv_bn(t, a + "conv_cat", "auxiliary_head.conv_cat")
        t.move_prefix(a + "conv_seg.", "auxiliary_head.conv_seg.", ("weight", "bias"))
        aux = dict(
            type="FCNHead", in_channels=aux_in, in_index=aux_in_index, channels=aux_channels or aux_in,
            num_convs=len(convs), concat_input=concat, dropout_ratio=0.1, num_classes=num_classes, align_corners=False,
        )
    return decode, aux


def convert_state_dict(sd: Dict[str, Any], source: str, meta: Optional[Dict[str, Any]] = None) -> DenseSource:
    """mmseg ViT / MAE / BEiT UperNet weights -> :class:`DenseSource` (see the module docstring)."""
    meta = meta or {}
    t = KeyTaker(sd, source)
    notes: List[str] = []
    family = _family(t)
    recorded = recorded_settings(meta.get("config") or meta.get("cfg"))
    out_indices, aux_in_index = DEFAULT_OUT[family]
    out_indices = recorded.get("out_indices", out_indices)
    aux_in_index = recorded.get("aux_in_index", aux_in_index)
    backbone = _backbone(t, family, notes)
    depth = backbone["depth"]
    if "out_indices" not in recorded and depth != 12:  # the released defaults are for 12 blocks
        out_indices = [7, 11, 15, 23] if depth == 24 else [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1, depth - 1]
    if "norm_eps" in recorded:
        backbone["norm_eps"] = recorded["norm_eps"]
    if "num_heads" in recorded:
        if family != "vit" and recorded["num_heads"] != backbone["num_heads"]:
            raise CheckpointError(
                f"{source}: the stored config says num_heads={recorded['num_heads']}, the relative-position "
                f"tables have {backbone['num_heads']} heads"
            )
        backbone["num_heads"] = recorded["num_heads"]
        notes[:] = [n for n in notes if not n.startswith("num_heads=")]
    backbone["out_indices"] = list(out_indices)
    if "out_indices" not in recorded:
        notes.append(f"out_indices {list(out_indices)} and the auxiliary head's in_index {aux_in_index}: mmseg's "
                     f"released {family} configs (the file records no config)")
    neck, neck_channels = _neck(t, backbone["embed_dim"])
    decode, aux = _heads(t, neck_channels, aux_in_index)
    t.finish()
    img = backbone["img_size"]
    model = dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreprocessor", mean=IMAGENET_MEAN, std=IMAGENET_STD, size=[img, img]),
        backbone=backbone,
        neck=neck,
        decode_head=decode,
    )
    if aux is not None:
        model["auxiliary_head"] = aux
    names = (meta.get("dataset_meta") or {}).get("classes") if isinstance(meta.get("dataset_meta"), dict) else None
    names = names or meta.get("CLASSES")
    return DenseSource(
        fmt="mmseg",
        path=source,
        state_dict=t.out,
        model=model,
        config=CONFIGS[family],
        key_map=dict(t.taken),
        dataset_meta=dict(classes=list(names) if names else None, family=family),
        published=PUBLISHED[family] if decode["num_classes"] == 150 and backbone["depth"] == 12 else "",
        notes=notes,
    )


def read(path: str, opts: Any = None) -> DenseSource:
    sd, meta = read_file(path)
    return convert_state_dict(sd, path, meta)
