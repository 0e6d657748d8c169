"""A small detection and instance segmentation dataset in the COCO layout whose categories differ
only in shape.

``annotations/instances_{train2017,val2017}.json`` with images in ``train2017/`` and ``val2017/``.
Each image holds one to four non-overlapping shapes of :mod:`vitasks.data.synthetic.drawing`
(disc, ring, triangle, square, star, ...) at random positions, sizes and rotations, drawn as the
other generated datasets draw them: in random colours and textures over a random background by
default, light or dark over crops of a photograph in the ``"photo"`` style.
The category is the shape, never the colour. What a real COCO file has is exercised:

- category ids are not contiguous (1, 3, 5, ...), so a label -> id mapping bug shows;
- masks are polygons for shapes made of filled polygons that lie inside the image, RLE otherwise
  (rings and crescents have holes or bites; strokes; shapes cut by the border);
- ``bbox`` is the polygon's extent (the RLE's for the others) and ``area`` the rasterised mask's,
  as in COCO; an object's drawn pixels (coverage >= 0.5) match its annotation to a pixel;
- a few training images have no object (skipped in training, as COCO's are).

The same arguments write the same files; ``synthetic.json`` records them.
"""

from __future__ import annotations

import json
import math
import os

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from vitasks.data.synthetic import drawing
from vitasks.data.synthetic.layout import prepare_output, write_marker

__all__ = ["det_class_names", "draw_det_sample", "make_det_dataset"]

MAX_CLASSES = len(drawing.SHAPE_NAMES)
SPLITS = (("train2017", 1), ("val2017", 1_000_001))  # folder, first image id


def det_class_names(num_classes: int) -> list[str]:
    """The K category names in label order: the first K shapes."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"make_det_dataset: num_classes must be in 1..{MAX_CLASSES}, got {num_classes}")
    return list(drawing.SHAPE_NAMES[:num_classes])


def _polygons(shape: str, centre: np.ndarray, radius: float, angle_deg: float, aspect: float,
              size: int) -> list[np.ndarray] | None:
    """The shape's outline as pixel polygons (continuous coordinates), mapped as
    :func:`drawing.shape_alpha` maps them; ``None`` when the shape is not made of filled polygons
    alone or leaves the image (its mask is stored as RLE then)."""
    strokes = drawing.SHAPES[shape]
    if any(op != "fill" for op, _, _ in strokes):
        return None
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    rotation = np.array([[c, -s], [s, c]])
    polygons = [(points * [aspect, 1.0]) @ rotation.T * radius + centre for _, points, _ in strokes]
    if any((p < 0).any() or (p > size).any() for p in polygons):
        return None
    # Rounded as they are written to the JSON, so that what is drawn is the file's polygon.
    return [np.round(p, 2) for p in polygons]


def _polygon_alpha(polygons: list[np.ndarray], size: int, supersample: int = 4) -> np.ndarray:
    """Coverage (H, W) in [0, 1] of the polygons, from pycocotools' rasterisation at
    ``supersample`` times the size (drawing's own rendering, OpenCV's, puts edges about a
    quarter pixel further out than pycocotools reads the polygon back): a pixel with coverage
    >= 0.5 is, to a pixel, one that the annotation's mask holds, with no bias. Rendered in the
    window of the polygons' extent only."""
    points = np.concatenate(polygons)
    x0, y0 = (max(int(v) - 1, 0) for v in points.min(0))
    x1, y1 = (min(int(np.ceil(v)) + 1, size) for v in points.max(0))
    alpha = np.zeros((size, size), np.float32)
    if x1 <= x0 or y1 <= y0:
        return alpha
    flat = [((p - [x0, y0]) * supersample).reshape(-1).tolist() for p in polygons]
    fine_h, fine_w = (y1 - y0) * supersample, (x1 - x0) * supersample
    fine = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(flat, fine_h, fine_w))) * np.uint8(255)
    window = cv2.resize(fine, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    alpha[y0:y1, x0:x1] = window.astype(np.float32) / 255.0
    return alpha


def _annotation(polygons: list[np.ndarray] | None, drawn: np.ndarray, size: int) -> dict:
    """COCO ``segmentation``, ``bbox``, ``area`` and ``iscrowd`` of one object."""
    if polygons is not None:
        flat = [p.reshape(-1).tolist() for p in polygons]
        rle = mask_utils.merge(mask_utils.frPyObjects(flat, size, size))
        xs = np.concatenate([f[0::2] for f in flat])
        ys = np.concatenate([f[1::2] for f in flat])
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min()), float(ys.max() - ys.min())]
        segmentation = flat
    else:
        rle = mask_utils.encode(np.asfortranarray(drawn.astype(np.uint8)))
        bbox = [float(v) for v in mask_utils.toBbox(rle)]
        segmentation = {"size": [size, size], "counts": rle["counts"].decode("ascii")}
    return {"segmentation": segmentation, "bbox": [round(v, 4) for v in bbox],
            "area": float(mask_utils.area(rle)), "iscrowd": 0}


def draw_det_sample(rng: np.random.Generator, size: int, num_classes: int, empty: bool = False,
                    style: str = "random") -> tuple[np.ndarray, list[tuple[int, dict]]]:
    """One image (RGB uint8) and its objects ``[(label, annotation without ids), ...]``;
    ``style``: see ``drawing.STYLES``."""
    hw = (size, size)
    img = drawing.style_background(rng, hw, style)
    objects: list[tuple[int, dict]] = []
    taken = np.zeros(hw, bool)  # covered by an earlier shape, grown by a margin
    for _ in range(0 if empty else int(rng.integers(1, 5))):
        for _attempt in range(20):
            label = int(rng.integers(num_classes))
            shape = drawing.SHAPE_NAMES[label]
            # As drawing.random_shape_alpha draws them, but kept: polygons need the parameters.
            radius = rng.uniform(0.1, 0.28) * size
            margin = 0.8 * radius
            centre = rng.uniform(margin, size - margin, 2)
            angle, aspect = rng.uniform(-35.0, 35.0), rng.uniform(0.8, 1.2)
            polygons = _polygons(shape, centre, radius, angle, aspect, size)
            if polygons is None:
                alpha = drawing.shape_alpha(shape, hw, (centre[0], centre[1]), radius, angle, aspect)
            else:
                alpha = _polygon_alpha(polygons, size)
            drawn = alpha >= 0.5
            if drawn.sum() >= 20 and not (taken & (alpha > 0.05)).any():
                break
        else:
            continue
        objects.append((label, _annotation(polygons, drawn, size)))
        img = drawing.paint_in_style(rng, img, alpha, style, min_contrast=drawing.VISIBLE_CONTRAST)
        taken |= cv2.dilate((alpha > 0.05).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    return drawing.finish_in_style(rng, img, style), objects


def make_det_dataset(
    out_dir: str,
    seed: int = 0,
    num_train: int = 400,
    num_val: int = 100,
    img_size: int = 128,
    num_classes: int = 10,
    empty_prob: float = 0.03,
    style: str = "random",
) -> str:
    """Write the dataset into ``out_dir`` (the config's ``data_root``) and return it.

    Args:
        out_dir: output folder; a folder written by a generator before is replaced, any other
            non-empty folder is refused.
        seed: random seed (the same arguments write the same files).
        num_train / num_val: images per split.
        img_size: side of the square images (at least 32).
        num_classes: how many shapes of :data:`drawing.SHAPE_NAMES` (in order) are categories.
        empty_prob: share of training images without objects.
        style: ``"random"`` colours and textures, ``"plain"`` white shapes on black (quick checks),
            or ``"photo"``: light or dark shapes over crops of photographs (see ``drawing.STYLES``).
    """
    names = det_class_names(num_classes)
    drawing.check_style(style)
    if img_size < 32:
        raise ValueError(f"make_det_dataset: img_size must be at least 32 pixels, got {img_size}")
    prepare_output(out_dir, ("annotations", "train2017", "val2017"), "make_det_dataset")
    cat_ids = [1 + 2 * i for i in range(num_classes)]
    categories = [{"id": c, "name": n, "supercategory": "shape"} for c, n in zip(cat_ids, names)]
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    ann_id = 1
    for split_index, ((split, first_id), count) in enumerate(zip(SPLITS, (num_train, num_val))):
        img_dir = os.path.join(out_dir, split)
        os.makedirs(img_dir, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            # One generator per image: changing the counts never changes the other images.
            rng = np.random.default_rng([seed, split_index, i])
            empty = split_index == 0 and rng.random() < empty_prob
            img, objects = draw_det_sample(rng, img_size, num_classes, empty=empty, style=style)
            img_id = first_id + i
            file_name = f"{img_id:012d}.jpg"
            cv2.imwrite(os.path.join(img_dir, file_name), img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
            images.append({"id": img_id, "file_name": file_name, "height": img_size, "width": img_size})
            for label, ann in objects:
                annotations.append({"id": ann_id, "image_id": img_id, "category_id": cat_ids[label], **ann})
                ann_id += 1
        ann_path = os.path.join(out_dir, "annotations", f"instances_{split}.json")
        with open(ann_path, "w", encoding="utf-8") as f:
            json.dump({"info": {"description": "vitasks synthetic shapes"}, "licenses": [],
                       "images": images, "annotations": annotations, "categories": categories}, f)
    write_marker(out_dir, "det", names, seed, style, cat_ids=cat_ids, num_train=num_train, num_val=num_val,
                 img_size=img_size, empty_prob=empty_prob)
    return out_dir
