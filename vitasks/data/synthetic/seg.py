"""A small semantic segmentation dataset in the ADE20K layout whose object classes differ only
in shape.

``images/{training,validation}/*.jpg`` and ``annotations/{training,validation}/*.png``: one to
four shapes (the classes of :mod:`vitasks.data.synthetic.drawing`: disc, ring, triangle, ...) at
random positions, sizes and rotations, in random colours and textures, over a random textured
background; later shapes may cover earlier ones. As in many real sets the background is a class
of its own: with ``num_classes`` K, label 1 is ``background`` and labels 2..K are K - 1 shapes;
the shapes' soft (anti-aliased) edges are left as 0 ("other"), which ADE20K readers ignore with
``reduce_zero_label`` (classes 0..K-1 after it). ``classes.txt`` names the K classes in label
order; ``synthetic.json`` records the parameters. The same arguments give the same files.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from vitasks.data.synthetic import drawing
from vitasks.data.synthetic.layout import prepare_output, write_marker

BACKGROUND = "background"
#: Largest K: the background and every shape.
MAX_CLASSES = 1 + len(drawing.SHAPE_NAMES)


def seg_class_names(num_classes: int) -> list[str]:
    """Names of the K classes in label order (label 1 first): background, then K - 1 shapes."""
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"make_seg_dataset: num_classes must be in 2..{MAX_CLASSES}, got {num_classes}")
    return [BACKGROUND, *drawing.SHAPE_NAMES[: num_classes - 1]]


def draw_seg_sample(
    rng: np.random.Generator, size: int, num_classes: int, style: str = "random"
) -> tuple[np.ndarray, np.ndarray]:
    """One image (RGB uint8) and its label map (uint8, ADE values: 0 edge, 1 background, 2..K);
    ``style``: see ``drawing.STYLES``."""
    hw = (size, size)
    img = drawing.style_background(rng, hw, style)
    label = np.ones(hw, np.uint8)
    for _ in range(int(rng.integers(1, 5))):
        shape_index = int(rng.integers(num_classes - 1))
        alpha = drawing.random_shape_alpha(rng, drawing.SHAPE_NAMES[shape_index], hw, radius_range=(0.12, 0.3))
        img = drawing.paint_in_style(rng, img, alpha, style)
        label[alpha >= 0.5] = shape_index + 2
        label[(alpha > 0.1) & (alpha < 0.5)] = 0  # anti-aliased edge: neither class
    return drawing.finish_in_style(rng, img, style), label


def make_seg_dataset(
    out_dir: str,
    seed: int = 0,
    num_train: int = 300,
    num_val: int = 80,
    img_size: int = 96,
    num_classes: int = 11,
    style: str = "random",
) -> str:
    """Write the dataset into ``out_dir`` (the config's ``data_root``) and return it.

    Args:
        out_dir: output folder; a folder written by this function before is replaced, any other
            non-empty folder is refused.
        seed: random seed (the same arguments write the same files).
        num_train: images in ``training``.
        num_val: images in ``validation``.
        img_size: side of the square images (at least 16).
        num_classes: K classes: the background (label 1) and K - 1 shapes (labels 2..K); 2..13.
        style: ``"random"`` colours and textures, ``"plain"`` white shapes on black (quick checks),
            or ``"photo"``: light or dark shapes over crops of photographs (see ``drawing.STYLES``).
    """
    names = seg_class_names(num_classes)
    drawing.check_style(style)
    if img_size < 16:
        raise ValueError(f"make_seg_dataset: img_size must be at least 16 pixels, got {img_size}")
    prepare_output(out_dir, ("images", "annotations"), "make_seg_dataset")
    for split_index, (split, count) in enumerate((("training", num_train), ("validation", num_val))):
        img_dir = os.path.join(out_dir, "images", split)
        ann_dir = os.path.join(out_dir, "annotations", split)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        for i in range(count):
            # One generator per image: changing the counts never changes the other images.
            img, label = draw_seg_sample(np.random.default_rng([seed, split_index, i]), img_size, num_classes, style)
            name = f"synthetic_{split}_{i:05d}"
            cv2.imwrite(os.path.join(img_dir, name + ".jpg"), img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
            cv2.imwrite(os.path.join(ann_dir, name + ".png"), label)
    with open(os.path.join(out_dir, "classes.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(names) + "\n")
    write_marker(out_dir, "seg", names, seed, style, num_train=num_train, num_val=num_val, img_size=img_size)
    return out_dir
