"""The ViTDet model both detection converters (detectron2, mmdetection) fill: the backbone read
from its weights, and the Mask R-CNN / Cascade Mask R-CNN config around it.

The backbone's architecture comes from the shapes alone: width and patch from the patch
embedding, depth from the block indices, the head count from the relative-position tables
(their second dimension is the head width), the window size and the global blocks from the
tables' lengths (a window block's table has 2 * window - 1 rows, a global block's 2 * grid - 1
for the training grid, which gives the input size), the pre-training position grid from
``pos_embed`` (ViTDet keeps MAE's 14 x 14 grid, with the class token's entry, and resamples it
to the input's grid on every forward pass).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

from vitasks.convert.common import NUM_HEADS_BY_WIDTH
from vitasks.convert.dense import COCO_CATEGORY_IDS, COCO_CLASSES, DenseSource, KeyTaker, class_permutation, permute_rows
from vitasks.errors import CheckpointError

BLOCK_PARTS = (
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "attn.rel_pos_h", "attn.rel_pos_w", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
    "mlp.fc2.weight", "mlp.fc2.bias",
)
#: Input size when the weights do not say (no relative-position tables): ViTDet's.
DEFAULT_IMG_SIZE = 1024


def vitdet_backbone(t: KeyTaker, prefix: str, norm_eps: float, notes: List[str]) -> Dict[str, Any]:
    """Move the plain-ViT weights under ``prefix`` (``patch_embed.proj``, ``pos_embed``,
    ``blocks.{i}.*`` in timm/detectron2 names) to ``backbone.*`` and return the
    ``VisionTransformer`` config that holds them."""
    proj = t.get(prefix + "patch_embed.proj.weight")
    if proj.ndim != 4 or proj.shape[-1] != proj.shape[-2]:
        raise CheckpointError(f"{t.source}: {prefix}patch_embed.proj.weight has shape {tuple(proj.shape)}, expected (C, 3, p, p)")
    embed_dim, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    t.move(prefix + "patch_embed.proj.weight", "backbone.stem.proj.weight")
    t.move(prefix + "patch_embed.proj.bias", "backbone.stem.proj.bias")

    depth_ids = t.indices(prefix + "blocks.")
    if not depth_ids or depth_ids != list(range(len(depth_ids))):
        raise CheckpointError(f"{t.source}: expected blocks {prefix}blocks.0 .. N-1, found indices {depth_ids[:10]}")
    depth = len(depth_ids)
    use_rel_pos = t.has(prefix + "blocks.0.attn.rel_pos_h")
    window_size, global_indices, img_size = 0, [], DEFAULT_IMG_SIZE
    if use_rel_pos:
        head_dim = t.shape(prefix + "blocks.0.attn.rel_pos_h")[1]
        if embed_dim % head_dim:
            raise CheckpointError(f"{t.source}: relative-position tables of width {head_dim} do not divide the width {embed_dim}")
        num_heads = embed_dim // head_dim
        sides = []
        for i in depth_ids:
            lh, lw = t.shape(f"{prefix}blocks.{i}.attn.rel_pos_h")[0], t.shape(f"{prefix}blocks.{i}.attn.rel_pos_w")[0]
            if lh != lw or lh % 2 == 0:
                raise CheckpointError(
                    f"{t.source}: block {i}'s relative-position tables have {lh} and {lw} rows; expected one odd "
                    "length 2 * side - 1 (square windows and grids)"
                )
            sides.append((lh + 1) // 2)
        grid, smallest = max(sides), min(sides)
        if set(sides) - {grid, smallest}:
            raise CheckpointError(f"{t.source}: blocks with more than two table sizes {sorted(set(sides))}")
        img_size = grid * patch
        if smallest < grid:
            window_size = smallest
            global_indices = [i for i, s in zip(depth_ids, sides) if s == grid]
    else:
        num_heads = NUM_HEADS_BY_WIDTH.get(embed_dim, max(embed_dim // 64, 1))
        notes.append(f"no relative-position tables: num_heads={num_heads} assumed from the width, global attention")
    mlp_hidden = t.shape(prefix + "blocks.0.mlp.fc1.weight")[0]
    qkv_bias = t.has(prefix + "blocks.0.attn.qkv.bias")
    for i in depth_ids:
        for part in BLOCK_PARTS:
            key = f"{prefix}blocks.{i}.{part}"
            if t.has(key):
                t.move(key, f"backbone.blocks.{i}.{part}")

    pos = t.take(prefix + "pos_embed")
    n = pos.shape[1]
    has_cls = math.isqrt(n) ** 2 != n
    side = math.isqrt(n - has_cls)
    if pos.ndim != 3 or side * side != n - has_cls or pos.shape[2] != embed_dim:
        raise CheckpointError(f"{t.source}: {prefix}pos_embed has shape {tuple(pos.shape)}; expected (1, [1 +] S*S, {embed_dim})")
    t.out["backbone.pos_embed"] = pos[:, int(has_cls):].clone()
    t.taken[prefix + "pos_embed"] = "backbone.pos_embed"
    if has_cls:
        notes.append("pos_embed: the class token's entry dropped (detectron2 never uses it)")
    pretrain_img_size = side * patch if side * patch != img_size else None
    return dict(
        type="VisionTransformer",
        img_size=img_size,
        patch_size=patch,
        in_channels=in_channels,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_hidden / embed_dim if mlp_hidden % embed_dim else mlp_hidden // embed_dim,
        qkv_bias=qkv_bias,
        norm_eps=norm_eps,
        mlp_act="gelu",
        class_token=False,
        pool="none",
        final_norm=False,
        out_indices=[depth - 1],
        window_size=window_size,
        global_indices=global_indices,
        use_rel_pos=use_rel_pos,
        # the stored grid (MAE's 14 x 14), resampled to the input's grid in every forward pass
        # exactly as detectron2's get_abs_pos does
        **({"pretrain_img_size": pretrain_img_size} if pretrain_img_size else {}),
        stem=dict(type="PatchEmbed"),
    )


def apply_class_order(
    t: KeyTaker,
    num_classes: int,
    source_cat_ids: Optional[Sequence[int]],
    class_names: Optional[Sequence[str]],
    per_class_keys: Sequence[tuple],
    notes: List[str],
) -> Dict[str, Any]:
    """Reorder the per-class rows of the converted weights from the source's class order to
    vitasks' (sorted category ids, as :class:`~vitasks.data.coco.CocoDataset` numbers them)
    and return the dataset meta. ``per_class_keys``: ``(vitasks key, group, extra)``."""
    if source_cat_ids is None:
        not_coco = class_names is not None and set(class_names) != set(COCO_CLASSES)
        if num_classes != len(COCO_CATEGORY_IDS) or not_coco:
            notes.append(f"{num_classes} classes, not COCO's: class order kept as it is")
            return dict(classes=list(class_names) if class_names else None)
        source_cat_ids = COCO_CATEGORY_IDS
        class_names = class_names or COCO_CLASSES
    if len(source_cat_ids) != num_classes:
        raise CheckpointError(f"{t.source}: {len(source_cat_ids)} category ids for {num_classes} classes")
    target = sorted(source_cat_ids)
    perm = class_permutation(source_cat_ids, target, t.source)
    for key, group, extra in per_class_keys:
        if key in t.out:
            t.out[key] = permute_rows(t.out[key], perm, group, extra)
    names = [class_names[p] for p in perm] if class_names else None
    if perm != list(range(num_classes)):
        notes.append("classes reordered to sorted category ids (vitasks' CocoDataset label order)")
    return dict(classes=names, cat_ids=list(target))


def vitdet_model(
    backbone: Dict[str, Any],
    neck: Dict[str, Any],
    rpn: Dict[str, Any],
    box_head: Dict[str, Any],
    mask_head: Optional[Dict[str, Any]],
    num_classes: int,
    num_stages: int,
) -> Dict[str, Any]:
    """The vitasks Mask R-CNN (``num_stages`` 0) or Cascade Mask R-CNN config of ViTDet around
    the converted parts (detectron2's projects/ViTDet settings, as ``configs/det_coco*.yaml``)."""
    img = backbone["img_size"]
    roi = dict(
        num_classes=num_classes,
        in_channels=neck["out_channels"],
        strides=[4, 8, 16, 32],
        box_pooled_size=7,
        mask_pooled_size=14,
        sampling_ratio=0,
        box_head=dict(type="ConvFCBoxHead", **box_head),
        mask_head=dict(type="MaskConvUpsampleHead", **mask_head) if mask_head is not None else None,
    )
    if num_stages:
        roi.update(
            type="CascadeRoIHead",
            stage_iou_thresholds=[0.5, 0.6, 0.7][:num_stages],
            stage_box_coder_weights=[[10.0, 10.0, 5.0, 5.0], [20.0, 20.0, 10.0, 10.0], [30.0, 30.0, 15.0, 15.0]][:num_stages],
        )
    else:
        roi.update(type="StandardRoIHead", box_coder_weights=[10.0, 10.0, 5.0, 5.0], iou_threshold=0.5)
    return dict(
        type="CascadeMaskRCNN" if num_stages else "MaskRCNN",
        data_preprocessor=dict(
            type="DetDataPreprocessor",
            mean=[123.675, 116.28, 103.53],
            std=[58.395, 57.12, 57.375],
            size=[img, img],
        ),
        backbone=backbone,
        neck=dict(type="SimpleFeaturePyramid", **neck),
        rpn_head=dict(
            type="RPNHead",
            anchor_sizes=[32, 64, 128, 256, 512],
            aspect_ratios=[0.5, 1.0, 2.0],
            strides=[4, 8, 16, 32, 64],
            anchor_offset=0.0,
            **rpn,
        ),
        roi_head=roi,
    )


def vitdet_source(fmt: str, t: KeyTaker, backbone: Dict[str, Any], neck: Dict[str, Any], rpn: Dict[str, Any],
                  box: Dict[str, Any], mask: Optional[Dict[str, Any]], num_classes: int, stages: Sequence[int],
                  cat_ids: Optional[Sequence[int]], class_names: Optional[Sequence[str]], published: str,
                  notes: List[str]) -> DenseSource:
    """The converted ViTDet (``t.out``) as a :class:`DenseSource`: its per-class rows put in
    vitasks' class order (:func:`apply_class_order`), in the Mask R-CNN (Cascade with ``stages``)
    of :func:`vitdet_model`."""
    dsts = [f"roi_head.box_heads.{s}" for s in stages] or ["roi_head.box_head"]
    per_class = [(f"{d}.cls_score.{p}", 1, 1) for d in dsts for p in ("weight", "bias")]
    if not box["class_agnostic"]:
        per_class += [(f"{d}.bbox_pred.{p}", 4, 0) for d in dsts for p in ("weight", "bias")]
    if mask is not None and not mask["class_agnostic"]:
        per_class += [(f"roi_head.mask_head.predictor.{p}", 1, 0) for p in ("weight", "bias")]
    dataset_meta = apply_class_order(t, num_classes, cat_ids, class_names, per_class, notes)
    return DenseSource(
        fmt=fmt,
        path=t.source,
        state_dict=t.out,
        model=vitdet_model(backbone, neck, rpn, box, mask, num_classes, len(stages)),
        config="configs/det_coco_cascade.yaml" if stages else "configs/det_coco.yaml",
        key_map=dict(t.taken),
        dataset_meta=dataset_meta,
        published=published,
        notes=notes,
    )
