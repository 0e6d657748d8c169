"""A small, learnable classification dataset in the ImageNet folder layout.

Each class is a (colour, texture) pair, e.g. ``red_hstripes`` or ``blue_checker``: a random
shape (disc, square or triangle) at a random position, scale and rotation is filled with the
class's texture (solid, horizontal or vertical stripes, checkerboard, dots) in the class's
jittered colour, over a random dark background with noise. Classes that share a colour differ in
texture and vice versa, so a model needs both cues; textures are local, so a small ViT learns
them within a couple of CPU minutes while the shape, position and scale are nuisances.

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

SHAPES = ("disc", "square", "triangle")
TEXTURES = ("solid", "hstripes", "vstripes", "checker", "dots")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
}
MARKER = "synthetic.json"

# The first classes give each colour two textures and each texture two colours, so that even
# a small K needs both cues.
_FIRST = ("red_solid", "red_hstripes", "green_vstripes", "green_checker", "blue_solid",
          "blue_vstripes", "yellow_hstripes", "yellow_checker")


def class_names(num_classes: int) -> List[str]:
    """The first ``num_classes`` (colour, texture) class names, sorted."""
    names = list(_FIRST) + [
        f"{c}_{t}" for t in TEXTURES for c in COLOURS if f"{c}_{t}" not in _FIRST
    ]
    if not 2 <= num_classes <= len(names):
        raise ValueError(f"num_classes must be in 2..{len(names)}, got {num_classes}")
    return sorted(names[:num_classes])


def _texture(rng: np.random.Generator, texture: str, size: int) -> np.ndarray:
    """Float map in [0, 1] (1 = full colour) of the texture, with a random phase."""
    period = int(rng.integers(4, 7))
    phase_y, phase_x = rng.integers(0, period, size=2)
    yy, xx = np.mgrid[0:size, 0:size]
    on_y = ((yy + phase_y) % period) < period / 2
    on_x = ((xx + phase_x) % period) < period / 2
    if texture == "solid":
        return np.ones((size, size), np.float32)
    if texture == "hstripes":
        return on_y.astype(np.float32)
    if texture == "vstripes":
        return on_x.astype(np.float32)
    if texture == "checker":
        return (on_y ^ on_x).astype(np.float32)
    if texture == "dots":
        return (on_y & on_x).astype(np.float32)
    raise ValueError(texture)


def _shape_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float mask in [0, 1] of a random shape (anti-aliased edges)."""
    mask = np.zeros((size, size), np.uint8)
    r = rng.uniform(0.28, 0.45) * size
    cx, cy = rng.uniform(r * 0.7, size - r * 0.7, size=2)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    if shape == "disc":
        cv2.circle(mask, (int(round(cx)), int(round(cy))), int(round(r)), 255, -1, cv2.LINE_AA)
    else:
        n = 4 if shape == "square" else 3
        angle = rng.uniform(0, 2 * math.pi)
        pts = [(cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
               for k in range(n)]
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 255, cv2.LINE_AA)
    return mask.astype(np.float32) / 255.0


def _draw(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    """One RGB uint8 image of class ``name``."""
    colour_name, texture = name.split("_", 1)
    img = np.empty((size, size, 3), np.float32)
    img[:] = rng.uniform(0, 80, size=3)
    # Low-frequency background blotches: the background carries no class information.
    img += cv2.resize(rng.uniform(-25, 25, (4, 4, 3)).astype(np.float32), (size, size),
                      interpolation=cv2.INTER_CUBIC)
    colour = np.clip(np.array(COLOURS[colour_name], np.float32) + rng.normal(0, 15, 3), 0, 255)
    # Texture "off" pixels get a dark shade of the colour, so the shape stays visible.
    fill = colour * (0.3 + 0.7 * _texture(rng, texture, size)[..., None])
    alpha = _shape_mask(rng, size)[..., None]
    img = img * (1 - alpha) + fill * alpha
    img += rng.normal(0, 6, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


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
        num_classes: Number of (colour, texture) classes, 2..20.
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
