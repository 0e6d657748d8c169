"""A small video dataset in the Kinetics list layout whose class is the direction of motion.

Each clip shows a scene moving in one of 4 directions (``left``, ``right``, ``up``, ``down``; 8
with the diagonals): either one object (a random shape of :mod:`~vitasks.data.synthetic.drawing`
in a random colour, size and texture) slides over a still, textured background, or the whole
scene pans (the camera moves, so the content slides the other way: the class is always the
direction the content moves on screen). Speeds, shapes, colours, backgrounds, a still distractor
shape and fresh pixel noise in every frame are drawn independently of the class, and a sliding
object wraps around the frame edges (it leaves on one side and comes back on the other), so any
single frame, at any time, has the same distribution in every class: only motion tells them apart.
In the ``"photo"`` style (see ``drawing.STYLES``) the backgrounds are crops of a photograph and
the shapes light or dark; a sliding object's still background drifts slowly in a random direction
(:data:`MAX_DRIFT`), as under a hand-held camera.

Written as ``train/<class>/<class>_<i>.mp4`` and ``val/...`` (H.264 through PyAV), the lists
``train.txt`` and ``val.txt`` (``train/left/left_0000.mp4 0``), ``classes.txt`` (the names in
label order) and ``synthetic.json`` (the parameters). The same arguments give the same files,
byte for byte, on every run with the same PyAV build, whatever the machine's load, threads or CPU
features: x264 runs single-threaded on its plain C code (see :data:`X264_OPTIONS`). Another
FFmpeg/x264 build writes other bytes (its version strings, its encoder's decisions).
"""

from __future__ import annotations

import os
from typing import Dict, List, Tuple

import numpy as np

from vitasks.data.synthetic import drawing
from vitasks.data.synthetic.layout import prepare_output, write_marker
from vitasks.data.video_io import import_av

# Direction name -> unit step (dx, dy) of the content on screen; y grows downwards.
DIRECTIONS: Dict[str, Tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
    "up_left": (-1, -1),
    "up_right": (1, -1),
    "down_left": (-1, 1),
    "down_right": (1, 1),
}


def class_names(num_classes: int) -> List[str]:
    """The direction names of ``num_classes`` (4: left, right, up, down; 8: with diagonals), in
    label order."""
    if num_classes not in (4, 8):
        raise ValueError(f"num_classes must be 4 or 8 directions, got {num_classes}")
    return list(DIRECTIONS)[:num_classes]


#: Fastest drift (pixels per frame) of the ``"photo"`` style's still backgrounds: slow next to
#: the class motion (at least 1 pixel per frame), like a hand-held camera's.
MAX_DRIFT = 0.3


def render_clip(
    rng: np.random.Generator, direction: Tuple[int, int], size: int, num_frames: int, speed_range: Tuple[int, int],
    style: str = "random",
) -> np.ndarray:
    """Frames ``(num_frames, size, size, 3)`` uint8 of a scene whose content moves by
    ``direction x speed`` pixels per frame (speed drawn from ``speed_range``, inclusive), drawn
    in ``style`` (see ``drawing.STYLES``)."""
    speed = int(rng.integers(speed_range[0], speed_range[1] + 1))
    step = np.array(direction) * speed  # (dx, dy) per frame
    shapes = drawing.SHAPE_NAMES
    if rng.random() < 0.5:
        return _panning_scene(rng, step, size, num_frames, shapes, style)
    return _sliding_object(rng, step, size, num_frames, shapes, style)


def _place_shape(rng: np.random.Generator, img: np.ndarray, shapes, style: str,
                 radius_range=(0.15, 0.3)) -> np.ndarray:
    """``img`` with one random shape painted at a random place."""
    alpha = drawing.random_shape_alpha(rng, str(rng.choice(shapes)), img.shape[:2], radius_range)
    return drawing.paint_in_style(rng, img, alpha, style)


def _sliding_object(rng, step, size, num_frames, shapes, style) -> np.ndarray:
    """One object slides over a still background, wrapping around the frame edges. In the
    ``"photo"`` style the background drifts slowly in a random direction (up to
    :data:`MAX_DRIFT` pixels per frame, whole pixels at a time), whatever the class."""
    drift, pad = np.zeros(2), 0
    if style == "photo":
        angle = rng.uniform(0, 2 * np.pi)
        drift = rng.uniform(0, MAX_DRIFT) * np.array([np.cos(angle), np.sin(angle)])
        pad = int(np.ceil(MAX_DRIFT * (num_frames - 1)))
    scene = drawing.style_background(rng, (size + 2 * pad, size + 2 * pad), style)
    if rng.random() < 0.5:  # a still distractor: something is there that does not move
        scene = _place_shape(rng, scene, shapes, style)
    # The object drawn once at the centre, as coverage and premultiplied colour, then rolled.
    radius = rng.uniform(0.15, 0.28) * size
    alpha = drawing.shape_alpha(str(rng.choice(shapes)), (size, size), (size / 2, size / 2), radius,
                                rng.uniform(-35, 35), aspect=rng.uniform(0.8, 1.2))
    view = scene[pad:pad + size, pad:pad + size]
    if style == "plain":
        colour = 255.0 * alpha[..., None]
    else:
        colour = (drawing.paint_in_style(rng, view, alpha, style, min_contrast=drawing.VISIBLE_CONTRAST)
                  - view * (1.0 - alpha[..., None]))
    start = rng.integers(0, size, 2)  # (x, y): uniform over the torus, whatever the class
    frames = []
    for t in range(num_frames):
        x, y = pad + np.rint(drift * t).astype(int)
        view = scene[y:y + size, x:x + size]
        dx, dy = start + step * t
        a = np.roll(alpha, (int(dy), int(dx)), axis=(0, 1))[..., None]
        c = np.roll(colour, (int(dy), int(dx)), axis=(0, 1))
        frames.append(drawing.finish_in_style(rng, view * (1.0 - a) + c, style))
    return np.stack(frames)


def _panning_scene(rng, step, size, num_frames, shapes, style) -> np.ndarray:
    """A window moves over a larger scene, so everything in view slides by ``step`` per frame."""
    travel = np.abs(step) * (num_frames - 1)
    height, width = size + int(travel[1]), size + int(travel[0])
    scene = drawing.style_background(rng, (height, width), style, max_clutter=3)
    for _ in range(int(rng.integers(1, 4))):
        scene = _place_shape(rng, scene, shapes, style, radius_range=(0.1, 0.2))
    # Content moving by +step means the window moving by -step.
    origin = np.where(step > 0, travel, 0)
    frames = []
    for t in range(num_frames):
        x, y = origin - step * t
        frames.append(drawing.finish_in_style(rng, scene[y:y + size, x:x + size], style))
    return np.stack(frames)


# x264 options that make the bytes a function of the frames alone. ``threads=1``: no frame or
# lookahead threads. ``asm=0``: x264's C code instead of the assembly chosen for the CPU. The
# assembly is not bit-exact across instruction sets (the C, AVX2 and AVX-512 paths give different
# bitstreams for the same frames), and its AVX-512 macroblock-tree code (x264 core 165, in PyAV
# 18's wheels) reads uninitialised heap memory on these small frames: on AVX-512 machines the
# same frames encoded to different bytes depending on what the process had allocated and freed
# before (measured: with MALLOC_PERTURB_ set, the bytes changed with its value; with asm=0, or
# with mbtree=0, they did not; valgrind finds no uninitialised read in the C path). The C path
# costs ~30 ms more per 48 px, 16-frame clip (~10 s for the default set).
X264_OPTIONS = {"crf": "18", "threads": "1", "preset": "fast", "x264-params": "asm=0"}


def write_mp4(path: str, frames: np.ndarray, fps: int = 8, keyframe_interval: int = 8) -> None:
    """Encode RGB uint8 frames ``(T, H, W, 3)`` as H.264 in MP4 (yuv420p, even sides), with a
    keyframe at least every ``keyframe_interval`` frames; deterministic (:data:`X264_OPTIONS`)."""
    av = import_av()
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"H.264 (yuv420p) needs even frame sides, got {height}x{width}")
    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = keyframe_interval
        stream.codec_context.options = dict(X264_OPTIONS)
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_video_dataset(
    out_dir: str,
    seed: int = 0,
    num_classes: int = 4,
    train_per_class: int = 60,
    val_per_class: int = 20,
    size: int = 48,
    num_frames: int = 16,
    speed_range: Tuple[int, int] = (1, 2),
    fps: int = 8,
    keyframe_interval: int = 8,
    style: str = "random",
) -> str:
    """Write the dataset to ``out_dir`` (its data_root) and return ``out_dir``.

    Args:
        out_dir: Output folder (created; an earlier generated dataset there is replaced).
        seed: Random seed: the same arguments give the same files.
        num_classes: 4 (left, right, up, down) or 8 (with diagonals).
        train_per_class, val_per_class: Clips per class in each split (balanced).
        size: Frame side in pixels (even).
        num_frames: Frames per clip.
        speed_range: Content speed in pixels per frame (inclusive range).
        fps: Frame rate written in the files.
        keyframe_interval: Largest distance between keyframes (so readers seek, not only decode).
        style: ``"random"`` colours and textures, ``"plain"`` white shapes on black (quick checks),
            or ``"photo"``: light or dark shapes over crops of photographs, still backgrounds
            drifting slowly (see ``drawing.STYLES``).
    """
    names = class_names(num_classes)
    drawing.check_style(style)
    if num_frames < 2:
        raise ValueError(f"num_frames must be at least 2 (motion needs two frames), got {num_frames}")
    prepare_output(out_dir, ("train", "val", "train.txt", "val.txt", "classes.txt"), "make_video_dataset")
    with open(os.path.join(out_dir, "classes.txt"), "w", encoding="utf-8") as f:
        f.write("".join(n + "\n" for n in names))
    for split_index, (split, per_class) in enumerate((("train", train_per_class), ("val", val_per_class))):
        lines = []
        for label, name in enumerate(names):
            folder = os.path.join(out_dir, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                # One generator per clip: a clip does not depend on how many others are made.
                rng = np.random.default_rng([seed, split_index, label, i])
                frames = render_clip(rng, DIRECTIONS[name], size, num_frames, speed_range, style)
                relative = f"{split}/{name}/{name}_{i:04d}.mp4"
                write_mp4(os.path.join(out_dir, relative), frames, fps, keyframe_interval)
                lines.append(f"{relative} {label}\n")
        with open(os.path.join(out_dir, f"{split}.txt"), "w", encoding="utf-8") as f:
            f.writelines(lines)
    write_marker(out_dir, "video", names, seed, style, train_per_class=train_per_class, val_per_class=val_per_class,
                 size=size, num_frames=num_frames, speed_range=list(speed_range), fps=fps,
                 keyframe_interval=keyframe_interval)
    return out_dir
