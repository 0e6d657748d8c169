"""Reading frames of videos (PyAV) and of raw-frame folders, only the frames a clip needs.

A video is indexed once (:func:`probe_video`): its packets are read without decoding, which
gives every frame's presentation timestamp in display order; the index is cached per file (by
path, size and modification time) in each worker. Reading frames (:func:`read_video_frames`)
then seeks to the keyframe at or before the first needed frame, decodes forward, keeps the
frames whose timestamps are wanted and stops after the last one, so a clip of a long video costs
a GOP or two of decoding rather than the whole file.

The timestamps come from the container's packets rather than from ``frame rate x index``, so
variable frame rates and B-frame reordering map indices to the right frames; the frame count is
the number of video packets with a timestamp (the stream metadata's count can be off by a few,
which makes clips near the end fail in other readers).

Every failure is a :class:`~vitasks.errors.DataError` that names the file.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from vitasks.data.transforms import read_image
from vitasks.errors import ConfigError, DataError

__all__ = ["VideoIndex", "import_av", "probe_video", "read_video_frames", "read_raw_frames"]

# Indexes kept per worker: a few KB each (8 bytes per frame), so this bounds memory to a few MB
# even for Kinetics-sized lists.
_CACHE_SIZE = 2048
_index_cache: "OrderedDict[tuple, VideoIndex]" = OrderedDict()


def import_av():
    """PyAV, imported on first use so that image-only installs don't need it.

    Its absence is a ConfigError, not a DataError: ``skip_bad_samples`` must not take it for one
    bad video after another."""
    try:
        import av
    except ImportError as e:
        raise ConfigError(
            "reading videos needs PyAV, which is not installed: pip install 'vitasks[video]' "
            "(or pip install av)"
        ) from e
    return av


@dataclass(frozen=True)
class VideoIndex:
    """Where the frames of a video file are.

    Attributes:
        path: The file.
        pts: Presentation timestamp of every frame in display order (stream time base), int64;
            ``None`` when the container gives none (then frames are read from the start).
        num_frames: Number of frames.
        fps: Average frame rate from the stream (informative; sampling works on indices).
    """

    path: str
    pts: np.ndarray | None
    num_frames: int
    fps: float


def _open(av, path: str):
    if not os.path.isfile(path):
        raise DataError(f"video file not found: {path}")
    try:
        container = av.open(path, metadata_errors="ignore")
    except av.FFmpegError as e:
        raise DataError(f"cannot open video {path}: {e}") from e
    if not container.streams.video:
        container.close()
        raise DataError(f"{path} has no video stream")
    return container


def probe_video(path: str) -> VideoIndex:
    """The :class:`VideoIndex` of ``path``, cached per file (path, size, modification time)."""
    try:
        stat = os.stat(path)
    except FileNotFoundError as e:
        raise DataError(f"video file not found: {path}") from e
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    index = _index_cache.get(key)
    if index is not None:
        _index_cache.move_to_end(key)
        return index
    index = _build_index(path)
    _index_cache[key] = index
    if len(_index_cache) > _CACHE_SIZE:
        _index_cache.popitem(last=False)
    return index


def _build_index(path: str) -> VideoIndex:
    av = import_av()
    with _open(av, path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        listed = int(stream.frames or 0)  # the header's frame count (0 when it has none)
        stamps = []
        missing_pts = False
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's final flush packet
                    continue
                # Without presentation timestamps (some AVI files), decode order is not display
                # order and decoded frames carry none either: such videos are read by counting.
                missing_pts = missing_pts or packet.pts is None
                stamps.append(packet.pts)
        except av.FFmpegError as e:
            raise DataError(f"cannot read video {path} (corrupt or truncated?): {e}") from e
    if not stamps:
        raise DataError(f"video {path} has no frames (empty, corrupt or truncated)")
    if len(stamps) < listed:
        # An MP4 with its index at the front reads as a shorter video when cut off: the demuxer
        # stops at the end of the data. The header still counts every frame.
        raise DataError(
            f"video {path} is truncated: its header lists {listed} frames, only {len(stamps)} "
            "could be read"
        )
    pts = None if missing_pts else np.sort(np.asarray(stamps, dtype=np.int64))
    return VideoIndex(path=path, pts=pts, num_frames=len(stamps), fps=fps)


def _check_indices(indices: np.ndarray, num_frames: int, where: str) -> None:
    if indices.size == 0:
        raise ValueError(f"{where}: no frame indices given")
    if indices.min() < 0 or indices.max() >= num_frames:
        raise DataError(
            f"{where}: frame index {int(indices.max() if indices.max() >= num_frames else indices.min())} "
            f"is outside the video's 0..{num_frames - 1}"
        )


def read_video_frames(
    path: str, indices: Sequence[int], index: VideoIndex | None = None, num_threads: int = 1
) -> np.ndarray:
    """Frames ``indices`` (0-based, display order, repeats allowed) of the video at ``path`` as
    an RGB uint8 array ``(len(indices), H, W, 3)``.

    Args:
        path: The video file.
        indices: Frame indices in the order wanted.
        index: Its :func:`probe_video` index (looked up when not given).
        num_threads: Decoder threads (1 in data-loader workers, which already run in parallel).
    """
    index = index or probe_video(path)
    wanted = np.asarray(indices, dtype=np.int64).reshape(-1)
    _check_indices(wanted, index.num_frames, path)
    needed = np.unique(wanted)
    av = import_av()
    with _open(av, path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = int(num_threads)
        try:
            if index.pts is None:
                frames = _decode_in_order(container, stream, needed)
            else:
                frames = _decode_by_pts(container, stream, index.pts, needed)
        except av.FFmpegError as e:
            raise DataError(f"cannot decode video {path} (corrupt or truncated?): {e}") from e
    missing = [int(i) for i in needed if int(i) not in frames]
    if missing:
        raise DataError(
            f"video {path}: frames {missing[:5]}{'...' if len(missing) > 5 else ''} could not be "
            f"decoded (the index lists {index.num_frames} frames; the file is truncated or corrupt)"
        )
    return np.stack([frames[int(i)] for i in wanted])


def _decode_by_pts(container, stream, pts: np.ndarray, needed: np.ndarray) -> dict:
    """Seek to the keyframe before the first needed frame and decode forward up to the last."""
    targets = {int(pts[i]): int(i) for i in needed}
    first, last = int(pts[needed[0]]), int(pts[needed[-1]])
    frames = _decode_from(container, stream, targets, first, last, seek=needed[0] > 0)
    if len(frames) < len(targets) and needed[0] > 0:
        # The seek landed past a needed frame (an open GOP, or an index that is off): read again
        # from the start, which always reaches every decodable frame.
        frames.update(_decode_from(container, stream, targets, int(pts[0]), last, seek=True))
    return frames


def _decode_from(container, stream, targets: dict, first: int, last: int, seek: bool) -> dict:
    if seek:
        # backward=True: the nearest keyframe at or before `first`, where decoding can start.
        container.seek(first, stream=stream, backward=True, any_frame=False)
    frames = {}
    for frame in container.decode(stream):
        stamp = frame.pts
        if stamp is None:
            continue
        index = targets.get(int(stamp))
        if index is not None and index not in frames:
            frames[index] = frame.to_ndarray(format="rgb24")
        if stamp >= last:
            break
    return frames


def _decode_in_order(container, stream, needed: np.ndarray) -> dict:
    """Without timestamps: decode from the start, counting frames."""
    wanted = set(int(i) for i in needed)
    last = int(needed[-1])
    frames = {}
    for count, frame in enumerate(container.decode(stream)):
        if count in wanted:
            frames[count] = frame.to_ndarray(format="rgb24")
        if count >= last:
            break
    return frames


def read_raw_frames(
    frame_dir: str, indices: Sequence[int], filename_tmpl: str = "img_{:05d}.jpg", start_index: int = 1
) -> np.ndarray:
    """Frames ``indices`` (0-based) of a folder of images named ``filename_tmpl.format(i +
    start_index)`` (``img_00001.jpg`` is frame 0 by default, as mmaction2's extracted frames), as
    RGB uint8 ``(len(indices), H, W, 3)``; each distinct frame is read once."""
    wanted = np.asarray(indices, dtype=np.int64).reshape(-1)
    if not os.path.isdir(frame_dir):
        raise DataError(f"frame folder not found: {frame_dir}")
    frames = {}
    for i in np.unique(wanted):
        frames[int(i)] = read_image(os.path.join(frame_dir, filename_tmpl.format(int(i) + start_index)))
    shapes = {f.shape for f in frames.values()}
    if len(shapes) > 1:
        raise DataError(f"frames in {frame_dir} differ in size: {sorted(shapes)}")
    return np.stack([frames[int(i)] for i in wanted])
