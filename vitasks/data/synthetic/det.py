"""A small detection and instance segmentation dataset in the COCO layout.

``annotations/instances_{train2017,val2017}.json`` with images in ``train2017/`` and ``val2017/``.
Each image holds one to four non-overlapping shapes on a noisy background; the category is the
shape (circle, square, triangle, ring, cross, star), never the colour, which is drawn at random
per object. Everything a real COCO file has is exercised:

- category ids are not contiguous (1, 3, 5, ...), so a label -> id mapping bug shows;
- masks are polygons, except rings (a disc with a hole, which a polygon cannot hold): RLE;
- ``bbox`` is the polygon's extent (the RLE's for rings) and ``area`` the rasterised mask's, as
  in COCO; the image's pixels are pycocotools' rasterisation of the annotation, so the
  annotation is exactly what is drawn;
- a few training images have no object (skipped in training, as COCO's are).
"""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
from pycocotools import mask as mask_utils

__all__ = ["SHAPES", "make_det_dataset"]

SHAPES = ("circle", "square", "triangle", "ring", "cross", "star")


def _regular(center: np.ndarray, radius: float, count: int, angle: float, radii=None) -> np.ndarray:
    """Vertices (count, 2) around ``center``; ``radii`` varies the radius per vertex (stars)."""
    theta = angle + np.arange(count) * 2 * np.pi / count
    r = radius if radii is None else radius * np.asarray(radii)
    return center + np.stack([np.cos(theta), np.sin(theta)], 1) * np.reshape(r, (-1, 1))


def _shape(kind: str, center: np.ndarray, size: float, rng: np.random.Generator):
    """The shape's segmentation: a list of polygons (flat x, y lists) or, for a ring, the two
    polygons of its outer and inner edge (the caller makes the RLE)."""
    angle = rng.uniform(-np.pi / 12, np.pi / 12)
    r = size / 2
    if kind == "circle":
        return [_regular(center, r, 32, 0.0)]
    if kind == "square":
        return [_regular(center, r * np.sqrt(2) * 0.8, 4, np.pi / 4 + angle)]
    if kind == "triangle":
        return [_regular(center, r, 3, -np.pi / 2 + angle)]
    if kind == "ring":
        return [_regular(center, r, 32, 0.0), _regular(center, r * rng.uniform(0.45, 0.6), 32, 0.0)]
    if kind == "cross":
        a, b = r, r * 0.35
        pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b],
                        [-a, b], [-a, -b], [-b, -b]])
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        return [center + pts @ rot.T]
    # star: five points
    return [_regular(center, r, 10, -np.pi / 2 + angle, radii=[1.0, 0.45] * 5)]


def _annotation(kind: str, polygons: list[np.ndarray], height: int, width: int) -> tuple[dict, np.ndarray]:
    """COCO ``segmentation``/``bbox``/``area`` and the rasterised mask of one shape."""
    # Rounded as written to the JSON, so the drawn pixels are the file's polygon rasterised.
    polygons = [np.round(p, 2) for p in polygons]
    flat = [p.reshape(-1).tolist() for p in polygons]
    if kind == "ring":
        outer, inner = (mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([f], height, width)))
                        for f in flat)
        bitmap = (outer & (1 - inner)).astype(np.uint8)
        rle = mask_utils.encode(np.asfortranarray(bitmap))
        segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
        bbox = [float(v) for v in mask_utils.toBbox(rle)]
    else:
        bitmap = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(flat, height, width)))
        rle = mask_utils.encode(np.asfortranarray(bitmap))
        segmentation = flat
        xs = np.concatenate([p[:, 0] for p in polygons])
        ys = np.concatenate([p[:, 1] for p in polygons])
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min()), float(ys.max() - ys.min())]
    ann = {"segmentation": segmentation, "bbox": [round(v, 4) for v in bbox],
           "area": float(mask_utils.area(rle)), "iscrowd": 0}
    return ann, bitmap.astype(bool)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    grey = rng.uniform(70, 170)
    noise = cv2.GaussianBlur(rng.normal(0, 20, (size, size, 3)).astype(np.float32), (0, 0), 3.0)
    return np.clip(grey + noise, 0, 255)


def _colour(rng: np.random.Generator, background: float) -> np.ndarray:
    """A random colour that stands out from the background's mean level."""
    for _ in range(50):
        colour = rng.uniform(0, 255, 3)
        if abs(colour.mean() - background) > 45 or np.ptp(colour) > 120:
            return colour
    return np.array([255.0, 255.0, 255.0]) if background < 128 else np.zeros(3)


def _image(rng: np.random.Generator, size: int, kinds: tuple[str, ...], empty_prob: float):
    """One image and its objects ``[(label, annotation), ...]``."""
    img = _background(rng, size)
    objects = []
    if rng.random() < empty_prob:
        return img.astype(np.uint8), objects
    taken = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(20):
            extent = rng.uniform(0.14, 0.4) * size
            center = rng.uniform(extent / 2 + 1, size - extent / 2 - 1, 2)
            label = int(rng.integers(len(kinds)))
            ann, bitmap = _annotation(kinds[label], _shape(kinds[label], center, extent, rng), size, size)
            grown = cv2.dilate(bitmap.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            if bitmap.sum() >= 20 and not (grown & taken).any():
                break
        else:
            continue
        taken |= bitmap
        shade = _colour(rng, float(img.mean()))
        texture = 1.0 + rng.normal(0, 0.06, (size, size, 1))
        img[bitmap] = np.clip(shade * texture, 0, 255)[bitmap]
        objects.append((label, ann))
    img = np.clip(img + rng.normal(0, 5, img.shape), 0, 255)
    return img.astype(np.uint8), objects


def make_det_dataset(
    out_dir: str,
    seed: int = 0,
    num_train: int = 400,
    num_val: int = 100,
    img_size: int = 128,
    num_classes: int = 4,
    empty_prob: float = 0.03,
) -> dict:
    """Write the dataset; returns ``{"train": (images, objects), "val": (...), "cat_ids": [...]}``.

    Args:
        out_dir: the dataset root (the config's ``data_root``).
        seed: everything drawn follows from it.
        num_train / num_val: images per split.
        img_size: square image side in pixels.
        num_classes: how many of :data:`SHAPES` (in order) are used, 1..6.
        empty_prob: share of training images without objects.
    """
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be 1..{len(SHAPES)}, got {num_classes}")
    kinds = SHAPES[:num_classes]
    cat_ids = [1 + 2 * i for i in range(num_classes)]
    categories = [{"id": c, "name": k, "supercategory": "shape"} for c, k in zip(cat_ids, kinds)]
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    summary: dict = {"cat_ids": cat_ids}
    ann_id = 1
    for split, count, first_id, empty in (("train2017", num_train, 1, empty_prob),
                                          ("val2017", num_val, 1_000_001, 0.0)):
        img_dir = os.path.join(out_dir, split)
        os.makedirs(img_dir, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            img_id = first_id + i
            file_name = f"{img_id:012d}.jpg"
            img, objects = _image(rng, img_size, kinds, empty)
            cv2.imwrite(os.path.join(img_dir, file_name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
            images.append({"id": img_id, "file_name": file_name, "height": img_size, "width": img_size})
            for label, ann in objects:
                annotations.append({"id": ann_id, "image_id": img_id, "category_id": cat_ids[label], **ann})
                ann_id += 1
        with open(os.path.join(out_dir, "annotations", f"instances_{split}.json"), "w", encoding="utf-8") as f:
            json.dump({"info": {"description": "vitasks synthetic shapes"}, "licenses": [],
                       "images": images, "annotations": annotations, "categories": categories}, f)
        summary[split[:-4]] = (len(images), len(annotations))
    return summary
