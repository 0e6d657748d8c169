"""Video transforms: choose frame indices, decode only those, augment every frame of a clip alike,
pack the views for the model.

A pipeline reads like mmaction2's::

    [{type: SampleFrames, clip_len: 16, frame_interval: 4, num_clips: 1},
     {type: DecodeFrames},
     {type: VideoAlbu, transforms: [{type: SmallestMaxSize, max_size: 256},
                                    {type: RandomResizedCrop, size: [224, 224]},
                                    {type: HorizontalFlip}]},
     {type: PackVideoInputs}]

Conventions of ``results`` (one dict per video):

- from the dataset: ``filename`` (a video file, or the frame folder), ``total_frames``,
  ``gt_label``; raw frames also ``frame_dir``, ``filename_tmpl`` and ``start_index`` (the number
  of the first frame file);
- ``frame_inds``: 0-based frame indices, ``num_clips x clip_len`` of them, clip after clip (the
  samplers keep them 0-based; a raw-frame folder's ``start_index`` is added only to name files);
- ``imgs``: the frames, RGB uint8 ``(F, H, W, 3)`` with ``F = num_crops x num_clips x clip_len``
  (crops outermost once :class:`ThreeCrop` has made them);
- ``num_clips``, ``clip_len``, ``num_crops`` describe that layout; ``num_views = num_clips x
  num_crops`` is what the model averages over at test time.

Random draws come from :func:`~vitasks.data.seeding.sample_rng`, so a seeded loader gives every
sample the same frames and crops in every run.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from vitasks.data.seeding import sample_rng
from vitasks.data.transforms import Albu, BaseTransform, _reseed, as_uint8
from vitasks.data.video_io import probe_video, read_raw_frames, read_video_frames
from vitasks.checks import IntPair, OneOf, PositiveInt, checked
from vitasks.errors import ConfigError, DataError
from vitasks.registry import TRANSFORMS
from vitasks.structures import DataSample

__all__ = [
    "SampleFrames",
    "UniformSample",
    "DecodeFrames",
    "VideoAlbu",
    "ThreeCrop",
    "PackVideoInputs",
]

OUT_OF_BOUND_OPTS = ("loop", "repeat_last", "error")
OutOfBound = OneOf(*OUT_OF_BOUND_OPTS)


def _total_frames(results: dict, owner: str) -> int:
    """``results["total_frames"]``; probed from the video file when a pipeline is called on a
    bare ``{"filename": ...}`` (inference on one video)."""
    total = results.get("total_frames")
    if total is None:
        if "filename" not in results:
            raise DataError(f"{owner}: the sample has neither `total_frames` nor a video `filename`")
        total = results["total_frames"] = probe_video(results["filename"]).num_frames
    total = int(total)
    if total < 1:
        raise DataError(f"{owner}: {_name(results)} has no frames")
    return total


def _name(results: dict) -> str:
    return str(results.get("filename") or results.get("frame_dir") or "the video")


@TRANSFORMS.register_module()
class SampleFrames(BaseTransform):
    """mmaction2's ``SampleFrames`` (1.x definitions): ``num_clips`` clips of ``clip_len`` frames
    taken every ``frame_interval`` frames.

    Clip start offsets, with ``span = clip_len x frame_interval`` and ``N = num_clips``:

    - training: the video is cut into ``N`` stretches of ``(total - span + 1) // N`` possible
      starts and each clip starts at a random one of its stretch; a video too short for that
      gets ``N`` sorted random starts in ``0..total - span``, or starts spread by ``round`` when
      even one start hardly fits, or 0. With ``keep_tail_frames`` the stretches are real-valued
      so the last frames can be drawn too;
    - testing: starts evenly spread from the first possible to the last possible one
      (``round(i x (total - (clip_len - 1) x frame_interval - 1) / (N - 1))``; the middle one
      for ``N = 1``); for single-frame clips (TSN-style) the centres of ``N`` equal segments.

    Indices past the end are handled by ``out_of_bound_opt``: ``loop`` wraps around (modulo
    the length), ``repeat_last`` repeats the clip's last frame inside the video, ``error`` raises a DataError
    naming the video (for a recipe that must never see a short clip).

    Args:
        clip_len: Frames per clip.
        frame_interval: Step between the sampled frames of a clip.
        num_clips: Clips per video (test-time views; 1 in training).
        test_mode: Evenly spread, deterministic clips.
        out_of_bound_opt: ``loop``, ``repeat_last`` or ``error``.
        keep_tail_frames: mmaction2's real-valued training stretches.
    """

    @checked
    def __init__(
        self,
        clip_len: PositiveInt,
        frame_interval: PositiveInt = 1,
        num_clips: PositiveInt = 1,
        test_mode: bool = False,
        out_of_bound_opt: OutOfBound = "loop",
        keep_tail_frames: bool = False,
    ) -> None:
        self.clip_len, self.frame_interval, self.num_clips = clip_len, frame_interval, num_clips
        self.test_mode = bool(test_mode)
        self.out_of_bound_opt = out_of_bound_opt
        self.keep_tail_frames = bool(keep_tail_frames)

    def train_offsets(self, total: int, rng: np.random.Generator) -> np.ndarray:
        """Random clip starts for a video of ``total`` frames."""
        span = self.clip_len * self.frame_interval
        n = self.num_clips
        if self.keep_tail_frames:
            if total <= span - 1:
                return np.zeros(n, np.int64)
            stretch = (total - span + 1) / n
            return (np.arange(n) * stretch + rng.uniform(0, stretch, n)).astype(np.int64)
        stretch = (total - span + 1) // n
        if stretch > 0:
            return np.arange(n) * stretch + rng.integers(stretch, size=n)
        if total > max(n, span):
            return np.sort(rng.integers(total - span + 1, size=n))
        if stretch == 0:
            return np.around(np.arange(n) * (total - span + 1.0) / n).astype(np.int64)
        return np.zeros(n, np.int64)

    def test_offsets(self, total: int) -> np.ndarray:
        """Deterministic clip starts for a video of ``total`` frames."""
        n = self.num_clips
        if self.clip_len == 1:  # single frames: the centre of each of n equal segments
            segment = total / n
            return (np.arange(n) * segment + segment / 2.0).astype(np.int64)
        max_offset = max(total - ((self.clip_len - 1) * self.frame_interval + 1), 0)
        if n == 1:
            return np.array([max_offset // 2], np.int64)
        # np.round (half to even) as mmaction2, so the same clips are evaluated.
        return np.round(np.arange(n) * (max_offset / (n - 1))).astype(np.int64)

    def frame_indices(self, total: int, rng: Optional[np.random.Generator]) -> np.ndarray:
        """``(num_clips, clip_len)`` indices in ``0..total-1`` (or past it for ``error``)."""
        offsets = self.test_offsets(total) if self.test_mode else self.train_offsets(total, rng)
        inds = offsets[:, None] + np.arange(self.clip_len)[None, :] * self.frame_interval
        if self.out_of_bound_opt == "loop":
            inds = np.mod(inds, total)
        elif self.out_of_bound_opt == "repeat_last":
            inside = inds < total
            last = np.max(np.where(inside, inds, 0), axis=1, keepdims=True)
            inds = np.where(inside, inds, last)
        return inds.astype(np.int64)

    def transform(self, results: dict) -> dict:
        total = _total_frames(results, "SampleFrames")
        rng = None if self.test_mode else sample_rng(results)
        inds = self.frame_indices(total, rng)
        if self.out_of_bound_opt == "error" and inds.max() >= total:
            raise DataError(
                f"{_name(results)} has {total} frames, fewer than one clip needs "
                f"({self.clip_len} frames every {self.frame_interval}: "
                f"{(self.clip_len - 1) * self.frame_interval + 1}); SampleFrames has "
                "out_of_bound_opt='error' (use 'loop' or 'repeat_last' to accept short videos)"
            )
        results["frame_inds"] = inds.reshape(-1)
        results["clip_len"] = self.clip_len
        results["frame_interval"] = self.frame_interval
        results["num_clips"] = self.num_clips
        return results


@TRANSFORMS.register_module()
class UniformSample(BaseTransform):
    """mmaction2's ``UniformSample`` (TSN-style segments, as the TimeSformer and VideoMAE recipes
    sample): the video is cut into ``clip_len`` segments of ``(total - 1) / clip_len`` frames;
    segment ``i`` spans ``round(s x i)..round(s x (i + 1))``.

    - training: one random frame of each segment (the ends included);
    - testing: ``num_clips`` views, view ``k`` takes frame ``round(s x i) + int(s x (k + 1) /
      (num_clips + 1))`` of segment ``i`` (the middle for one view).

    A video shorter than ``clip_len`` repeats frames; with ``allow_repeat=False`` it is a
    DataError naming the video instead.

    Args:
        clip_len: Frames per clip (segments).
        num_clips: Views at test time (training takes one clip).
        test_mode: Deterministic middle-of-segment frames.
        allow_repeat: Whether a video shorter than ``clip_len`` may repeat frames.
    """

    @checked
    def __init__(self, clip_len: PositiveInt, num_clips: PositiveInt = 1, test_mode: bool = False,
                 allow_repeat: bool = True) -> None:
        self.clip_len, self.num_clips = clip_len, num_clips
        if self.num_clips > 1 and not test_mode:
            raise ConfigError("UniformSample: num_clips > 1 is for testing (test_mode: true)")
        self.test_mode = bool(test_mode)
        self.allow_repeat = bool(allow_repeat)

    def frame_indices(self, total: int, rng: Optional[np.random.Generator]) -> np.ndarray:
        """``(num_clips, clip_len)`` indices in ``0..total-1``."""
        segment = (total - 1) / self.clip_len
        starts = [int(np.round(segment * i)) for i in range(self.clip_len)]
        if not self.test_mode:
            ends = [int(np.round(segment * (i + 1))) for i in range(self.clip_len)]
            return np.array([[int(rng.integers(s, e + 1)) for s, e in zip(starts, ends)]], np.int64)
        step = segment / (self.num_clips + 1)
        return np.array(
            [[s + int(step * (k + 1)) for s in starts] for k in range(self.num_clips)], np.int64
        )

    def transform(self, results: dict) -> dict:
        total = _total_frames(results, "UniformSample")
        if total < self.clip_len and not self.allow_repeat:
            raise DataError(
                f"{_name(results)} has {total} frames, fewer than one clip of {self.clip_len}; "
                "UniformSample has allow_repeat=False (set it to true to repeat frames)"
            )
        rng = None if self.test_mode else sample_rng(results)
        results["frame_inds"] = self.frame_indices(total, rng).reshape(-1)
        results["clip_len"] = self.clip_len
        results["frame_interval"] = None
        results["num_clips"] = self.num_clips
        return results


@TRANSFORMS.register_module()
class DecodeFrames(BaseTransform):
    """Reads the frames ``frame_inds`` into ``imgs`` (RGB uint8 ``(F, H, W, 3)``): from a
    raw-frame folder when the sample has ``frame_dir``, else from the video ``filename`` with
    PyAV (seeking to the frames needed). Sets ``original_shape`` and ``img_shape`` (H, W).

    Args:
        num_threads: PyAV decoder threads (1: data-loader workers already run in parallel).
    """

    @checked
    def __init__(self, num_threads: PositiveInt = 1) -> None:
        self.num_threads = num_threads

    def transform(self, results: dict) -> dict:
        if "frame_inds" not in results:
            raise ConfigError("DecodeFrames needs `frame_inds`: put SampleFrames or UniformSample before it")
        inds = results["frame_inds"]
        if results.get("frame_dir") is not None:
            imgs = read_raw_frames(
                results["frame_dir"],
                inds,
                results.get("filename_tmpl", "img_{:05d}.jpg"),
                int(results.get("start_index", 1)),
            )
        elif results.get("filename") is not None:
            imgs = read_video_frames(results["filename"], inds, num_threads=self.num_threads)
        else:
            raise DataError("DecodeFrames: the sample has neither `frame_dir` nor a video `filename`")
        results["imgs"] = imgs
        results["original_shape"] = imgs.shape[1:3]
        results["img_shape"] = imgs.shape[1:3]
        return results


@TRANSFORMS.register_module()
class VideoAlbu(Albu):
    """Albumentations on all frames of a sample with ONE draw of the random parameters (its
    ``images`` target), so a clip is cropped, flipped, resized and colour-jittered as a whole.

    Training: ``[{type: SmallestMaxSize, max_size: 256}, {type: RandomResizedCrop, size: [224,
    224]}, {type: HorizontalFlip}, {type: ColorJitter, ...}]``; testing: ``SmallestMaxSize`` and
    ``CenterCrop`` (or :class:`ThreeCrop` for three views). Flags may be names (``bicubic``).

    Args:
        transforms: albumentations transform configs, as :class:`~vitasks.data.transforms.Albu`.
    """

    # Config validation checks the `type` names in `transforms` against albumentations.
    config_foreign_types = {"transforms": "albumentations"}

    def transform(self, results: dict) -> dict:
        _reseed(self._compose, sample_rng(results))
        # The `images` target (albumentations >= 1.4.12): one set of parameters for all frames.
        imgs = as_uint8(np.asarray(self._compose(images=results["imgs"])["images"]))
        results["imgs"] = imgs
        results["img_shape"] = imgs.shape[1:3]
        return results


@TRANSFORMS.register_module()
class ThreeCrop(BaseTransform):
    """Three ``crop_size`` crops along the longer side (start, middle, end), as mmaction2's
    ``ThreeCrop`` after a short-side resize; centred across the shorter side. The crops become
    views: ``imgs`` grows to ``3 x F`` frames (crops outermost) and ``num_crops`` is 3.

    Args:
        crop_size: Output side (int) or ``[height, width]``.
    """

    @checked
    def __init__(self, crop_size: IntPair) -> None:
        self.crop_size = crop_size

    def transform(self, results: dict) -> dict:
        imgs = results["imgs"]
        height, width = imgs.shape[1:3]
        crop_h, crop_w = self.crop_size
        if crop_h > height or crop_w > width:
            raise ConfigError(
                f"ThreeCrop: crop {crop_h}x{crop_w} is larger than the frames ({height}x{width} of "
                f"{_name(results)}); resize the short side to at least the crop first"
            )
        if width - crop_w >= height - crop_h:  # landscape: left, middle, right
            y = (height - crop_h) // 2
            corners = [(y, x) for x in (0, (width - crop_w) // 2, width - crop_w)]
        else:  # portrait: top, middle, bottom
            x = (width - crop_w) // 2
            corners = [(y, x) for y in (0, (height - crop_h) // 2, height - crop_h)]
        crops = [imgs[:, y:y + crop_h, x:x + crop_w] for y, x in corners]
        results["imgs"] = np.ascontiguousarray(np.concatenate(crops, axis=0))
        results["img_shape"] = (crop_h, crop_w)
        results["num_crops"] = results.get("num_crops", 1) * 3
        return results


@TRANSFORMS.register_module()
class PackVideoInputs(BaseTransform):
    """Pack ``imgs`` into ``{"inputs": uint8 tensor, "data_samples": DataSample}``.

    ``inputs`` is ``(3, T, H, W)`` for a single view and ``(V, 3, T, H, W)`` for ``V =
    num_clips x num_crops`` views (crops outermost). The sample gets ``gt_label`` (LongTensor
    (1,)) when there is a label, and metainfo ``num_views`` plus the ``meta_keys`` present.

    Args:
        meta_keys: Keys of ``results`` copied into the sample's metainfo.
    """

    def __init__(
        self,
        meta_keys: Sequence[str] = (
            "filename", "frame_dir", "total_frames", "frame_inds", "num_clips", "clip_len",
            "num_crops", "original_shape", "img_shape",
        ),
    ) -> None:
        self.meta_keys = tuple(meta_keys)

    def transform(self, results: dict) -> dict:
        imgs = np.asarray(results["imgs"])
        clip_len = int(results.get("clip_len", imgs.shape[0]))
        if imgs.ndim != 4 or imgs.shape[-1] != 3 or imgs.shape[0] % clip_len:
            raise DataError(
                f"PackVideoInputs: {_name(results)}: expected frames (F, H, W, 3) with F a multiple "
                f"of clip_len={clip_len}, got {imgs.shape}"
            )
        num_views = imgs.shape[0] // clip_len
        expected = int(results.get("num_clips", num_views)) * int(results.get("num_crops", 1))
        if num_views != expected:
            raise DataError(
                f"PackVideoInputs: {_name(results)}: {imgs.shape[0]} frames are {num_views} clips of "
                f"{clip_len}, but num_clips x num_crops is {expected}"
            )
        # (V*T, H, W, 3) -> (V, 3, T, H, W)
        views = imgs.reshape(num_views, clip_len, *imgs.shape[1:]).transpose(0, 4, 1, 2, 3)
        inputs = torch.from_numpy(np.ascontiguousarray(views))
        if num_views == 1:
            inputs = inputs[0]
        sample = DataSample()
        if results.get("gt_label") is not None:
            sample.gt_label = torch.as_tensor(results["gt_label"], dtype=torch.long).reshape(-1)
        sample.set_metainfo({k: results[k] for k in self.meta_keys if k in results})
        sample.set_metainfo({"num_views": num_views})
        return {"inputs": inputs, "data_samples": sample}
