"""Drawing for the generated datasets: shapes that only their outline tells apart, painted in
random colours and textures over random backgrounds.

All generated datasets (``cls``, ``seg``, ``det`` and ``video``) draw with these functions, in
the same appearance styles (:data:`STYLES`, through :func:`style_background`,
:func:`paint_in_style` and :func:`finish_in_style`), so a model trained on one sees the same
kind of objects in the others. What a class is, is the shape alone: colour,
texture, size, position, rotation and background are drawn independently of it, so a model has
to look at outlines (as for real objects) rather than at colour statistics.

Shapes are described in a unit frame (x right, y down, the shape within radius ~1) as a list of
strokes: filled polygons, polygons erased again (holes) and thick polylines (glyph-like strokes).
:func:`shape_alpha` renders one at a given centre, radius and rotation, supersampled, as a
coverage map in [0, 1] (anti-aliased edges); a label map is ``alpha >= 0.5``.
"""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

import cv2
import numpy as np

# One stroke: (operation, points in the unit frame, relative thickness for "line").
Stroke = Tuple[str, np.ndarray, float]

# Rendering resolution relative to the image: edges come out anti-aliased after the area resize.
_SUPERSAMPLE = 4


def _circle(cx: float = 0.0, cy: float = 0.0, r: float = 1.0, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _regular(n: int, r: float = 1.0, start_deg: float = -90.0) -> np.ndarray:
    t = np.radians(start_deg) + 2 * math.pi * np.arange(n) / n
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    t = np.radians(-90.0) + math.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _heart(n: int = 64) -> np.ndarray:
    # The classic parametric heart curve, scaled into the unit frame (point down: y grows down).
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2.5], axis=1) / 16.5


def _pts(*xy: Tuple[float, float]) -> np.ndarray:
    return np.asarray(xy, dtype=np.float64)


#: The shape classes, in label order. Chosen so that no shape is another one mirrored or rotated
#: within the drawn rotation range; several are not mirror-symmetric (``arrow``, ``crescent``,
#: ``ell``, ``zigzag``), so horizontal flips are not label-preserving for this data.
SHAPES: Dict[str, List[Stroke]] = {
    "disc": [("fill", _circle(), 0.0)],
    "ring": [("fill", _circle(), 0.0), ("erase", _circle(r=0.55), 0.0)],
    "triangle": [("fill", _regular(3), 0.0)],
    "square": [("fill", _regular(4, r=1.0, start_deg=-45.0) * 0.85, 0.0)],
    "star": [("fill", _star(), 0.0)],
    "cross": [("fill", _pts((-0.3, -1), (0.3, -1), (0.3, 1), (-0.3, 1)), 0.0),
              ("fill", _pts((-1, -0.3), (1, -0.3), (1, 0.3), (-1, 0.3)), 0.0)],
    "crescent": [("fill", _circle(), 0.0), ("erase", _circle(0.45, -0.2, 0.85), 0.0)],
    "arrow": [("fill", _pts((-1, -0.22), (0.15, -0.22), (0.15, -0.65), (1, 0), (0.15, 0.65), (0.15, 0.22), (-1, 0.22)), 0.0)],
    "heart": [("fill", _heart(), 0.0)],
    "ell": [("line", _pts((-0.45, -1), (-0.45, 0.75), (0.75, 0.75)), 0.32)],
    "tee": [("line", _pts((-0.85, -0.7), (0.85, -0.7)), 0.32), ("line", _pts((0, -0.7), (0, 1)), 0.32)],
    "zigzag": [("line", _pts((-0.8, -0.8), (0.8, -0.8), (-0.8, 0.8), (0.8, 0.8)), 0.26)],
}
SHAPE_NAMES: Tuple[str, ...] = tuple(SHAPES)


def shape_alpha(
    shape: str,
    size: Tuple[int, int],
    centre: Tuple[float, float],
    radius: float,
    angle_deg: float,
    aspect: float = 1.0,
) -> np.ndarray:
    """Coverage map (H, W) float32 in [0, 1] of ``shape`` drawn at ``centre`` (x, y pixels) with
    ``radius`` (pixels), rotated by ``angle_deg`` and stretched by ``aspect`` along its x axis."""
    height, width = size
    s = _SUPERSAMPLE
    canvas = np.zeros((height * s, width * s), np.uint8)
    c, si = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    rotation = np.array([[c, -si], [si, c]])

    def to_pixels(points: np.ndarray) -> np.ndarray:
        xy = (points * [aspect, 1.0]) @ rotation.T * radius + centre
        return np.round(xy * s).astype(np.int32)

    for op, points, thickness in SHAPES[shape]:
        if op == "line":
            width_px = max(1, int(round(thickness * radius * s)))
            cv2.polylines(canvas, [to_pixels(points)], False, 255, width_px, cv2.LINE_8)
        else:
            cv2.fillPoly(canvas, [to_pixels(points)], 255 if op == "fill" else 0, cv2.LINE_8)
    alpha = cv2.resize(canvas, (width, height), interpolation=cv2.INTER_AREA)
    return alpha.astype(np.float32) / 255.0


def random_shape_alpha(
    rng: np.random.Generator,
    shape: str,
    size: Tuple[int, int],
    radius_range: Tuple[float, float],
    max_rotation: float = 35.0,
) -> np.ndarray:
    """:func:`shape_alpha` at a random radius (a fraction of the shorter side from
    ``radius_range``), rotation within +-``max_rotation`` degrees, slight stretch and a position
    that keeps most of the shape inside the image."""
    height, width = size
    radius = rng.uniform(*radius_range) * min(height, width)
    margin = 0.8 * radius
    cx = rng.uniform(min(margin, width / 2), max(width - margin, width / 2))
    cy = rng.uniform(min(margin, height / 2), max(height - margin, height / 2))
    return shape_alpha(
        shape, size, (cx, cy), radius, rng.uniform(-max_rotation, max_rotation), aspect=rng.uniform(0.8, 1.2)
    )


# ---------------------------------------------------------------------------------- appearance

#: Appearance styles. ``"random"``: random colours and textures (the datasets' default: only the
#: shape tells the classes apart). ``"plain"``: white shapes on black, no texture or noise; for
#: quick checks (tests, debugging), where a model can also use the white area. ``"photo"``: each
#: shape drawn light or dark (at random) over a random crop of a real photograph
#: (:func:`photo_background`), as objects appear in real images: busy backgrounds with edges
#: everywhere, and no polarity or colour that tells the object from its surroundings.
STYLES = ("random", "plain", "photo")

#: The photographs the ``"photo"`` style crops: those that ship with matplotlib (a dependency).
PHOTO_FILES = ("grace_hopper.jpg",)
_PHOTOS: List[np.ndarray] = []


def check_style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"style must be one of {list(STYLES)}, got {style!r}")
    return style


def _smooth_noise(rng: np.random.Generator, size: Tuple[int, int], cells: int, channels: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled with bicubic interpolation."""
    height, width = size
    coarse = rng.uniform(-1, 1, (cells, cells, channels)).astype(np.float32)
    out = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    return out.reshape(height, width, channels)


def _pattern(rng: np.random.Generator, size: Tuple[int, int]) -> np.ndarray:
    """A random texture multiplier (H, W, 1) around 1: none, stripes at any angle, checks or
    blotches, with a random period and phase."""
    height, width = size
    kind = int(rng.integers(4))
    if kind == 0:
        return np.ones((height, width, 1), np.float32)
    if kind == 3:
        return 1.0 + 0.2 * _smooth_noise(rng, size, int(rng.integers(3, 8)), 1)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    period = rng.uniform(3.0, 9.0)
    theta = rng.uniform(0, math.pi)
    u = (xx * math.cos(theta) + yy * math.sin(theta)) / period + rng.uniform(0, 1)
    if kind == 1:
        on = (u % 1.0) < 0.5
    else:
        v = (-xx * math.sin(theta) + yy * math.cos(theta)) / period
        on = ((u % 1.0) < 0.5) ^ ((v % 1.0) < 0.5)
    depth = rng.uniform(0.1, 0.25)
    return np.where(on, 1.0, 1.0 - depth).astype(np.float32)[..., None]


def random_colour(rng: np.random.Generator, avoid: np.ndarray | None = None, min_distance: float = 200.0) -> np.ndarray:
    """A random RGB colour (float32), at least ``min_distance`` (L1 / 3 * 3 channels) from
    ``avoid`` when given (so a shape stands out from its background)."""
    for _ in range(50):
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        if avoid is None or np.abs(colour - avoid).sum() >= min_distance:
            break
    return colour


def background(rng: np.random.Generator, size: Tuple[int, int], clutter: int = 0) -> np.ndarray:
    """A random background (H, W, 3) float32 in 0-255: a colour with low-frequency blotches, a
    random texture and ``clutter`` thin random lines (distractors that belong to no class)."""
    height, width = size
    base = rng.uniform(20, 235, 3).astype(np.float32)
    img = base + 30.0 * _smooth_noise(rng, size, int(rng.integers(2, 6)), 3)
    img = img * _pattern(rng, size)
    for _ in range(clutter):
        p0 = (int(rng.integers(width)), int(rng.integers(height)))
        p1 = (int(rng.integers(width)), int(rng.integers(height)))
        colour = tuple(float(v) for v in rng.uniform(0, 255, 3))
        cv2.line(img, p0, p1, colour, 1, cv2.LINE_AA)
    return img


def paint(rng: np.random.Generator, img: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite a shape's coverage ``alpha`` (H, W) onto ``img`` in a random colour (kept apart
    from the colour underneath), shading and texture."""
    size = img.shape[:2]
    inside = alpha > 0.5
    under = img[inside].mean(axis=0) if inside.any() else img.reshape(-1, 3).mean(axis=0)
    colour = random_colour(rng, under)
    fill = colour * (1.0 + 0.25 * _smooth_noise(rng, size, 2, 1)) * _pattern(rng, size)
    a = alpha[..., None]
    return img * (1.0 - a) + fill * a


def finish(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Add pixel noise of a random strength; clip and round to RGB uint8."""
    img = img + rng.normal(0.0, rng.uniform(2.0, 10.0), img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------- photographs


def photographs() -> List[np.ndarray]:
    """The photographs of :data:`PHOTO_FILES` as RGB float32 arrays (read once)."""
    if not _PHOTOS:
        from matplotlib import cbook

        for name in PHOTO_FILES:
            path = str(cbook.get_sample_data(name, asfileobj=False))
            bgr = cv2.imread(path, cv2.IMREAD_COLOR)
            if bgr is None:
                raise FileNotFoundError(f"the photograph {name!r} that matplotlib ships was not found at {path!r}")
            _PHOTOS.append(bgr[:, :, ::-1].astype(np.float32))
    return _PHOTOS


def photo_background(rng: np.random.Generator, size: Tuple[int, int]) -> np.ndarray:
    """A random crop (H, W, 3) float32 in 0-255 of one of :func:`photographs`: a square of 15 to
    60 % of the photograph's shorter side, resized, flipped or turned at random, its colour
    channels in a random order (so a few photographs give backgrounds of many colours). For a
    size that is not square, the middle (H, W) of the square resized to the longer side (the
    photograph's proportions are kept)."""
    height, width = size
    if height != width:
        side = max(height, width)
        square = photo_background(rng, (side, side))
        top, left = (side - height) // 2, (side - width) // 2
        return np.ascontiguousarray(square[top:top + height, left:left + width])
    photo = photographs()[int(rng.integers(len(photographs())))]
    side = int(rng.uniform(0.15, 0.6) * min(photo.shape[:2]))
    side = max(side, 8)
    top = int(rng.integers(0, photo.shape[0] - side + 1))
    left = int(rng.integers(0, photo.shape[1] - side + 1))
    crop = photo[top:top + side, left:left + side]
    crop = np.rot90(crop, int(rng.integers(4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = crop[:, :, rng.permutation(3)]
    return cv2.resize(np.ascontiguousarray(crop), (width, height), interpolation=cv2.INTER_AREA)


def paint_light_or_dark(rng: np.random.Generator, img: np.ndarray, alpha: np.ndarray,
                        min_contrast: float = 0.0) -> np.ndarray:
    """Composite a shape's coverage ``alpha`` onto ``img`` in a light or a dark colour (one or the
    other at random, whatever lies underneath), with a little shading.

    With ``min_contrast`` > 0, a colour closer than that (mean absolute difference over the
    channels) to the mean colour under the shape is swapped for its opposite (255 - colour: the
    other polarity) when that is further away, so the shape does not vanish into a background of
    its own brightness (a dark disc on a dark coat): what detection and motion need, where an
    invisible object would be a wrong label. Takes no extra random draws."""
    size = img.shape[:2]
    level = rng.uniform(180, 250) if rng.random() < 0.5 else rng.uniform(5, 75)
    colour = np.clip(level + rng.uniform(-40, 40, 3), 0, 255).astype(np.float32)
    if min_contrast > 0:
        inside = alpha > 0.5
        under = img[inside].mean(axis=0) if inside.any() else img.reshape(-1, 3).mean(axis=0)
        contrast = np.abs(colour - under).mean()
        if contrast < min_contrast and np.abs(255.0 - colour - under).mean() > contrast:
            colour = 255.0 - colour
    fill = colour * (1.0 + 0.15 * _smooth_noise(rng, size, 2, 1))
    a = alpha[..., None]
    return img * (1.0 - a) + fill * a


#: The ``min_contrast`` of :func:`paint_light_or_dark` for the generated sets whose labels need
#: every object seen (detection boxes, the motion of a clip's object).
VISIBLE_CONTRAST = 60.0


# ---------------------------------------------------------------------------------- styles


def style_background(rng: np.random.Generator, size: Tuple[int, int], style: str, max_clutter: int = 2) -> np.ndarray:
    """The background (H, W, 3) float32 of an image in ``style``: black (``"plain"``), a crop of a
    photograph (``"photo"``) or a random texture with 0 to ``max_clutter`` distractor lines."""
    if style == "plain":
        return np.zeros((*size, 3), np.float32)
    if style == "photo":
        return photo_background(rng, size)
    return background(rng, size, clutter=int(rng.integers(0, max_clutter + 1)))


def paint_in_style(rng: np.random.Generator, img: np.ndarray, alpha: np.ndarray, style: str,
                   min_contrast: float = 0.0) -> np.ndarray:
    """Composite a shape's coverage ``alpha`` onto ``img`` as ``style`` draws shapes: white with a
    black outline, so touching shapes stay apart (``"plain"``), light or dark (``"photo"``,
    :func:`paint_light_or_dark` with ``min_contrast``) or in a random colour and texture
    (``"random"``, :func:`paint`, which always keeps the colour apart from the one underneath)."""
    if style == "plain":
        edge = (alpha > 0.02).astype(np.float32)[..., None]
        return img * (1.0 - edge) + 255.0 * alpha[..., None] * edge
    if style == "photo":
        return paint_light_or_dark(rng, img, alpha, min_contrast)
    return paint(rng, img, alpha)


def finish_in_style(rng: np.random.Generator, img: np.ndarray, style: str) -> np.ndarray:
    """RGB uint8 of ``img``: :func:`finish` (pixel noise), except ``"plain"``, which is only rounded."""
    if style == "plain":
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return finish(rng, img)
