"""A small, learnable classification dataset in the ImageNet folder layout.

Each class is a (shape, colour) pair, e.g. ``red_circle`` or ``blue_triangle``: the shape is drawn
at a random position, scale and rotation, its colour jittered, over a random dark background with
noise. Telling classes apart needs both colour and shape, so a small ViT must learn spatial
structure, yet it reaches high accuracy within a couple of CPU minutes.

Written as ``train/<class>/<class>_<i>.png`` and ``val/<class>/<class>_<i>.png``, plus
``synthetic.json`` (the parameters). The same arguments give the same files, byte for byte.
"""

import json
import math
import os
import shutil
from typing import List, Tuple

import cv2
import numpy as np
from PIL import Image

from vitasks.errors import DataError

SHAPES = ("circle", "square", "triangle", "cross", "ring")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
}
MARKER = "synthetic.json"


def class_names(num_classes: int) -> List[str]:
    """The first ``num_classes`` (colour, shape) names, ordered so that consecutive classes
    differ in shape and in colour (a small K still needs both cues)."""
    colours = list(COLOURS)
    names, seen = [], set()
    # Walk the shape x colour grid along diagonals: (s0, c0), (s1, c1), ...
    for offset in range(len(colours)):
        for i in range(len(SHAPES)):
            name = f"{colours[(i + offset) % len(colours)]}_{SHAPES[i]}"
            if name not in seen:
                seen.add(name)
                names.append(name)
    if not 2 <= num_classes <= len(names):
        raise ValueError(f"num_classes must be in 2..{len(names)}, got {num_classes}")
    return sorted(names[:num_classes])


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> List[np.ndarray]:
    """Vertices (int32) of a polygonal shape of radius ``r`` centred at (cx, cy)."""

    def rot(points: np.ndarray) -> np.ndarray:
        c, s = math.cos(angle), math.sin(angle)
        rotated = points @ np.array([[c, s], [-s, c]])
        return np.round(rotated + [cx, cy]).astype(np.int32)

    if shape == "square":
        p = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * r * 0.8
        return [rot(p)]
    if shape == "triangle":
        p = np.array([[math.cos(a), math.sin(a)] for a in np.deg2rad([-90, 30, 150])]) * r
        return [rot(p)]
    if shape == "cross":
        w = 0.35
        bar = np.array([[-1, -w], [1, -w], [1, w], [-1, w]], float) * r
        return [rot(bar), rot(bar[:, ::-1].copy())]
    raise ValueError(shape)


def _draw(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    """One RGB uint8 image of class ``name``."""
    colour_name, shape = name.split("_", 1)
    background = rng.uniform(0, 90, size=3)
    img = np.empty((size, size, 3), np.float32)
    img[:] = background
    # Low-frequency background blotches so the model cannot rely on a flat background.
    blotch = cv2.resize(rng.uniform(-25, 25, (4, 4, 3)).astype(np.float32), (size, size),
                        interpolation=cv2.INTER_CUBIC)
    img += blotch
    r = rng.uniform(0.22, 0.38) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    colour = np.clip(np.array(COLOURS[colour_name]) + rng.normal(0, 18, 3), 0, 255)
    canvas = np.ascontiguousarray(img.clip(0, 255).astype(np.uint8))
    color = tuple(int(v) for v in colour)
    center = (int(round(cx)), int(round(cy)))
    if shape == "circle":
        cv2.circle(canvas, center, int(round(r)), color, thickness=-1, lineType=cv2.LINE_AA)
    elif shape == "ring":
        cv2.circle(canvas, center, int(round(r * 0.8)), color, thickness=max(2, int(r * 0.35)),
                   lineType=cv2.LINE_AA)
    else:
        for poly in _polygon(shape, cx, cy, r, angle):
            cv2.fillPoly(canvas, [poly], color, lineType=cv2.LINE_AA)
    noisy = canvas.astype(np.float32) + rng.normal(0, 8, canvas.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def make_cls_dataset(
    out_dir: str,
    num_classes: int = 6,
    train_per_class: int = 80,
    val_per_class: int = 20,
    size: int = 32,
    seed: int = 0,
) -> Tuple[str, List[str]]:
    """Write the dataset to ``out_dir`` and return ``(out_dir, class names)``.

    Args:
        out_dir: The data root to write (``train/`` and ``val/`` inside). A folder written by
            this function before is replaced; any other non-empty folder is refused.
        num_classes: Number of (colour, shape) classes, 2..20.
        train_per_class: Training images per class.
        val_per_class: Validation images per class.
        size: Image side in pixels.
        seed: Random seed; the same arguments give identical files.
    """
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    names = class_names(num_classes)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not os.path.isfile(os.path.join(out_dir, MARKER)):
            raise DataError(
                f"{out_dir!r} is not empty and was not written by make_cls_dataset; "
                "choose an empty or new folder"
            )
        for split in ("train", "val"):
            shutil.rmtree(os.path.join(out_dir, split), ignore_errors=True)
    os.makedirs(out_dir, exist_ok=True)

    for split_index, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for label, name in enumerate(names):
            # One generator per (split, class): adding classes or images never changes others.
            rng = np.random.default_rng([seed, split_index, label])
            folder = os.path.join(out_dir, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                Image.fromarray(_draw(rng, name, size)).save(os.path.join(folder, f"{name}_{i:04d}.png"))

    params = dict(kind="cls", num_classes=num_classes, classes=names, train_per_class=train_per_class,
                  val_per_class=val_per_class, size=size, seed=seed)
    with open(os.path.join(out_dir, MARKER), "w", encoding="utf-8") as f:
        json.dump(params, f, indent=2)
    return out_dir, names
