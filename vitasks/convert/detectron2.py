"""detectron2's ViTDet (``projects/ViTDet``) -> vitasks Mask R-CNN / Cascade Mask R-CNN.

detectron2's model zoo ships ``model_final_*.pkl``: a pickle of
``{"model": {name: numpy array}, "__author__": "Detectron2 Model Zoo", ...}``. It is read with
:mod:`vitasks.convert.safe_pickle` (dicts, lists, strings, numbers and numpy arrays only;
anything else is refused, naming the file). A ``.pth`` written by detectron2's trainer
(``{"model": state dict, ...}``) is read with ``torch.load(weights_only=True)``.

Names (detectron2 -> vitasks):

======================================================  ==========================================
``backbone.net.patch_embed.proj``                       ``backbone.stem.proj``
``backbone.net.pos_embed`` (1, 1 + 14*14, C)            ``backbone.pos_embed`` (1, 14*14, C)
``backbone.net.blocks.{i}.*``                           ``backbone.blocks.{i}.*`` (same names)
``backbone.simfp_{2..5}.*`` (deconvs, LN, convs)        ``neck.levels.{0..3}.{rescale,lateral,output}``
``proposal_generator.rpn_head.conv.conv{k}``            ``rpn_head.convs.{2k}``
``proposal_generator.rpn_head.objectness_logits``       ``rpn_head.objectness``
``proposal_generator.rpn_head.anchor_deltas``           ``rpn_head.deltas``
``roi_heads.box_head[.{s}].conv{k}`` (+ ``.norm``)      ``roi_head.box_head[s].convs.{k-1}.{0,1}``
``roi_heads.box_head[.{s}].fc{k}``                      ``roi_head.box_head[s].fcs.{2(k-1)}``
``roi_heads.box_predictor[.{s}].{cls_score,bbox_pred}`` ``roi_head.box_head[s].{cls_score,bbox_pred}``
``roi_heads.mask_head.mask_fcn{k}`` (+ ``.norm``)       ``roi_head.mask_head.convs.{k-1}.{0,1}``
``roi_heads.mask_head.{deconv,predictor}``              ``roi_head.mask_head.{deconv,predictor}``
======================================================  ==========================================

(``box_head[s]`` is ``box_heads.{s}`` for the cascade.) Both number COCO's classes 0..79 in
category-id order with the background logit last, as vitasks does, so the class rows stay where
they are; the checkpoint records COCO's category ids and names. detectron2's ViT uses LayerNorm
eps 1e-6 everywhere.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

from vitasks.convert.dense import DenseSource, KeyTaker
from vitasks.convert.safe_pickle import load_plain_pickle
from vitasks.convert.vitdet import vitdet_backbone, vitdet_source
from vitasks.errors import CheckpointError

PUBLISHED = {
    # (depth, cascade) -> detectron2 projects/ViTDet README, COCO val2017 box / mask AP
    (12, False): "box AP 51.6, mask AP 45.9 (mask_rcnn_vitdet_b_100ep, model_final_61ccd1.pkl)",
    (24, False): "box AP 55.5, mask AP 49.2 (mask_rcnn_vitdet_l_100ep, model_final_6146ed.pkl)",
    (12, True): "box AP 54.0, mask AP 46.7 (cascade_mask_rcnn_vitdet_b_100ep, model_final_435fa9.pkl)",
    (24, True): "box AP 57.6, mask AP 50.0 (cascade_mask_rcnn_vitdet_l_100ep, model_final_1a9f28.pkl)",
}


def read_file(path: str) -> Dict[str, Any]:
    """The ``model`` state dict (name -> numpy array or tensor) of a detectron2 checkpoint."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.endswith(".pkl"):
        obj = load_plain_pickle(path)
    else:
        from vitasks.engine.checkpoint import load_checkpoint_file

        obj = load_checkpoint_file(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj["model"]
    if isinstance(obj, dict) and any(str(k).startswith("backbone.") for k in obj):
        return obj
    found = sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(f"{path}: expected detectron2's {{'model': {{name: array}}}}, found {found}")


def _conv_norm(t: KeyTaker, src: str, dst: str, conv: str = "0", norm: str = "1") -> bool:
    """A detectron2 ``Conv2d`` with optional ``norm`` -> vitasks ``(conv, LayerNorm2d)``;
    returns whether it had the norm."""
    t.move(f"{src}.weight", f"{dst}.{conv}.weight")
    if t.has(f"{src}.norm.weight"):
        t.move(f"{src}.norm.weight", f"{dst}.{norm}.weight")
        t.move(f"{src}.norm.bias", f"{dst}.{norm}.bias")
        return True
    if t.has(f"{src}.bias"):
        t.move(f"{src}.bias", f"{dst}.{conv}.bias")
    return False


def _neck(t: KeyTaker, patch: int) -> Dict[str, Any]:
    exponents = sorted(int(k.split(".")[1].split("_")[1]) for k in {
        ".".join(k.split(".")[:2]) for k in t.sd if k.startswith("backbone.simfp_")
    })
    if not exponents:
        raise CheckpointError(f"{t.source}: no simple feature pyramid (backbone.simfp_*) found")
    scales, out_channels = [], None
    for j, e in enumerate(exponents):
        scale = patch / 2**e
        src, dst = f"backbone.simfp_{e}", f"neck.levels.{j}"
        if scale == 4:
            for a, b in (("0", "rescale.0"), ("1", "rescale.1"), ("3", "rescale.3")):
                t.move_prefix(f"{src}.{a}.", f"{dst}.{b}.", ("weight", "bias"))
            first = 4
        elif scale == 2:
            t.move_prefix(f"{src}.0.", f"{dst}.rescale.", ("weight", "bias"))
            first = 1
        elif scale == 1:
            first = 0
        elif scale == 0.5:
            first = 1
        else:
            raise CheckpointError(f"{t.source}: pyramid level simfp_{e} has scale {scale}; vitasks has 4, 2, 1, 0.5")
        out_channels = t.shape(f"{src}.{first}.weight")[0]
        for k, name in ((first, "lateral"), (first + 1, "output")):
            if not _conv_norm(t, f"{src}.{k}", f"{dst}.{name}", "conv", "norm"):
                raise CheckpointError(f"{t.source}: {src}.{k} has no LayerNorm; vitasks' pyramid convs are conv + LN")
        scales.append(scale)
    return dict(in_channels=None, out_channels=out_channels, scale_factors=scales, input_stride=patch,
                top_block=True, norm_eps=1e-6)


def _rpn(t: KeyTaker) -> Dict[str, Any]:
    p = "proposal_generator.rpn_head."
    if t.has(p + "conv.weight"):
        convs = [p + "conv"]
    else:
        convs = [f"{p}conv.conv{k}" for k in _numbered(t, p + "conv.", "conv")]
    for k, src in enumerate(convs):
        t.move_prefix(src + ".", f"rpn_head.convs.{2 * k}.", ("weight", "bias"))
    in_channels = t.shape(p + "objectness_logits.weight")[1]
    t.move_prefix(p + "objectness_logits.", "rpn_head.objectness.", ("weight", "bias"))
    t.move_prefix(p + "anchor_deltas.", "rpn_head.deltas.", ("weight", "bias"))
    return dict(in_channels=in_channels, num_convs=len(convs))


def _numbered(t: KeyTaker, prefix: str, name: str) -> List[int]:
    """k of the keys ``{prefix}{name}{k}.*`` (detectron2's conv1, fc1, mask_fcn1 ...)."""
    out = set()
    for k in t.sd:
        if k.startswith(prefix + name):
            rest = k[len(prefix + name):].split(".", 1)[0]
            if rest.isdigit():
                out.add(int(rest))
    return sorted(out)


def _box_head(t: KeyTaker, head: str, predictor: str, dst: str) -> Dict[str, Any]:
    convs = _numbered(t, head + ".", "conv")
    fcs = _numbered(t, head + ".", "fc")
    norm = None
    for i, k in enumerate(convs):
        norm = "LN" if _conv_norm(t, f"{head}.conv{k}", f"{dst}.convs.{i}") else None
    for i, k in enumerate(fcs):
        t.move_prefix(f"{head}.fc{k}.", f"{dst}.fcs.{2 * i}.", ("weight", "bias"))
    cls_rows = t.shape(f"{predictor}.cls_score.weight")[0]
    reg_rows = t.shape(f"{predictor}.bbox_pred.weight")[0]
    t.move_prefix(f"{predictor}.cls_score.", f"{dst}.cls_score.", ("weight", "bias"))
    t.move_prefix(f"{predictor}.bbox_pred.", f"{dst}.bbox_pred.", ("weight", "bias"))
    conv_channels = t.out[f"{dst}.convs.0.0.weight"].shape[0] if convs else 256
    fc_channels = t.out[f"{dst}.fcs.0.weight"].shape[0] if fcs else 1024
    return dict(num_convs=len(convs), conv_channels=conv_channels, num_fcs=len(fcs), fc_channels=fc_channels,
                norm=norm, class_agnostic=reg_rows == 4, num_classes=cls_rows - 1)


def _mask_head(t: KeyTaker) -> Optional[Dict[str, Any]]:
    p = "roi_heads.mask_head."
    if not any(k.startswith(p) for k in t.sd):
        return None
    convs = _numbered(t, p, "mask_fcn")
    norm = None
    for i, k in enumerate(convs):
        norm = "LN" if _conv_norm(t, f"{p}mask_fcn{k}", f"roi_head.mask_head.convs.{i}") else None
    t.move_prefix(p + "deconv.", "roi_head.mask_head.deconv.", ("weight", "bias"))
    rows = t.shape(p + "predictor.weight")[0]
    t.move_prefix(p + "predictor.", "roi_head.mask_head.predictor.", ("weight", "bias"))
    channels = t.out["roi_head.mask_head.deconv.weight"].shape[1]
    return dict(num_convs=len(convs), conv_channels=channels, norm=norm, class_agnostic=rows == 1)


def convert_state_dict(
    sd: Dict[str, Any],
    source: str,
    source_cat_ids: Optional[Sequence[int]] = None,
    class_names: Optional[Sequence[str]] = None,
) -> DenseSource:
    """detectron2 ViTDet weights (name -> array) -> :class:`DenseSource` (see the module
    docstring); ``source_cat_ids`` are the dataset category ids of the checkpoint's classes in
    its order (default: COCO's 80 in id order, detectron2's ``coco_2017`` metadata)."""
    t = KeyTaker(sd, source)
    notes: List[str] = []
    # Buffers some detectron2 versions saved: recomputed by the vitasks model.
    for key in [k for k in t.sd if k.endswith(("pixel_mean", "pixel_std")) or ".cell_anchors." in k]:
        t.take(key)
    backbone = vitdet_backbone(t, "backbone.net.", norm_eps=1e-6, notes=notes)
    neck = _neck(t, backbone["patch_size"])
    neck["in_channels"] = backbone["embed_dim"]
    rpn = _rpn(t)
    stages = sorted({int(k.split(".")[2]) for k in t.sd if k.startswith("roi_heads.box_head.") and k.split(".")[2].isdigit()})
    if stages:
        heads = [_box_head(t, f"roi_heads.box_head.{s}", f"roi_heads.box_predictor.{s}", f"roi_head.box_heads.{s}")
                 for s in stages]
    else:
        heads = [_box_head(t, "roi_heads.box_head", "roi_heads.box_predictor", "roi_head.box_head")]
    box = heads[0]
    if any(h != box for h in heads[1:]):
        raise CheckpointError(f"{source}: the cascade stages' box heads differ ({heads}); vitasks builds them alike")
    num_classes = box.pop("num_classes")
    if stages and not box["class_agnostic"]:
        raise CheckpointError(f"{source}: a cascade with class-specific boxes; vitasks' cascade stages are class-agnostic")
    mask = _mask_head(t)
    t.finish()

    published = PUBLISHED.get((backbone["depth"], bool(stages)), "") if num_classes == 80 else ""
    return vitdet_source("detectron2", t, backbone, neck, rpn, box, mask, num_classes, stages, source_cat_ids,
                         class_names, published, notes)


def read(path: str, opts: Any = None) -> DenseSource:
    """Read a detectron2 ViTDet checkpoint (``.pkl`` from the model zoo, or a trainer ``.pth``)."""
    return convert_state_dict(read_file(path), path)
