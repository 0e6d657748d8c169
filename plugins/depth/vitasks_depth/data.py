"""Depth data: the folder layout, loading 16-bit depth PNGs, resizing and cropping, a flip,
packing.

Layout (``data_root``)::

    images/train/*.png|jpg     RGB images
    depth/train/<stem>.png     16-bit PNG, depth in millimetres, 0 = no measurement
    images/val/..., depth/val/...

Resizing and cropping reuse vitasks' segmentation transforms: :class:`LoadDepth` lists
``gt_depth`` in ``results["seg_fields"]`` (mmseg's convention for the dense maps that move with the
image), and ``SegResize`` / ``SegRandomResize`` / ``SegRandomCrop`` move every listed map,
nearest-neighbour for a float map. Nearest matters for depth: an invalid (0) pixel stays 0 and no
depth is blended across an object's edge into one that exists nowhere in the scene.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch
from mmengine.dataset import BaseDataset
from mmengine.structures import PixelData

from vitasks.data.imagenet import build_pipeline
from vitasks.data.seeding import SeededSampleMixin, sample_rng
from vitasks.data.seg_transforms import SegRandomCrop, SegRandomResize, SegResize
from vitasks.data.transforms import PackInputs
from vitasks.errors import ConfigError, DataError
from vitasks.registry import DATASETS, TRANSFORMS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@DATASETS.register_module()
class DepthFolderDataset(SeededSampleMixin, BaseDataset):
    """RGB images with 16-bit PNG depth maps of the same stem (see the module docstring).

    Args:
        data_root: the dataset folder.
        split: ``train`` or ``val`` (any sub-folder name of ``images/`` and ``depth/``).
        pipeline: transforms (``LoadImage``, ``LoadDepth``, ..., ``PackDepthInputs``).
        test_mode, lazy_init, indices, serialize_data: as mmengine's ``BaseDataset``.
    """

    def __init__(self, data_root: str, split: str = "train", pipeline: Sequence[dict | Callable] = (),
                 test_mode: bool = False, lazy_init: bool = False,
                 indices: int | Sequence[int] | None = None, serialize_data: bool = True) -> None:
        owner = type(self).__name__
        if not data_root:
            raise ConfigError(f"{owner}: `data_root` is missing; set the config's `data_root`")
        self.img_dir = os.path.join(data_root, "images", split)
        self.depth_dir = os.path.join(data_root, "depth", split)
        for path in (self.img_dir, self.depth_dir):
            if not os.path.isdir(path):
                raise DataError(f"{owner}: folder {path!r} does not exist (expected images/{split} "
                                f"and depth/{split} under data_root)")
        super().__init__(ann_file="", data_root=data_root, data_prefix=dict(img_path=""),
                         indices=indices, serialize_data=serialize_data,
                         pipeline=build_pipeline(pipeline, owner), test_mode=test_mode,
                         lazy_init=lazy_init)

    def load_data_list(self) -> list[dict]:
        samples = []
        for name in sorted(os.listdir(self.img_dir)):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() not in IMAGE_SUFFIXES:
                continue
            depth_path = os.path.join(self.depth_dir, stem + ".png")
            if not os.path.isfile(depth_path):
                raise DataError(f"{type(self).__name__}: image {name} has no depth map {depth_path}")
            samples.append(dict(img_path=os.path.join(self.img_dir, name), depth_path=depth_path))
        if not samples:
            raise DataError(f"{type(self).__name__}: no images under {self.img_dir!r}")
        return samples


def read_depth(path: str, scale: float = 1000.0) -> np.ndarray:
    """A 16-bit PNG depth map as float32 metres (``value / scale``; 0 stays 0 = invalid)."""
    raw = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise DataError(f"cannot read depth map {path}")
    if raw.dtype != np.uint16 or raw.ndim != 2:
        raise DataError(f"depth map {path}: expected a one-channel 16-bit PNG, got "
                        f"{raw.dtype} with shape {raw.shape}")
    return raw.astype(np.float32) / scale


@TRANSFORMS.register_module()
class LoadDepth:
    """``results["gt_depth"]`` (float32 HxW, metres) from ``results["depth_path"]``, listed in
    ``results["seg_fields"]`` so the resize and crop transforms move it with the image.

    The map must have the image's original size (``ori_shape``): in a test pipeline it may come
    after a resize, as mmseg loads annotations, to score at the original size.

    Args:
        scale: PNG units per metre (1000: millimetres).
    """

    def __init__(self, scale: float = 1000.0) -> None:
        if scale <= 0:
            raise ConfigError(f"LoadDepth: scale must be positive, got {scale}")
        self.scale = float(scale)

    def __call__(self, results: dict) -> dict:
        depth = read_depth(results["depth_path"], self.scale)
        image_shape = results.get("ori_shape", results["img"].shape if "img" in results else None)
        if image_shape is not None and depth.shape != tuple(image_shape[:2]):
            raise DataError(f"{results['depth_path']}: depth {depth.shape} and image "
                            f"{tuple(image_shape[:2])} differ in size")
        results["gt_depth"] = depth
        _list_depth(results)
        return results


def _list_depth(results: dict) -> None:
    """Put ``gt_depth`` (if loaded) in ``seg_fields``, the maps vitasks' seg transforms move."""
    if results.get("gt_depth") is None:
        return
    fields = results.setdefault("seg_fields", [])
    if "gt_depth" not in fields:
        fields.append("gt_depth")


@TRANSFORMS.register_module()
class DepthResize(SegResize):
    """Resize the image (``interpolation``, bilinear by default) and a loaded ``gt_depth``
    (nearest) as mmseg's ``Resize(scale, keep_ratio=True)``: with ``keep_ratio`` the image is
    scaled to fit within ``scale`` = ``(long, short)``, e.g. ``[320, 80]`` makes a 480x640 image
    80x107 and a 375x1242 one 80x265 (a side over 320 would bound it instead).

    A :class:`~vitasks.data.seg_transforms.SegResize` that also moves ``gt_depth``. Arguments as
    there: ``scale``, ``keep_ratio``, ``interpolation``.
    """

    def transform(self, results: dict) -> dict:
        _list_depth(results)
        return super().transform(results)


@TRANSFORMS.register_module()
class DepthRandomResizeCrop:
    """Random scale, then a random crop, of the image and ``gt_depth`` together: mmseg's
    ``RandomResize(scale, ratio_range, keep_ratio=True)`` then ``RandomCrop(crop_size)``.

    The keep-ratio scale ``(long, short)`` is multiplied by ``r ~ U(ratio_range)``; then a window
    of ``crop_size`` (H, W) is cut at a random place, the same window from image and depth. An
    image smaller than the crop along a side keeps that side whole; the data preprocessor pads the
    batch (``DepthDataPreprocessor``: depth with 0, invalid). Both draws come from the sample's own
    generator (``vitasks.data.seeding.sample_rng``).

    Args:
        scale: base ``(long, short)`` keep-ratio bound, e.g. ``[320, 80]``.
        ratio_range: ``(min, max)`` of the random factor on ``scale``.
        crop_size: ``(H, W)`` of the crop.
        interpolation: image interpolation (depth is always nearest).
    """

    def __init__(self, scale: Sequence[int] = (320, 80), ratio_range: Sequence[float] = (0.75, 1.5),
                 crop_size: Sequence[int] = (64, 64), interpolation: str = "bilinear") -> None:
        try:
            self.resize = SegRandomResize(scale, ratio_range, keep_ratio=True, interpolation=interpolation)
            self.crop = SegRandomCrop(crop_size)
        except ConfigError as e:  # name this transform, not the parts it is made of
            raise ConfigError(f"DepthRandomResizeCrop: {e}") from e

    def __call__(self, results: dict) -> dict:
        _list_depth(results)
        return self.crop(self.resize(results))

    def __repr__(self) -> str:
        return (f"DepthRandomResizeCrop(scale={self.resize.scale}, ratio_range={self.resize.ratio_range}, "
                f"crop_size={self.crop.crop_size}, interpolation={self.resize.interpolation!r})")


@TRANSFORMS.register_module()
class DepthRandomFlip:
    """Mirror image and depth left-right with probability ``prob`` (depth is unchanged by a
    mirror, unlike labels of oriented classes). Draws from the sample's own generator."""

    def __init__(self, prob: float = 0.5) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ConfigError(f"DepthRandomFlip: prob must be in [0, 1], got {prob}")
        self.prob = float(prob)

    def __call__(self, results: dict) -> dict:
        if sample_rng(results).random() < self.prob:
            results["img"] = np.ascontiguousarray(results["img"][:, ::-1])
            results["gt_depth"] = np.ascontiguousarray(results["gt_depth"][:, ::-1])
        return results


@TRANSFORMS.register_module()
class PackDepthInputs(PackInputs):
    """:class:`~vitasks.data.transforms.PackInputs`, plus ``gt_depth`` (PixelData ``(1, H, W)``,
    float metres) in the sample."""

    def transform(self, results: dict) -> dict:
        packed = super().transform(results)
        if results.get("gt_depth") is not None:
            depth = torch.from_numpy(np.ascontiguousarray(results["gt_depth"], dtype=np.float32))
            packed["data_samples"].gt_depth = PixelData(data=depth[None])
        return packed
