"""Detection transforms: load boxes, labels and masks, ViTDet's large-scale jitter, pack.

Conventions in ``results`` (after :class:`LoadDetAnnotations`):

- ``gt_bboxes``: ``(N, 4)`` float32, ``x1, y1, x2, y2`` in pixels of the current image, where
  pixel ``i`` covers ``[i, i + 1)`` (COCO's convention);
- ``gt_labels``: ``(N,)`` int64 in ``0..K-1``; ``gt_ignore_flags``: ``(N,)`` bool, True for crowd
  regions (kept so that transforms move them too, but never a training target);
- ``gt_masks``: :class:`InstanceMasks`, the objects' COCO polygons or RLE kept as they are in the
  file, with the geometric transform applied since; they become bitmaps only when packed.

Why not albumentations here: every geometric step of the large-scale jitter (resize, crop, flip;
the padding is the data preprocessor's) maps pixel coordinates by ``x' = a * x + b`` per axis. Kept
as one such map per axis, masks need no bitmaps until the end: a polygon is rasterised once at the
final size, from exactly transformed vertices, and an RLE mask is warped once. Boxes get the same
map, so a mask and its box cannot drift apart. Albumentations would carry N full-size bitmaps
through every step (an image scaled by 2.0 makes them 4x larger before the crop).

Random draws come from :func:`~vitasks.data.seeding.sample_rng`, so a sample's augmentation follows
from the config's seed and its place in the training stream.

Pipelines (ViTDet's recipe; sizes are config values, a demo may use 128):

- train: ``LoadImage``, ``LoadDetAnnotations``, ``DetRandomResize(scale=[1024, 1024],
  ratio_range=[0.1, 2.0])``, ``DetRandomCrop(crop_size=[1024, 1024])``, ``FilterDetAnnotations``,
  ``DetRandomFlip(prob=0.5)``, ``PackDetInputs``; the data preprocessor pads to 1024x1024;
- test: ``LoadImage``, ``DetResize(scale=[1024, 1024])`` (longest side 1024), ``PackDetInputs``.

detectron2's LSJ exactly (ViTDet's published recipe): ``DetRandomResize(..., backend=pil,
size_rule=detectron2)``, ``DetRandomCrop(..., offset=detectron2)`` and ``DetResize(...,
backend=pil)`` at test time. detectron2 resizes uint8 images with PIL (``ResizeTransform``), whose
bilinear filter widens with the scale when shrinking (an antialiasing filter), unlike OpenCV's
bilinear, which samples 2x2 pixels at any scale; its ``ResizeScale`` fits the image in the box
``scale x r`` without truncating that box and rounds the size (``np.round``); its
``FixedSizeCrop`` places the crop with one ``U(0, 1)`` draw for both axes, rounded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from mmengine.structures import InstanceData
from PIL import Image
from pycocotools import mask as mask_utils

from vitasks.data.seeding import sample_rng
from vitasks.data.seg_transforms import check_ratio_range, rescaled_size
from vitasks.data.transforms import BaseTransform, chw_tensor
from vitasks.checks import InRange, IntPair, OneOf, checked, config_key
from vitasks.errors import ConfigError, DataError
from vitasks.registry import TRANSFORMS
from vitasks.structures import DataSample

__all__ = [
    "InstanceMasks",
    "LoadDetAnnotations",
    "DetResize",
    "DetRandomResize",
    "DetRandomCrop",
    "DetRandomFlip",
    "FilterDetAnnotations",
    "PackDetInputs",
    "normalize_segmentation",
    "pil_resize",
    "detectron2_scaled_size",
]

_INTERP = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
           "area": cv2.INTER_AREA}
_PIL_INTERP = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
               "bicubic": Image.Resampling.BICUBIC, "area": Image.Resampling.BOX}
_BACKENDS = ("cv2", "pil")
SizeRule = OneOf("mmcv", "detectron2")
CropOffset = OneOf("independent", "detectron2")
FlipDirection = OneOf("horizontal", "vertical")
MaskFormat = OneOf("bitmap", "compact")


def pil_resize(img: np.ndarray, size: tuple[int, int], interpolation: str = "bilinear") -> np.ndarray:
    """``img`` (uint8 HW or HWC) resized to ``size`` (H, W) by PIL, as detectron2's
    ``ResizeTransform`` does for uint8 images (PIL's filters are scaled with the image when
    shrinking: bilinear averages over about ``1 / scale`` pixels). Channels PIL has no mode for
    (more than 4) are resized one by one, which gives the same values."""
    height, width = int(size[0]), int(size[1])
    if img.dtype != np.uint8:
        raise ValueError(f"pil_resize needs a uint8 image (as detectron2's PIL path), got {img.dtype}")
    resample = _PIL_INTERP[interpolation]
    if img.ndim == 2:
        return np.asarray(Image.fromarray(img).resize((width, height), resample))
    if img.shape[2] == 3:
        return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((width, height), resample))
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(img[:, :, c])).resize((width, height), resample))
              for c in range(img.shape[2])]
    return np.stack(planes, axis=2)


def normalize_segmentation(segmentation: Any, height: int, width: int) -> Any:
    """A COCO ``segmentation`` in the form :class:`InstanceMasks` keeps: a list of polygons (flat
    lists ``x0, y0, x1, y1, ...`` of three points or more, as in the file: plain lists load and
    serialise faster than arrays, which matters for COCO's 860k objects) or one compressed RLE.

    Uncompressed RLE (``counts`` as a list of run lengths, COCO's crowd regions) is compressed;
    polygons of fewer than three points are left out (pycocotools would read a 4-number polygon
    as a box). Returns ``None`` when nothing valid remains. Raises ValueError for an RLE whose
    ``size`` is not ``(height, width)`` or a value of another type.
    """
    if isinstance(segmentation, dict):
        size = segmentation.get("size")
        if size is None or "counts" not in segmentation:
            raise ValueError("an RLE segmentation needs `size` and `counts`")
        if [int(s) for s in size] != [int(height), int(width)]:
            raise ValueError(f"RLE size {list(size)} differs from the image's {[height, width]} (HxW)")
        if isinstance(segmentation["counts"], list):
            return mask_utils.frPyObjects(segmentation, int(height), int(width))
        return {"size": [int(height), int(width)], "counts": segmentation["counts"]}
    if isinstance(segmentation, (list, tuple)):
        polygons = [p for p in segmentation
                    if isinstance(p, (list, tuple, np.ndarray)) and len(p) >= 6 and len(p) % 2 == 0]
        return polygons or None
    raise ValueError(
        f"segmentation must be polygons (a list) or RLE (a dict), got {type(segmentation).__name__}"
    )


class InstanceMasks:
    """The masks of N objects as their COCO polygons or RLE in the source image, plus the
    axis-aligned map from source to current pixels (``x' = sx * x + tx``, ``y' = sy * y + ty``;
    a flip makes a scale negative) and the current canvas size. Rasterised by :meth:`to_bitmaps`.

    Args:
        segmentations: per object, the output of :func:`normalize_segmentation` (polygon list,
            RLE dict, or ``None`` for an empty mask).
        source_shape: ``(H, W)`` the segmentations refer to.
        shape: current canvas ``(H, W)`` (the source's by default).
        affine: ``(sx, tx, sy, ty)`` (identity by default).
    """

    def __init__(
        self,
        segmentations: Sequence[Any],
        source_shape: tuple[int, int],
        shape: tuple[int, int] | None = None,
        affine: Sequence[float] = (1.0, 0.0, 1.0, 0.0),
    ) -> None:
        self.segmentations = list(segmentations)
        self.source_shape = (int(source_shape[0]), int(source_shape[1]))
        self.shape = self.source_shape if shape is None else (int(shape[0]), int(shape[1]))
        self.affine = tuple(float(a) for a in affine)

    def __len__(self) -> int:
        return len(self.segmentations)

    def __getitem__(self, index: Any) -> "InstanceMasks":
        """The masks selected by a boolean mask, an index array or a slice."""
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        if isinstance(index, slice):
            chosen = self.segmentations[index]
        else:
            index = np.asarray(index)
            if index.dtype == bool:
                index = np.flatnonzero(index)
            chosen = [self.segmentations[int(i)] for i in index.reshape(-1)]
        return InstanceMasks(chosen, self.source_shape, self.shape, self.affine)

    def __repr__(self) -> str:
        return f"InstanceMasks(num={len(self)}, shape={self.shape}, affine={self.affine})"

    # Geometry: each returns a new object; boxes get the same maps in the transforms below.
    def rescale(self, scale_x: float, scale_y: float, shape: tuple[int, int]) -> "InstanceMasks":
        sx, tx, sy, ty = self.affine
        return InstanceMasks(self.segmentations, self.source_shape, shape,
                             (sx * scale_x, tx * scale_x, sy * scale_y, ty * scale_y))

    def translate(self, dx: float, dy: float, shape: tuple[int, int]) -> "InstanceMasks":
        sx, tx, sy, ty = self.affine
        return InstanceMasks(self.segmentations, self.source_shape, shape, (sx, tx + dx, sy, ty + dy))

    def flip(self, direction: str = "horizontal") -> "InstanceMasks":
        sx, tx, sy, ty = self.affine
        height, width = self.shape
        if direction == "horizontal":
            affine = (-sx, width - tx, sy, ty)
        else:
            affine = (sx, tx, -sy, height - ty)
        return InstanceMasks(self.segmentations, self.source_shape, self.shape, affine)

    # Rasterising. Each mask is drawn only in the window of its own extent (exactly what drawing
    # it on the whole canvas gives: windows start at whole pixels), so the cost follows the
    # objects' sizes, not N times the canvas.
    def _polygon_bitmap(self, polygons: list[np.ndarray], out: np.ndarray) -> None:
        sx, tx, sy, ty = self.affine
        height, width = self.shape
        moved = []
        for poly in polygons:
            p = np.array(poly, np.float64).reshape(-1)
            p[0::2] = p[0::2] * sx + tx
            p[1::2] = p[1::2] * sy + ty
            moved.append(p)
        xs = np.concatenate([p[0::2] for p in moved])
        ys = np.concatenate([p[1::2] for p in moved])
        x0, y0 = max(int(np.floor(xs.min())) - 1, 0), max(int(np.floor(ys.min())) - 1, 0)
        x1, y1 = min(int(np.ceil(xs.max())) + 2, width), min(int(np.ceil(ys.max())) + 2, height)
        if x1 <= x0 or y1 <= y0:
            return  # entirely outside the canvas
        for p in moved:
            p[0::2] -= x0
            p[1::2] -= y0
        rle = mask_utils.merge(mask_utils.frPyObjects([p.tolist() for p in moved], y1 - y0, x1 - x0))
        out[y0:y1, x0:x1] = mask_utils.decode(rle)

    def _rle_bitmap(self, rle: dict, out: np.ndarray) -> None:
        sx, tx, sy, ty = self.affine
        height, width = self.shape
        if self.affine == (1.0, 0.0, 1.0, 0.0) and tuple(rle["size"]) == (height, width):
            out[:] = mask_utils.decode(rle)
            return
        # The source extent, mapped: only that window of the canvas can be set.
        bx, by, bw, bh = mask_utils.toBbox(rle)
        xs, ys = (bx * sx + tx, (bx + bw) * sx + tx), (by * sy + ty, (by + bh) * sy + ty)
        x0, y0 = max(int(np.floor(min(xs))) - 1, 0), max(int(np.floor(min(ys))) - 1, 0)
        x1, y1 = min(int(np.ceil(max(xs))) + 1, width), min(int(np.ceil(max(ys))) + 1, height)
        if x1 <= x0 or y1 <= y0:
            return
        # The map is for pixel edges; OpenCV's matrix maps pixel centres (index i is at i + 0.5),
        # and the window's origin moves to (x0, y0).
        matrix = np.array([[sx, 0.0, 0.5 * sx + tx - 0.5 - x0], [0.0, sy, 0.5 * sy + ty - 0.5 - y0]])
        out[y0:y1, x0:x1] = cv2.warpAffine(mask_utils.decode(rle), matrix, (x1 - x0, y1 - y0),
                                           flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                                           borderValue=0)

    def to_bitmaps(self) -> np.ndarray:
        """``(N, H, W)`` bool masks at the current canvas size."""
        height, width = self.shape
        out = np.zeros((len(self), height, width), bool)
        for i, seg in enumerate(self.segmentations):
            if seg is None:
                continue
            if isinstance(seg, dict):
                self._rle_bitmap(seg, out[i])
            else:
                self._polygon_bitmap(seg, out[i])
        return out

    def to_tensor(self) -> torch.Tensor:
        """:meth:`to_bitmaps` as a bool tensor."""
        return torch.from_numpy(self.to_bitmaps())


def _map_boxes(
    boxes: np.ndarray, scale_x: float, shift_x: float, scale_y: float, shift_y: float
) -> np.ndarray:
    """Boxes under ``x' = scale_x * x + shift_x`` (same for y), re-ordered so that x1 <= x2
    (a negative scale is a flip)."""
    xs = boxes[:, 0::2] * scale_x + shift_x
    ys = boxes[:, 1::2] * scale_y + shift_y
    return np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], axis=1).astype(np.float32)


def _select(results: dict, keep: np.ndarray) -> None:
    """Keep the objects where ``keep`` is True in every per-object field."""
    for key in ("gt_bboxes", "gt_labels", "gt_ignore_flags", "gt_masks"):
        if results.get(key) is not None:
            results[key] = results[key][keep]



@TRANSFORMS.register_module()
class LoadDetAnnotations(BaseTransform):
    """Turn the dataset's ``instances`` into ``gt_bboxes``, ``gt_labels``, ``gt_ignore_flags`` and
    (``with_mask``) ``gt_masks``.

    Each instance is ``{"bbox": [x1, y1, x2, y2], "bbox_label": int, "ignore_flag": 0/1,
    "mask": polygons or RLE}`` (what :class:`~vitasks.data.coco.CocoDataset` gives). Masks are
    kept compact (:class:`InstanceMasks`). A loaded image whose size differs from the annotation
    file's ``height``/``width`` is a DataError naming the file (its masks would be misplaced).

    Args:
        with_mask: load the masks (a box-only dataset sets false).
    """

    def __init__(self, with_mask: bool = True) -> None:
        self.with_mask = bool(with_mask)

    def transform(self, results: dict) -> dict:
        instances = results.get("instances") or []
        height = int(results.get("height", 0) or results.get("ori_shape", (0, 0))[0])
        width = int(results.get("width", 0) or results.get("ori_shape", (0, 0))[1])
        ori_shape = results.get("ori_shape")
        if ori_shape is not None and results.get("height") is not None and \
                tuple(ori_shape[:2]) != (int(results["height"]), int(results["width"])):
            raise DataError(
                f"image {results.get('img_path', '?')} is {ori_shape[0]}x{ori_shape[1]} (HxW) but the "
                f"annotation file says {results['height']}x{results['width']}; boxes and masks "
                "would not fit it (was the image rotated or resized?)"
            )
        boxes = np.asarray([inst["bbox"] for inst in instances], np.float32).reshape(-1, 4)
        results["gt_bboxes"] = boxes
        results["gt_labels"] = np.asarray([inst["bbox_label"] for inst in instances], np.int64)
        results["gt_ignore_flags"] = np.asarray(
            [bool(inst.get("ignore_flag", 0)) for inst in instances], bool
        )
        if self.with_mask:
            missing = [i for i, inst in enumerate(instances) if inst.get("mask") is None
                       and not inst.get("ignore_flag", 0)]
            if missing:
                raise DataError(
                    f"LoadDetAnnotations: {len(missing)} object(s) of {results.get('img_path', '?')} "
                    "have no segmentation; set `with_mask: false` for a box-only dataset"
                )
            results["gt_masks"] = InstanceMasks(
                [inst.get("mask") for inst in instances], (height, width)
            )
        return results


@TRANSFORMS.register_module()
class DetResize(BaseTransform):
    """Resize the image with its boxes and masks.

    With ``keep_ratio`` the image is scaled to fit within ``scale`` (``[1024, 1024]``: longest side
    1024, ViTDet's test resize); without, to exactly ``scale`` = ``(W, H)``. ``scale_factor``
    (``(w_scale, h_scale)`` from the original image) and ``img_shape`` are updated.

    Args:
        scale: ``(long, short)`` bound with ``keep_ratio``, else ``(W, H)``.
        keep_ratio: keep the aspect ratio.
        interpolation: ``bilinear`` (mmdet's and detectron2's), ``bicubic``, ``area``, ``nearest``.
        backend: ``cv2`` (OpenCV, as mmcv: no antialiasing) or ``pil`` (PIL, as detectron2: the
            filter widens when shrinking; uint8 images). The sizes are the same either way (this
            keep-ratio rule is detectron2's ``ResizeShortestEdge`` rule too when both bounds are
            equal).
    """

    @checked
    def __init__(self, scale: IntPair = (1024, 1024), keep_ratio: bool = True,
                 interpolation: OneOf(*_INTERP) = "bilinear", backend: OneOf(*_BACKENDS) = "cv2") -> None:
        self.scale = scale
        self.keep_ratio = bool(keep_ratio)
        self.interpolation = interpolation
        self.backend = backend

    def _target(self, height: int, width: int, scale: tuple[float, float]) -> tuple[int, int]:
        if self.keep_ratio:
            return rescaled_size(height, width, scale)
        return int(scale[1]), int(scale[0])

    def _resize_image(self, img: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
        if self.backend == "pil" and img.dtype == np.uint8:
            return pil_resize(img, (new_h, new_w), self.interpolation)
        resized = cv2.resize(img, (new_w, new_h), interpolation=_INTERP[self.interpolation])
        return resized[:, :, None] if resized.ndim == 2 and img.ndim == 3 else resized

    def _resize(self, results: dict, size: tuple[int, int]) -> dict:
        new_h, new_w = max(int(size[0]), 1), max(int(size[1]), 1)
        img = results["img"]
        old_h, old_w = img.shape[:2]
        if (new_h, new_w) != (old_h, old_w):
            results["img"] = self._resize_image(img, new_h, new_w)
        scale_x, scale_y = new_w / old_w, new_h / old_h
        if results.get("gt_bboxes") is not None:
            results["gt_bboxes"] = _map_boxes(results["gt_bboxes"], scale_x, 0.0, scale_y, 0.0)
        if results.get("gt_masks") is not None:
            results["gt_masks"] = results["gt_masks"].rescale(scale_x, scale_y, (new_h, new_w))
        previous = results.get("scale_factor", (1.0, 1.0))
        results["scale_factor"] = (previous[0] * scale_x, previous[1] * scale_y)
        results["img_shape"] = (new_h, new_w)
        return results

    def transform(self, results: dict) -> dict:
        height, width = results["img"].shape[:2]
        return self._resize(results, self._target(height, width, self.scale))


@TRANSFORMS.register_module()
class DetRandomResize(DetResize):
    """Resize to ``scale`` times a ratio drawn per sample from ``ratio_range`` (ViTDet's large-scale
    jitter: ``scale=[1024, 1024]``, ``ratio_range=[0.1, 2.0]``, keeping the aspect ratio, so the
    image fits in a square of side ``1024 * r``). The scaled bound is truncated to whole pixels
    before the keep-ratio rule, as mmcv's ``RandomResize`` does.

    With ``size_rule: detectron2`` the size follows detectron2's ``ResizeScale`` instead: the
    image is fitted in the box ``(W, H) = scale x r`` (not truncated), factor ``min(H r / h,
    W r / w)``, size ``np.round((h, w) x factor)`` (halves to even).

    Args:
        scale: base scale, as :class:`DetResize` (with ``size_rule: detectron2``: the box ``(W, H)``).
        ratio_range: ``[min, max]`` of the uniform ratio.
        keep_ratio, interpolation, backend: as :class:`DetResize`.
        size_rule: ``mmcv`` (the default) or ``detectron2``.
    """

    @checked
    def __init__(self, scale: IntPair = (1024, 1024), ratio_range: Sequence[float] = (0.1, 2.0),
                 keep_ratio: bool = True, interpolation: str = "bilinear", backend: str = "cv2",
                 size_rule: SizeRule = "mmcv") -> None:
        super().__init__(scale, keep_ratio, interpolation, backend)
        if size_rule == "detectron2" and not keep_ratio:
            raise ConfigError(f"{self.config_key}: size_rule detectron2 keeps the ratio; set keep_ratio: true")
        self.size_rule = size_rule
        self.ratio_range = check_ratio_range(ratio_range, config_key("ratio_range", default=self.config_key))

    def transform(self, results: dict) -> dict:
        ratio = sample_rng(results).uniform(*self.ratio_range)
        height, width = results["img"].shape[:2]
        if self.size_rule == "detectron2":
            return self._resize(results, detectron2_scaled_size(height, width, self.scale, ratio))
        scale = (max(int(self.scale[0] * ratio), 1), max(int(self.scale[1] * ratio), 1))
        return self._resize(results, self._target(height, width, scale))


def detectron2_scaled_size(height: int, width: int, box: Sequence[int], ratio: float) -> tuple[int, int]:
    """(H, W) of detectron2's ``ResizeScale``: fit ``(height, width)`` in the box ``(W, H) = box``
    scaled by ``ratio``, rounded half to even (``np.round``)."""
    target_h, target_w = box[1] * ratio, box[0] * ratio
    factor = min(target_h / height, target_w / width)
    new_h, new_w = np.round(np.multiply((height, width), factor)).astype(int)
    return max(int(new_h), 1), max(int(new_w), 1)


@TRANSFORMS.register_module()
class DetRandomCrop(BaseTransform):
    """A crop of ``crop_size`` at a random place (the whole side where the image is smaller), as
    mmdet's ``RandomCrop(crop_type="absolute")``: boxes are shifted and clipped to the crop, objects
    whose box vanishes are dropped, masks are cropped alike.

    Args:
        crop_size: ``(H, W)`` of the crop.
        allow_negative_crop: keep a crop without any (non-crowd) object; when false such a crop
            returns ``None`` and the dataset draws another sample (mmdet's behaviour).
        recompute_bbox: give each object that the crop cuts the bounding box of its mask's
            visible part (ViTDet's setting in detectron2 and mmdet): the clipped box of a cut
            triangle is larger than what is left of it. Only cut objects' masks are rasterised;
            an object with no pixel left is dropped. Without masks, boxes are only clipped.
        offset: ``independent`` (mmdet: a uniform integer per axis) or ``detectron2``
            (``FixedSizeCrop``: one ``u ~ U(0, 1)`` for both axes, offsets ``np.round(margin x u)``).
    """

    @checked
    def __init__(self, crop_size: IntPair = (1024, 1024), allow_negative_crop: bool = False,
                 recompute_bbox: bool = True, offset: CropOffset = "independent") -> None:
        self.crop_size = crop_size
        self.allow_negative_crop = bool(allow_negative_crop)
        self.recompute_bbox = bool(recompute_bbox)
        self.offset = offset

    def _offsets(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int]:
        margin_h, margin_w = max(height - self.crop_size[0], 0), max(width - self.crop_size[1], 0)
        if self.offset == "detectron2":
            u = rng.uniform(0.0, 1.0)
            y0, x0 = np.round(np.multiply((margin_h, margin_w), u)).astype(int)
            return int(y0), int(x0)
        return int(rng.integers(0, margin_h + 1)), int(rng.integers(0, margin_w + 1))

    def transform(self, results: dict) -> dict | None:
        img = results["img"]
        height, width = img.shape[:2]
        y0, x0 = self._offsets(height, width, sample_rng(results))
        y1, x1 = min(y0 + self.crop_size[0], height), min(x0 + self.crop_size[1], width)
        crop_h, crop_w = y1 - y0, x1 - x0
        results["img"] = np.ascontiguousarray(img[y0:y1, x0:x1])
        results["img_shape"] = (crop_h, crop_w)
        boxes = results.get("gt_bboxes")
        if boxes is None:
            return results
        boxes = _map_boxes(boxes, 1.0, -x0, 1.0, -y0)
        cut = (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > crop_w) | (boxes[:, 3] > crop_h)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, crop_w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, crop_h)
        masks = results.get("gt_masks")
        if masks is not None:
            masks = results["gt_masks"] = masks.translate(-x0, -y0, (crop_h, crop_w))
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if self.recompute_bbox and masks is not None:
            has_mask = np.array([seg is not None for seg in masks.segmentations], bool)
            redo = np.flatnonzero(keep & cut & has_mask)
            if redo.size:
                boxes[redo] = masks_to_boxes(masks[redo].to_bitmaps())
                keep[redo] = (boxes[redo, 2] > boxes[redo, 0]) & (boxes[redo, 3] > boxes[redo, 1])
        results["gt_bboxes"] = boxes
        _select(results, keep)
        ignore = results.get("gt_ignore_flags")
        num_targets = int((~ignore).sum()) if ignore is not None else len(results["gt_bboxes"])
        if num_targets == 0 and not self.allow_negative_crop:
            return None
        return results


def masks_to_boxes(bitmaps: np.ndarray) -> np.ndarray:
    """Tight ``(N, 4)`` xyxy boxes of ``(N, H, W)`` bitmaps in pixel-edge coordinates (a mask
    covering columns 3..7 has x1 = 3, x2 = 8); an empty mask gives a zero box."""
    boxes = np.zeros((len(bitmaps), 4), np.float32)
    for i, m in enumerate(bitmaps):
        cols, rows = np.flatnonzero(m.any(0)), np.flatnonzero(m.any(1))
        if cols.size:
            boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


@TRANSFORMS.register_module()
class FilterDetAnnotations(BaseTransform):
    """Drop objects whose box is narrower or shorter than ``min_size`` pixels (mmdet's
    ``FilterAnnotations``; a large-scale jitter at ratio 0.1 shrinks small objects to nothing).

    Args:
        min_size: smallest width and height kept.
        keep_empty: keep a sample left without objects (else ``None``: another sample is drawn).
    """

    def __init__(self, min_size: float = 1e-2, keep_empty: bool = True) -> None:
        self.min_size = float(min_size)
        self.keep_empty = bool(keep_empty)

    def transform(self, results: dict) -> dict | None:
        boxes = results.get("gt_bboxes")
        if boxes is None:
            return results
        keep = ((boxes[:, 2] - boxes[:, 0]) >= self.min_size) & ((boxes[:, 3] - boxes[:, 1]) >= self.min_size)
        _select(results, keep)
        if not keep.any() and not self.keep_empty:
            return None
        return results


@TRANSFORMS.register_module()
class DetRandomFlip(BaseTransform):
    """Flip the image, boxes and masks with probability ``prob``; ``flip`` and
    ``flip_direction`` go into the sample's metainfo.

    Args:
        prob: flip probability.
        direction: ``horizontal`` or ``vertical``.
    """

    @checked
    def __init__(self, prob: InRange(0, 1) = 0.5, direction: FlipDirection = "horizontal") -> None:
        self.prob = float(prob)
        self.direction = direction

    def transform(self, results: dict) -> dict:
        flip = bool(sample_rng(results).random() < self.prob)
        results["flip"] = flip
        results["flip_direction"] = self.direction if flip else None
        if not flip:
            return results
        img = results["img"]
        height, width = img.shape[:2]
        horizontal = self.direction == "horizontal"
        results["img"] = np.ascontiguousarray(img[:, ::-1] if horizontal else img[::-1])
        if results.get("gt_bboxes") is not None:
            results["gt_bboxes"] = (_map_boxes(results["gt_bboxes"], -1.0, width, 1.0, 0.0) if horizontal
                                    else _map_boxes(results["gt_bboxes"], 1.0, 0.0, -1.0, height))
        if results.get("gt_masks") is not None:
            results["gt_masks"] = results["gt_masks"].flip(self.direction)
        return results


@TRANSFORMS.register_module()
class PackDetInputs(BaseTransform):
    """Pack ``results`` into ``{"inputs": uint8 CHW tensor, "data_samples": DataSample}``.

    The sample gets ``gt_instances`` (InstanceData: ``bboxes`` float32 (N, 4) xyxy, ``labels`` int64
    (N,), ``masks``) with the objects to learn and ``ignored_instances`` with the crowd regions (as
    mmdet), when annotations were loaded; metainfo from ``meta_keys``.

    Args:
        meta_keys: keys copied into the metainfo when present.
        mask_format: ``bitmap``: masks as a bool tensor (N, H, W) at the image's size;
            ``compact``: the :class:`InstanceMasks` object (polygons/RLE, rasterised by the model).
    """

    @checked
    def __init__(
        self,
        meta_keys: Sequence[str] = ("img_id", "img_path", "ori_shape", "img_shape", "scale_factor",
                                    "flip", "flip_direction"),
        mask_format: MaskFormat = "bitmap",
    ) -> None:
        self.meta_keys = tuple(meta_keys)
        self.mask_format = mask_format

    def _instances(self, results: dict, chosen: np.ndarray) -> InstanceData:
        instances = InstanceData()
        boxes = np.asarray(results["gt_bboxes"], np.float32)[chosen]
        instances.bboxes = torch.from_numpy(boxes).reshape(-1, 4)
        instances.labels = torch.from_numpy(np.asarray(results["gt_labels"], np.int64)[chosen])
        masks = results.get("gt_masks")
        if masks is not None:
            masks = masks[chosen]
            instances.masks = masks.to_tensor() if self.mask_format == "bitmap" else masks
        return instances

    def transform(self, results: dict) -> dict:
        inputs = chw_tensor(results["img"])
        sample = DataSample()
        if results.get("gt_bboxes") is not None:
            ignore = results.get("gt_ignore_flags")
            if ignore is None:
                ignore = np.zeros(len(results["gt_bboxes"]), bool)
            sample.gt_instances = self._instances(results, np.flatnonzero(~ignore))
            sample.ignored_instances = self._instances(results, np.flatnonzero(ignore))
        sample.set_metainfo({k: results[k] for k in self.meta_keys if k in results})
        return {"inputs": inputs, "data_samples": sample}
