"""Segmentation transforms that albumentations does not provide.

Flips and padding go through the shared ``Albu`` adaptor (it moves ``gt_seg_map`` with the
image); these cover what it lacks:

- :class:`LoadSegAnnotations`: read a label map, apply ``reduce_zero_label``, and reject label
  values that are neither a class nor the ignore index, or a size that differs from the image's;
- :class:`SegResize` / :class:`SegRandomResize`: mmseg's keep-ratio resize to a ``(long, short)``
  scale (the image is scaled to fit within it), the random one with a ratio drawn per sample;
- :class:`SegRandomCrop`: a random crop that retries while one class covers more than
  ``cat_max_ratio`` of the crop's labelled pixels;
- :class:`PhotoMetricDistortion`: mmseg's colour jitter exactly (uint8 steps with its clipping and
  truncation, OpenCV's uint8 HSV).

Shapes are (H, W); scales are given as mmseg writes them, e.g. ``(2048, 512)`` meaning an image
scaled so that its long side is at most 2048 and its short side at most 512.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image

from vitasks.data.seeding import sample_rng
from vitasks.data.seg_labels import reduce_zero
from vitasks.data.transforms import BaseTransform, read_with_pil
from vitasks.checks import InRange, IntPair, OneOf, checked, config_key
from vitasks.errors import ConfigError, DataError
from vitasks.registry import TRANSFORMS

_INTERP = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC,
           "area": cv2.INTER_AREA}


def read_label_map(path: str) -> np.ndarray:
    """Read a label PNG as its raw integer values (a palette PNG gives indices, not colours)."""
    def decode(im: Image.Image) -> np.ndarray:
        if im.mode not in ("L", "P", "I", "I;16", "1"):
            raise DataError(f"label map {path} has mode {im.mode}; expected a single-channel (L, P or 16-bit) PNG "
                            "of class ids")
        return np.asarray(im).astype(np.int64 if im.mode.startswith("I") else np.uint8)

    return read_with_pil(path, "label map", decode, missing="label file")


@TRANSFORMS.register_module()
class LoadSegAnnotations(BaseTransform):
    """Read ``results["seg_map_path"]`` into ``results["gt_seg_map"]`` (HW uint8, int64 if a
    value exceeds 255).

    Uses ``reduce_zero_label``, ``num_classes`` and ``ignore_index`` from the sample (datasets set
    them). Raises DataError naming the file when the label map's size differs from the image's
    ``ori_shape`` or a value is neither a class id (0..K-1) nor the ignore index.

    Args:
        reduce_zero_label: overrides the sample's setting when not ``None``.
    """

    def __init__(self, reduce_zero_label: bool | None = None) -> None:
        self.reduce_zero_label = reduce_zero_label

    def transform(self, results: dict) -> dict:
        path = results.get("seg_map_path")
        if path is None:
            raise DataError(
                f"LoadSegAnnotations: sample {results.get('img_path', '?')} has no label file "
                "(seg_map_path); the dataset needs an ann_dir"
            )
        label = read_label_map(path)
        ori_shape = results.get("ori_shape")
        if ori_shape is not None and tuple(label.shape[:2]) != tuple(ori_shape[:2]):
            raise DataError(
                f"label map {path} has size {label.shape[0]}x{label.shape[1]} (HxW) but its image "
                f"{results.get('img_path', '?')} has size {ori_shape[0]}x{ori_shape[1]}"
            )
        ignore_index = int(results.get("ignore_index", 255))
        reduce = self.reduce_zero_label
        if reduce is None:
            reduce = bool(results.get("reduce_zero_label", False))
        if reduce:
            label = reduce_zero(label, ignore_index)
        num_classes = results.get("num_classes")
        if num_classes is not None:
            bad = (label != ignore_index) & ((label < 0) | (label >= num_classes))
            if bad.any():
                values = np.unique(label[bad])
                raw = values + 1 if reduce else values
                shown = ", ".join(str(int(v)) for v in raw[:5]) + (", ..." if raw.size > 5 else "")
                raise DataError(
                    f"label map {path} has value(s) {shown} that are neither a class "
                    f"(0..{num_classes - 1}{', stored as 1..' + str(num_classes) if reduce else ''}"
                    f") nor the ignore value {ignore_index}"
                    f"{' (0 with reduce_zero_label)' if reduce else ''}; check num_classes"
                )
        results["gt_seg_map"] = label.astype(np.uint8) if label.max(initial=0) <= 255 else label
        results.setdefault("seg_fields", []).append("gt_seg_map")
        return results


def check_ratio_range(ratio_range: Sequence[float], key: str, low_open: bool = True) -> tuple[float, float]:
    """A ``[min, max]`` range of factors with ``0 < min <= max`` (``0 <= min`` unless ``low_open``):
    a random resize's ratios, a photometric distortion's contrast or saturation."""
    ok = isinstance(ratio_range, (list, tuple)) and len(ratio_range) == 2
    if not ok or not (0 < ratio_range[0] if low_open else 0 <= ratio_range[0]) or ratio_range[0] > ratio_range[1]:
        raise ConfigError(f"{key} must be [min, max] with 0 {'<' if low_open else '<='} min <= max, got {ratio_range!r}")
    return float(ratio_range[0]), float(ratio_range[1])


def rescaled_size(height: int, width: int, scale: tuple[float, float]) -> tuple[int, int]:
    """(H, W) after a keep-ratio resize into ``scale``: the factor is the largest that keeps the
    long side within max(scale) and the short side within min(scale) (mmcv's ``rescale_size``)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_sample(results: dict, size: tuple[int, int], interpolation: str) -> dict:
    """Resize ``img`` (given interpolation) and ``gt_seg_map`` if present (nearest) to (H, W)."""
    height, width = size
    img = results["img"]
    old_h, old_w = img.shape[:2]
    if (old_h, old_w) != (height, width):
        results["img"] = cv2.resize(img, (width, height), interpolation=_INTERP[interpolation])
        if results["img"].ndim == 2 and img.ndim == 3:
            results["img"] = results["img"][:, :, None]
        for key in results.get("seg_fields", ["gt_seg_map"]):
            if results.get(key) is not None:
                results[key] = cv2.resize(
                    results[key], (width, height), interpolation=cv2.INTER_NEAREST
                ) if results[key].dtype == np.uint8 else _resize_nearest_int(results[key], size)
    results["img_shape"] = (height, width)
    results["scale_factor"] = (width / old_w, height / old_h)
    return results


def _resize_nearest_int(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest resize for label maps OpenCV cannot resize (int64)."""
    height, width = size
    rows = np.minimum((np.arange(height) + 0.5) * label.shape[0] / height, label.shape[0] - 1)
    cols = np.minimum((np.arange(width) + 0.5) * label.shape[1] / width, label.shape[1] - 1)
    return label[rows.astype(np.int64)][:, cols.astype(np.int64)]


@TRANSFORMS.register_module()
class SegResize(BaseTransform):
    """Resize the image (and a loaded label map, nearest) to a scale.

    Args:
        scale: ``(long, short)`` bound with ``keep_ratio`` (mmseg's ``(2048, 512)``), or the exact
            ``(W, H)`` without.
        keep_ratio: scale to fit within ``scale`` keeping the aspect ratio.
        interpolation: image interpolation: ``bilinear`` (mmseg's), ``bicubic``, ``area``, ``nearest``.
    """

    @checked
    def __init__(
        self, scale: IntPair = (2048, 512), keep_ratio: bool = True, interpolation: OneOf(*_INTERP) = "bilinear"
    ) -> None:
        self.scale = scale
        self.keep_ratio = bool(keep_ratio)
        self.interpolation = interpolation

    def _target(self, height: int, width: int, scale: tuple[float, float]) -> tuple[int, int]:
        if self.keep_ratio:
            return rescaled_size(height, width, scale)
        return int(scale[1] + 0.5), int(scale[0] + 0.5)

    def transform(self, results: dict) -> dict:
        height, width = results["img"].shape[:2]
        return resize_sample(results, self._target(height, width, self.scale), self.interpolation)


@TRANSFORMS.register_module()
class SegRandomResize(SegResize):
    """mmseg's ``RandomResize(scale, ratio_range, keep_ratio=True)``: the scale is multiplied by
    ``r ~ U(ratio_range)`` per sample and truncated to integers (``int(2048 * r)``, as mmcv), then
    the image is resized as :class:`SegResize` does.

    Args:
        scale: base ``(long, short)`` scale, e.g. ``(2048, 512)``.
        ratio_range: ``(min, max)`` of the random ratio, e.g. ``(0.5, 2.0)``.
        keep_ratio: as :class:`SegResize`.
        interpolation: as :class:`SegResize`.
    """

    def __init__(
        self,
        scale: Sequence[int] = (2048, 512),
        ratio_range: Sequence[float] = (0.5, 2.0),
        keep_ratio: bool = True,
        interpolation: str = "bilinear",
    ) -> None:
        super().__init__(scale, keep_ratio, interpolation)
        self.ratio_range = check_ratio_range(ratio_range, config_key("ratio_range", default=self.config_key))

    def transform(self, results: dict) -> dict:
        ratio = sample_rng(results).uniform(*self.ratio_range)
        # Truncated to whole pixels before the keep-ratio rule, as mmcv's RandomResize does.
        scale = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        height, width = results["img"].shape[:2]
        return resize_sample(results, self._target(height, width, scale), self.interpolation)


@TRANSFORMS.register_module()
class SegRandomCrop(BaseTransform):
    """Random crop of ``crop_size`` (smaller images are kept whole along that side), retried up to
    ``max_tries`` times while one class covers ``cat_max_ratio`` or more of the crop's labelled
    pixels (or only one class is present), as mmseg's ``RandomCrop``.

    Args:
        crop_size: ``(H, W)`` of the crop.
        cat_max_ratio: the largest share one class may take; 1.0 disables the check.
        ignore_index: label value not counted in the shares.
        max_tries: crops drawn before the last one is kept.
    """

    @checked
    def __init__(
        self,
        crop_size: IntPair = (512, 512),
        cat_max_ratio: InRange(0, 1, low_open=True) = 1.0,
        ignore_index: int = 255,
        max_tries: int = 10,
    ) -> None:
        self.crop_size = crop_size
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = int(ignore_index)
        self.max_tries = int(max_tries)

    def _random_box(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        margin_h = max(height - self.crop_size[0], 0)
        margin_w = max(width - self.crop_size[1], 0)
        y0 = int(rng.integers(0, margin_h + 1))
        x0 = int(rng.integers(0, margin_w + 1))
        return y0, min(y0 + self.crop_size[0], height), x0, min(x0 + self.crop_size[1], width)

    def transform(self, results: dict) -> dict:
        height, width = results["img"].shape[:2]
        rng = sample_rng(results)
        box = self._random_box(height, width, rng)
        label = results.get("gt_seg_map")
        if self.cat_max_ratio < 1.0 and label is not None:
            for _ in range(self.max_tries):
                y0, y1, x0, x1 = box
                counts = np.bincount(label[y0:y1, x0:x1].reshape(-1).astype(np.int64))
                if self.ignore_index < counts.size:
                    counts[self.ignore_index] = 0
                counts = counts[counts > 0]
                if counts.size > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = self._random_box(height, width, rng)
        y0, y1, x0, x1 = box
        results["img"] = np.ascontiguousarray(results["img"][y0:y1, x0:x1])
        for key in results.get("seg_fields", ["gt_seg_map"]):
            if results.get(key) is not None:
                results[key] = np.ascontiguousarray(results[key][y0:y1, x0:x1])
        results["img_shape"] = (y1 - y0, x1 - x0)
        return results


@TRANSFORMS.register_module()
class PhotoMetricDistortion(BaseTransform):
    """mmsegmentation's ``PhotoMetricDistortion``, step for step, on ``results["img"]`` (RGB uint8).

    mmseg's definition (``mmseg/datasets/transforms/transforms.py``): each step fires with
    probability 1/2 and works on uint8 pixels as ``uint8(clip(float32(x) * alpha + beta, 0,
    255))`` (a truncation, not a rounding):

    1. brightness: ``beta ~ U(-brightness_delta, brightness_delta)``;
    2. a mode draw: contrast here (``alpha ~ U(contrast_range)``) or as the last step;
    3. saturation: to HSV (OpenCV on uint8: H in 0..179, S and V in 0..255), ``S`` by ``alpha ~
       U(saturation_range)`` with the same clip and truncation, back to RGB;
    4. hue: to HSV, ``H = (H + d) mod 180`` with ``d`` an integer in ``[-hue_delta, hue_delta)``
       (numpy's ``randint`` leaves the upper bound out: -18..17), back to RGB;
    5. contrast, when the mode draw put it last.

    mmseg's images are BGR; OpenCV's BGR->HSV of a BGR pixel equals its RGB->HSV of the same pixel
    in RGB order, so the results are the same pixels. Draws come from the sample's generator, in
    mmseg's order (:meth:`draw`), and are applied by :meth:`apply`.

    Args:
        brightness_delta: largest brightness shift (32).
        contrast_range: ``(low, high)`` of the contrast factor ((0.5, 1.5)).
        saturation_range: ``(low, high)`` of the saturation factor ((0.5, 1.5)).
        hue_delta: hue shift bound in OpenCV units of 2 degrees (18).
    """

    @checked
    def __init__(
        self,
        brightness_delta: InRange(0) = 32,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: InRange(0, 180) = 18,
    ) -> None:
        self.brightness_delta = brightness_delta
        self.contrast_range, self.saturation_range = (
            check_ratio_range(value, config_key(key, default=self.config_key), low_open=False)
            for key, value in (("contrast_range", contrast_range), ("saturation_range", saturation_range)))
        self.hue_delta = int(hue_delta)

    def draw(self, rng: np.random.Generator) -> dict:
        """The sample's parameters, in mmseg's order of draws; ``None`` for a step that does not
        fire. Keys: ``brightness`` (beta), ``contrast_first`` (the mode draw), ``contrast``
        (alpha), ``saturation`` (alpha), ``hue`` (integer shift)."""
        params: dict = {"brightness": None, "contrast": None, "saturation": None, "hue": None}
        if rng.integers(2):
            params["brightness"] = float(rng.uniform(-self.brightness_delta, self.brightness_delta))
        params["contrast_first"] = bool(rng.integers(2) == 1)

        def contrast() -> None:
            if rng.integers(2):
                params["contrast"] = float(rng.uniform(*self.contrast_range))

        if params["contrast_first"]:
            contrast()
        if rng.integers(2):
            params["saturation"] = float(rng.uniform(*self.saturation_range))
        if rng.integers(2):
            params["hue"] = int(rng.integers(-self.hue_delta, self.hue_delta)) if self.hue_delta else 0
        if not params["contrast_first"]:
            contrast()
        return params

    @staticmethod
    def _convert(img: np.ndarray, alpha: float = 1, beta: float = 0) -> np.ndarray:
        out = img.astype(np.float32) * alpha + beta
        return np.clip(out, 0, 255).astype(np.uint8)

    def apply(self, img: np.ndarray, params: dict) -> np.ndarray:
        """The distortion with drawn ``params`` on an RGB uint8 HxWx3 image."""
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"PhotoMetricDistortion needs an RGB HxWx3 image, got shape {img.shape}")
        if img.dtype != np.uint8:
            raise ValueError(f"PhotoMetricDistortion needs a uint8 image (mmseg's steps), got {img.dtype}")
        if params["brightness"] is not None:
            img = self._convert(img, beta=params["brightness"])
        if params["contrast_first"] and params["contrast"] is not None:
            img = self._convert(img, alpha=params["contrast"])
        if params["saturation"] is not None:
            hsv = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2HSV)
            hsv[:, :, 1] = self._convert(hsv[:, :, 1], alpha=params["saturation"])
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if params["hue"] is not None:
            hsv = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2HSV)
            hsv[:, :, 0] = (hsv[:, :, 0].astype(np.int64) + params["hue"]) % 180
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if not params["contrast_first"] and params["contrast"] is not None:
            img = self._convert(img, alpha=params["contrast"])
        return img

    def transform(self, results: dict) -> dict:
        results["img"] = self.apply(results["img"], self.draw(sample_rng(results)))
        return results
