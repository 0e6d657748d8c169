"""A small generated depth dataset: rooms with a floor, a back wall and boxes at depths.

The image carries the cues a monocular model can learn: the floor recedes to a horizon, each
box stands on the floor (its bottom edge's row gives its distance) and is drawn smaller and
hazier (mixed with a grey fog) the farther it is. Depth is written in millimetres as 16-bit
PNG; a few pixels are left at 0 (invalid), as real sensors leave holes.

    python -m vitasks_depth.generate data/synthetic/depth [--size 64] [--train 160] [--val 40]
"""

from __future__ import annotations

import argparse
import os

import cv2
import numpy as np

FOG = np.array([170.0, 170.0, 180.0])
CAMERA_HEIGHT = 1.5  # metres
FOCAL = 0.9  # in image heights


def _fogged(colour: np.ndarray, depth: np.ndarray, far: float) -> np.ndarray:
    mix = np.clip(depth / far, 0.0, 1.0)[..., None]
    return colour * (1 - mix) + FOG * mix


def render_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One RGB uint8 image and its depth (float metres, 0 = invalid), both ``size`` x ``size``."""
    rows = np.arange(size, dtype=np.float64)[:, None].repeat(size, 1)
    horizon = size * rng.uniform(0.3, 0.45)
    wall = rng.uniform(6.0, 10.0)
    far = 12.0
    # floor: a pixel below the horizon sees the ground at CAMERA_HEIGHT * f / (row - horizon)
    below = np.maximum(rows - horizon, 1e-3)
    depth = np.minimum(CAMERA_HEIGHT * FOCAL * size / below, wall)
    depth[rows <= horizon] = wall
    floor_colour = rng.uniform(60, 140, 3)
    wall_colour = rng.uniform(100, 220, 3)
    colour = np.where((depth < wall)[..., None], floor_colour, wall_colour)
    # stripes on the floor, evenly spaced in metres: denser with distance (a texture gradient)
    stripes = (np.floor(depth / 0.5) % 2 == 0) & (depth < wall)
    colour = np.where(stripes[..., None], colour * 0.75, colour)
    for _ in range(int(rng.integers(1, 4))):
        d = rng.uniform(2.0, wall - 0.5)
        bottom = horizon + CAMERA_HEIGHT * FOCAL * size / d  # where the floor is at depth d
        height = rng.uniform(0.6, 1.4) * FOCAL * size / d
        width = rng.uniform(0.4, 1.2) * FOCAL * size / d
        left = rng.uniform(-width / 2, size - width / 2)
        box = ((rows >= bottom - height) & (rows < bottom) & (rows.T >= left)
               & (rows.T < left + width) & (depth > d))
        depth[box] = d
        colour[box] = rng.uniform(0, 255, 3)
    image = _fogged(colour, depth, far) + rng.normal(0, 3, colour.shape)
    holes = rng.random((size, size)) < 0.01
    depth = np.where(holes, 0.0, depth)
    return np.clip(image, 0, 255).astype(np.uint8), depth


def write_dataset(out: str, size: int = 64, train: int = 160, val: int = 40, seed: int = 0) -> None:
    """Write ``images/{train,val}/*.png`` and ``depth/{train,val}/*.png`` (mm, uint16) to ``out``."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        os.makedirs(os.path.join(out, "images", split), exist_ok=True)
        os.makedirs(os.path.join(out, "depth", split), exist_ok=True)
        for i in range(count):
            image, depth = render_scene(rng, size)
            name = f"{split}_{i:05d}.png"
            cv2.imwrite(os.path.join(out, "images", split, name), image[:, :, ::-1])
            millimetres = np.round(depth * 1000.0).astype(np.uint16)
            cv2.imwrite(os.path.join(out, "depth", split, name), millimetres)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--train", type=int, default=160)
    parser.add_argument("--val", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_dataset(args.out, args.size, args.train, args.val, args.seed)
    print(f"wrote {args.train} + {args.val} scenes to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
