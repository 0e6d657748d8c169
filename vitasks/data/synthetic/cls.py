"""A small classification dataset in the ImageNet folder layout whose classes differ only in shape.

Each image shows one shape of its class (disc, ring, triangle, star, arrow, glyph-like strokes, ...;
see :mod:`vitasks.data.synthetic.drawing`) at a random position, scale and rotation, in a random
colour and texture, over a random textured background with a few distractor lines. Colour,
texture and background carry no class information, so (as with real objects) a model has to see
the outline; a classifier on colour statistics is at chance level (tests/data/test_synthetic.py).

Written as ``train/<class>/<class>_<i>.png`` and ``val/<class>/<class>_<i>.png``, plus
``synthetic.json`` (the parameters). The same arguments give the same files, byte for byte.
"""

from __future__ import annotations

import os
from typing import List, Tuple

import numpy as np
from PIL import Image

from vitasks.data.synthetic import drawing
from vitasks.data.synthetic.layout import prepare_output, write_marker


def class_names(num_classes: int) -> List[str]:
    """The first ``num_classes`` shape names, sorted (the folder order ImageNet readers use)."""
    names = list(drawing.SHAPE_NAMES)
    if not 2 <= num_classes <= len(names):
        raise ValueError(f"num_classes must be in 2..{len(names)}, got {num_classes}")
    return sorted(names[:num_classes])


def draw_cls_image(rng: np.random.Generator, shape: str, size: int, style: str = "random") -> np.ndarray:
    """One RGB uint8 (size, size, 3) image of ``shape`` (``style``: see ``drawing.STYLES``)."""
    hw = (size, size)
    img = drawing.style_background(rng, hw, style)
    alpha = drawing.random_shape_alpha(rng, shape, hw, radius_range=(0.25, 0.42))
    return drawing.finish_in_style(rng, drawing.paint_in_style(rng, img, alpha, style), style)


def make_cls_dataset(
    out_dir: str,
    num_classes: int = 10,
    train_per_class: int = 60,
    val_per_class: int = 20,
    size: int = 64,
    seed: int = 0,
    style: str = "random",
) -> Tuple[str, List[str]]:
    """Write the dataset to ``out_dir`` and return ``(out_dir, class names)``.

    Args:
        out_dir: The data root to write (``train/`` and ``val/`` inside). A folder written by
            this function before is replaced; any other non-empty folder is refused.
        num_classes: Number of shape classes, 2..12.
        train_per_class: Training images per class.
        val_per_class: Validation images per class.
        size: Image side in pixels (at least 16).
        seed: Random seed; the same arguments give identical files.
        style: ``"random"`` colours and textures, ``"plain"`` white shapes on black (quick checks),
            or ``"photo"``: light or dark shapes over crops of photographs (see ``drawing.STYLES``).
    """
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    names = class_names(num_classes)
    drawing.check_style(style)
    prepare_output(out_dir, ("train", "val"), "make_cls_dataset")
    for split_index, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for name in names:
            # One generator per (split, class): adding classes or images never changes others.
            label = drawing.SHAPE_NAMES.index(name)
            rng = np.random.default_rng([seed, split_index, label])
            folder = os.path.join(out_dir, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                Image.fromarray(draw_cls_image(rng, name, size, style)).save(os.path.join(folder, f"{name}_{i:04d}.png"))
    write_marker(out_dir, "cls", names, seed, style, train_per_class=train_per_class, val_per_class=val_per_class,
                 size=size)
    return out_dir, names
