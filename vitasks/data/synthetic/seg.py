"""A small semantic segmentation dataset in the ADE20K layout.

``images/{training,validation}/*.jpg`` and ``annotations/{training,validation}/*.png``: shapes
(discs, boxes, triangles) of ``num_classes`` kinds on a noisy grey background. A kind is a colour
family with its own texture (plain, stripes, checks, dots, ...), so colour and texture both tell
the classes apart. Labels are 1..K for the shapes and 0 ("other") for the background, as ADE20K
stores them: read with ``reduce_zero_label`` the background is ignored and the shapes are classes
0..K-1. ``classes.txt`` names the K classes.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

# Base colour (RGB) and texture of each class, in label order.
_KINDS = (
    ("red_plain", (200, 40, 40), "plain"),
    ("green_hstripes", (40, 180, 60), "hstripes"),
    ("blue_checks", (40, 70, 210), "checks"),
    ("yellow_vstripes", (220, 200, 40), "vstripes"),
    ("magenta_dots", (200, 50, 200), "dots"),
    ("cyan_diagonal", (40, 200, 200), "diagonal"),
)
MAX_CLASSES = len(_KINDS)


def _texture(kind: str, size: int, phase: int) -> np.ndarray:
    """A (size, size) multiplier in [0.55, 1] drawing the texture pattern."""
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == "plain":
        pattern = np.ones((size, size), bool)
    elif kind == "hstripes":
        pattern = ((yy + phase) // 3) % 2 == 0
    elif kind == "vstripes":
        pattern = ((xx + phase) // 3) % 2 == 0
    elif kind == "checks":
        pattern = (((yy + phase) // 4) + ((xx + phase) // 4)) % 2 == 0
    elif kind == "dots":
        pattern = ((yy + phase) % 5 > 1) | ((xx + phase) % 5 > 1)
    else:  # diagonal
        pattern = ((yy + xx + phase) // 3) % 2 == 0
    return np.where(pattern, 1.0, 0.55)


def _shape_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random disc, box or triangle as a boolean (size, size) mask."""
    mask = np.zeros((size, size), np.uint8)
    extent = int(rng.integers(size // 6, size // 3 + 1))
    cy, cx = (int(v) for v in rng.integers(extent // 2, size - extent // 2, size=2))
    shape = rng.integers(3)
    if shape == 0:
        cv2.circle(mask, (cx, cy), extent // 2 + 2, 1, thickness=-1)
    elif shape == 1:
        h, w = (int(v) for v in rng.integers(extent // 2, extent + 1, size=2))
        cv2.rectangle(mask, (cx - w, cy - h // 2 - 2), (cx + w // 2 + 2, cy + h), 1, thickness=-1)
    else:
        pts = np.array([[cx, cy - extent], [cx - extent, cy + extent // 2], [cx + extent, cy + extent // 2]])
        cv2.fillPoly(mask, [pts.astype(np.int32)], 1)
    return mask.astype(bool)


def _sample(rng: np.random.Generator, size: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (RGB uint8) and its label map (0 background, 1..K shapes)."""
    grey = rng.uniform(90, 160)
    noise = cv2.GaussianBlur(rng.normal(0, 18, (size, size)).astype(np.float32), (0, 0), 2.0)
    img = np.clip(grey + noise, 0, 255)[..., None].repeat(3, axis=2)
    label = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(2, 5))):
        cls = int(rng.integers(num_classes))
        _, colour, texture = _KINDS[cls]
        mask = _shape_mask(rng, size)
        shade = np.asarray(colour, np.float32) * rng.uniform(0.8, 1.15)
        painted = shade[None, None, :] * _texture(texture, size, int(rng.integers(6)))[..., None]
        img[mask] = painted[mask]
        label[mask] = cls + 1
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    return img, label


def make_seg_dataset(
    out_dir: str,
    seed: int = 0,
    num_train: int = 96,
    num_val: int = 24,
    img_size: int = 64,
    num_classes: int = 5,
) -> str:
    """Write the dataset into ``out_dir`` (the config's ``data_root``) and return it.

    Args:
        out_dir: output folder, created if missing.
        seed: random seed (the same seed writes the same files).
        num_train: images in ``training``.
        num_val: images in ``validation``.
        img_size: side of the square images.
        num_classes: shape classes K (labels 1..K; at most 6).
    """
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"make_seg_dataset: num_classes must be in 1..{MAX_CLASSES}, got {num_classes}")
    rng = np.random.default_rng(seed)
    for split, count in (("training", num_train), ("validation", num_val)):
        img_dir = os.path.join(out_dir, "images", split)
        ann_dir = os.path.join(out_dir, "annotations", split)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        for i in range(count):
            img, label = _sample(rng, img_size, num_classes)
            name = f"synthetic_{split}_{i:05d}"
            cv2.imwrite(os.path.join(img_dir, name + ".jpg"), img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
            cv2.imwrite(os.path.join(ann_dir, name + ".png"), label)
    with open(os.path.join(out_dir, "classes.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(kind[0] for kind in _KINDS[:num_classes]) + "\n")
    return out_dir
