"""mmdetection's ViTDet (``projects/ViTDet``, ``vitdet_mask-rcnn_vit-b-mae_lsj-100e``) -> vitasks
Mask R-CNN (or Cascade Mask R-CNN with one mask head).

The released ``.pth`` (``{"meta": ..., "state_dict": ...}``) is read with
``torch.load(weights_only=True)``. mmdetection's ViTDet is detectron2's network in mmdet names:

=================================================  ===============================================
``backbone.patch_embed.proj``, ``backbone.pos_embed``, ``backbone.blocks.{i}.*`` (detectron2's ViT)
``neck.fpn1.{0,1,3}`` (deconv, LN2d, deconv)       ``neck.levels.0.rescale.{0,1,3}``
``neck.fpn2.0`` (deconv)                           ``neck.levels.1.rescale``
``neck.lateral_convs.{i}.{conv,<norm>}``           ``neck.levels.{i}.lateral.{conv,norm}``
``neck.fpn_convs.{i}.{conv,<norm>}``               ``neck.levels.{i}.output.{conv,norm}``
``rpn_head.rpn_conv.{k}.conv``                     ``rpn_head.convs.{2k}``
``rpn_head.rpn_cls`` / ``rpn_head.rpn_reg``        ``rpn_head.objectness`` / ``rpn_head.deltas``
``roi_head.bbox_head[.{s}].shared_convs.{k}``      ``roi_head.box_head[s].convs.{k}.{0,1}``
``roi_head.bbox_head[.{s}].shared_fcs.{k}``        ``roi_head.box_head[s].fcs.{2k}``
``roi_head.bbox_head[.{s}].fc_cls`` / ``fc_reg``   ``roi_head.box_head[s].cls_score`` / ``bbox_pred``
``roi_head.mask_head.convs.{k}.{conv,<norm>}``     ``roi_head.mask_head.convs.{k}.{0,1}``
``roi_head.mask_head.upsample`` / ``conv_logits``  ``roi_head.mask_head.deconv`` / ``predictor``
=================================================  ===============================================

``<norm>`` is the name mmcv's ``ConvModule`` gives the ``LN2d`` layer: ``build_norm_layer``
infers it from the class (``norm_layer`` for ``LN2d``; ``ln`` and ``norm`` are accepted too).

Differences the converted model takes over: the backbone's LayerNorms are ``dict(type='LN')``
without an epsilon in the released config, i.e. PyTorch's 1e-5 (detectron2: 1e-6), recorded as
``norm_eps: 1.0e-5``. The config mmengine stores in the file (``meta["cfg"]``), when there, is
checked against what the weights show (width, depth, heads, patch, window size and blocks; a
conflict is an error) and gives the LayerNorm eps. mmdet numbers the classes as ``meta.dataset_meta.classes`` lists them
(COCO's in category-id order) with the background logit last; the rows are mapped to COCO's
category ids by those names.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from vitasks.convert.dense import (
    COCO_CATEGORY_IDS,
    COCO_CLASSES,
    DenseSource,
    KeyTaker,
    config_int,
    config_ints,
    config_ln_eps,
    config_section,
    read_openmmlab_file,
)
from vitasks.convert.vitdet import vitdet_backbone, vitdet_source
from vitasks.errors import CheckpointError

PUBLISHED = "box AP 51.6, mask AP 45.7 (vitdet_mask-rcnn_vit-b-mae_lsj-100e_20230328_153519-e15fe294.pth)"
NORM_NAMES = ("norm_layer", "ln", "norm", "ln2d")
#: LayerNorm epsilon of the released config's backbone (``dict(type='LN')``: torch's default).
BACKBONE_NORM_EPS = 1e-5


def read_file(path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(state_dict, meta)`` of an mmdetection checkpoint, read with weights_only."""
    return read_openmmlab_file(path, "mmdetection")


def _norm_name(t: KeyTaker, module: str) -> Optional[str]:
    for name in NORM_NAMES:
        if t.has(f"{module}.{name}.weight"):
            return name
    return None


def _conv_module(t: KeyTaker, src: str, dst_conv: str, dst_norm: Optional[str]) -> bool:
    """An mmcv ``ConvModule`` (``conv`` + optional norm) -> vitasks keys; returns whether it
    had a norm."""
    t.move(f"{src}.conv.weight", f"{dst_conv}.weight")
    norm = _norm_name(t, src)
    if norm is not None and dst_norm is not None:
        t.move_prefix(f"{src}.{norm}.", f"{dst_norm}.", ("weight", "bias"))
        return True
    if t.has(f"{src}.conv.bias"):
        t.move(f"{src}.conv.bias", f"{dst_conv}.bias")
    return False


def _neck(t: KeyTaker, embed_dim: int, patch: int) -> Dict[str, Any]:
    levels = t.indices("neck.lateral_convs.")
    scales = []
    if levels != [0, 1, 2, 3] or t.indices("neck.fpn_convs.") != levels:
        raise CheckpointError(f"{t.source}: expected mmdet's SimpleFPN with 4 lateral and 4 output convs, found {levels}")
    for j, scale in enumerate((4.0, 2.0, 1.0, 0.5)):  # fpn1 .. fpn4
        dst = f"neck.levels.{j}"
        if scale == 4.0:
            for a, b in (("0", "rescale.0"), ("1", "rescale.1"), ("3", "rescale.3")):
                t.move_prefix(f"neck.fpn1.{a}.", f"{dst}.{b}.", ("weight", "bias"))
        elif scale == 2.0:
            t.move_prefix("neck.fpn2.0.", f"{dst}.rescale.", ("weight", "bias"))
        for src, name in ((f"neck.lateral_convs.{j}", "lateral"), (f"neck.fpn_convs.{j}", "output")):
            if not _conv_module(t, src, f"{dst}.{name}.conv", f"{dst}.{name}.norm"):
                raise CheckpointError(f"{t.source}: {src} has no LN2d; vitasks' pyramid convs are conv + LN")
        scales.append(scale)
    out_channels = t.out["neck.levels.0.lateral.conv.weight"].shape[0]
    return dict(in_channels=embed_dim, out_channels=out_channels, scale_factors=scales, input_stride=patch,
                top_block=True, norm_eps=1e-6)


def _rpn(t: KeyTaker) -> Dict[str, Any]:
    if t.has("rpn_head.rpn_conv.weight"):  # num_convs=1: a plain Conv2d
        t.move_prefix("rpn_head.rpn_conv.", "rpn_head.convs.0.", ("weight", "bias"))
        num = 1
    else:
        idx = t.indices("rpn_head.rpn_conv.")
        for k in idx:
            t.move_prefix(f"rpn_head.rpn_conv.{k}.conv.", f"rpn_head.convs.{2 * k}.", ("weight", "bias"))
        num = len(idx)
    in_channels = t.shape("rpn_head.rpn_cls.weight")[1]
    if t.shape("rpn_head.rpn_cls.weight")[0] * 4 != t.shape("rpn_head.rpn_reg.weight")[0]:
        raise CheckpointError(f"{t.source}: rpn_cls is not sigmoid (one logit per anchor); vitasks' RPN is")
    t.move_prefix("rpn_head.rpn_cls.", "rpn_head.objectness.", ("weight", "bias"))
    t.move_prefix("rpn_head.rpn_reg.", "rpn_head.deltas.", ("weight", "bias"))
    return dict(in_channels=in_channels, num_convs=num)


def _box_head(t: KeyTaker, src: str, dst: str) -> Dict[str, Any]:
    convs = t.indices(f"{src}.shared_convs.")
    norm = None
    for k in convs:
        norm = "LN" if _conv_module(t, f"{src}.shared_convs.{k}", f"{dst}.convs.{k}.0", f"{dst}.convs.{k}.1") else None
    fcs = t.indices(f"{src}.shared_fcs.")
    for k in fcs:
        t.move_prefix(f"{src}.shared_fcs.{k}.", f"{dst}.fcs.{2 * k}.", ("weight", "bias"))
    for name in ("cls_convs", "cls_fcs", "reg_convs", "reg_fcs"):
        if t.indices(f"{src}.{name}."):
            raise CheckpointError(f"{t.source}: {src}.{name}: separate branches are not in vitasks' box head")
    cls_rows = t.shape(f"{src}.fc_cls.weight")[0]
    reg_rows = t.shape(f"{src}.fc_reg.weight")[0]
    t.move_prefix(f"{src}.fc_cls.", f"{dst}.cls_score.", ("weight", "bias"))
    t.move_prefix(f"{src}.fc_reg.", f"{dst}.bbox_pred.", ("weight", "bias"))
    return dict(
        num_convs=len(convs),
        conv_channels=t.out[f"{dst}.convs.0.0.weight"].shape[0] if convs else 256,
        num_fcs=len(fcs),
        fc_channels=t.out[f"{dst}.fcs.0.weight"].shape[0] if fcs else 1024,
        norm=norm,
        class_agnostic=reg_rows == 4,
        num_classes=cls_rows - 1,
    )


def _mask_head(t: KeyTaker) -> Optional[Dict[str, Any]]:
    p = "roi_head.mask_head."
    if not any(k.startswith(p) for k in t.sd):
        return None
    if t.indices(p) and not t.indices(p + "convs."):
        raise CheckpointError(
            f"{t.source}: one mask head per cascade stage (roi_head.mask_head.0 ...); vitasks' cascade has "
            "one mask head (detectron2's layout)"
        )
    convs = t.indices(p + "convs.")
    norm = None
    for k in convs:
        dst = f"roi_head.mask_head.convs.{k}"
        norm = "LN" if _conv_module(t, f"{p}convs.{k}", f"{dst}.0", f"{dst}.1") else None
    t.move_prefix(p + "upsample.", "roi_head.mask_head.deconv.", ("weight", "bias"))
    rows = t.shape(p + "conv_logits.weight")[0]
    t.move_prefix(p + "conv_logits.", "roi_head.mask_head.predictor.", ("weight", "bias"))
    return dict(num_convs=len(convs), conv_channels=t.out["roi_head.mask_head.deconv.weight"].shape[1], norm=norm,
                class_agnostic=rows == 1)


def _cat_ids_from_names(names: Optional[Sequence[str]], num_classes: int, source: str) -> Optional[List[int]]:
    """COCO category ids of mmdet's class names (its ``dataset_meta.classes``), or None."""
    if not names:
        return None
    names = [str(n) for n in names]
    if len(names) != num_classes:
        raise CheckpointError(f"{source}: meta lists {len(names)} classes, the box head has {num_classes}")
    by_name = dict(zip(COCO_CLASSES, COCO_CATEGORY_IDS))
    if all(n in by_name for n in names):
        return [by_name[n] for n in names]
    return None


def check_recorded_backbone(backbone: Dict[str, Any], config_text: Any, source: str, notes: List[str]) -> None:
    """Compare the backbone inferred from the weights with the config mmengine stored in the
    file (``meta["cfg"]``): a conflict is an error naming both values; the LayerNorm eps (and
    the head count when the weights cannot tell) are taken from it."""
    section = config_section(config_text, "backbone")
    if not section:
        return
    depth = backbone["depth"]
    recorded = {
        key: config_int(section, key) for key in ("embed_dim", "depth", "patch_size", "num_heads", "window_size")
    }
    if not backbone["use_rel_pos"] and recorded["num_heads"]:
        backbone["num_heads"] = recorded["num_heads"]
    windows = config_ints(section, "window_block_indexes")
    if windows is not None and recorded["window_size"]:
        recorded["global_indices"] = [i for i in range(depth) if i not in windows]
    recorded["norm_eps"] = config_ln_eps(section)
    conflicts = [
        f"{key}: weights {backbone[key]!r}, stored config {value!r}"
        for key, value in recorded.items()
        if value is not None and key in backbone and key != "norm_eps" and backbone[key] != value
        and not (key == "window_size" and not backbone["use_rel_pos"])
    ]
    if conflicts:
        raise CheckpointError(f"{source}: the weights do not match the config stored in the file: " + "; ".join(conflicts))
    if recorded["norm_eps"] is not None:
        backbone["norm_eps"] = recorded["norm_eps"]
    notes.append("architecture checked against the config stored in the file (meta.cfg)")


def convert_state_dict(sd: Dict[str, Any], source: str, meta: Optional[Dict[str, Any]] = None) -> DenseSource:
    """mmdet ViTDet weights -> :class:`DenseSource` (see the module docstring)."""
    meta = meta or {}
    t = KeyTaker(sd, source)
    notes: List[str] = []
    for key in [k for k in t.sd if k.startswith("data_preprocessor.")]:
        t.take(key)
    backbone = vitdet_backbone(t, "backbone.", norm_eps=BACKBONE_NORM_EPS, notes=notes)
    check_recorded_backbone(backbone, meta.get("cfg") or meta.get("config"), source, notes)
    notes.append(f"backbone LayerNorm eps {backbone['norm_eps']:g} (mmdet's dict(type='LN') default 1e-5; "
                 "detectron2 uses 1e-6)")
    neck = _neck(t, backbone["embed_dim"], backbone["patch_size"])
    rpn = _rpn(t)
    stages = [s for s in t.indices("roi_head.bbox_head.")]
    if stages:
        heads = [_box_head(t, f"roi_head.bbox_head.{s}", f"roi_head.box_heads.{s}") for s in stages]
    else:
        heads = [_box_head(t, "roi_head.bbox_head", "roi_head.box_head")]
    box = heads[0]
    if any(h != box for h in heads[1:]):
        raise CheckpointError(f"{source}: the cascade stages' box heads differ; vitasks builds them alike")
    num_classes = box.pop("num_classes")
    mask = _mask_head(t)
    t.finish()

    dataset = meta.get("dataset_meta") if isinstance(meta.get("dataset_meta"), dict) else {}
    names = dataset.get("classes") or meta.get("CLASSES")
    cat_ids = _cat_ids_from_names(names, num_classes, source)
    published = PUBLISHED if not stages and backbone["depth"] == 12 and num_classes == 80 else ""
    return vitdet_source("mmdet", t, backbone, neck, rpn, box, mask, num_classes, stages, cat_ids,
                         list(names) if names else None, published, notes)


def read(path: str, opts: Any = None) -> DenseSource:
    sd, meta = read_file(path)
    return convert_state_dict(sd, path, meta)
