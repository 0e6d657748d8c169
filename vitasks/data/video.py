"""Video datasets: Kinetics-style list files of videos, and folders of extracted frames.

- :class:`VideoListDataset`: ``train.txt`` / ``val.txt`` in ``data_root`` with lines
  ``relative/path.mp4 label`` (paths relative to ``data_root``, or to ``data_prefix``), decoded
  with PyAV (the ``video`` extra) through :class:`~vitasks.data.video_transforms.DecodeFrames`;
- :class:`RawFrameDataset`: lines ``frame_dir total_frames label``, the frames named by a
  template (``img_{:05d}.jpg``, numbered from 1 as mmaction2 extracts them).

Labels are ``0..K-1``. Class names come from ``classes``, else from ``classes.txt`` in
``data_root`` (one name per line, in label order) when there is one, else ``class_0``... A line
that does not parse or a label out of range stops the dataset at construction with the file and
line; a missing or unreadable video is a DataError naming it when the sample is loaded (skipped
with a warning in training with ``skip_bad_samples: true``).
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple, Union

from vitasks.checks import options
from vitasks.data.imagenet import FileDataset, check_dataset_args, dataset_key, check_num_classes
from vitasks.data.video_io import probe_video
from vitasks.errors import ConfigError, DataError
from vitasks.registry import DATASETS

__all__ = ["VideoListDataset", "RawFrameDataset", "CLASSES_FILE"]

# Optional class names next to the list files, one per line in label order.
CLASSES_FILE = "classes.txt"


def _read_lines(path: str) -> List[Tuple[int, str]]:
    """(line number, text) of the non-blank lines of a list file."""
    if not os.path.isfile(path):
        raise DataError(f"list file not found: {path}")
    with open(path, encoding="utf-8") as f:
        return [(n, line.strip()) for n, line in enumerate(f, start=1) if line.strip()]


def _parse_label(text: str, path: str, lineno: int, num_classes: Optional[int]) -> int:
    try:
        label = int(text)
    except ValueError:
        raise DataError(f"{path}, line {lineno}: the label {text!r} is not an integer") from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        upper = f"0..{num_classes - 1}" if num_classes is not None else "0 or more"
        raise DataError(
            f"{path}, line {lineno}: label {label} is out of range (expected {upper}; "
            "check num_classes or the list file)"
        )
    return label


class _ListDataset(FileDataset):
    """What both list datasets share: the data root, the prefix, class names and the checks."""

    kind = "video"

    def __init__(
        self,
        data_root: Optional[str] = None,
        ann_file: str = "train.txt",
        data_prefix: Union[str, dict, None] = None,
        classes: Optional[Sequence[str]] = None,
        num_classes: Optional[int] = None,
        **kwargs,
    ) -> None:
        name = dataset_key(self)
        check_dataset_args(name, data_root, num_classes, f"the folder holding {ann_file!r}")
        if isinstance(data_prefix, dict):
            data_prefix = options(data_prefix, f"{name}.data_prefix", (self.kind,)).get(self.kind)
        self.expected_num_classes = num_classes
        self._given_classes = None if classes is None else tuple(str(c) for c in classes)
        super().__init__(data_root, None, dict(data_root=data_root), ann_file, {self.kind: data_prefix or ""}, **kwargs)

    def _class_names(self) -> Optional[Tuple[str, ...]]:
        """Given names, else ``classes.txt`` in data_root, else None; checked against num_classes."""
        names = self._given_classes
        source = "`classes`"
        if names is None:
            path = os.path.join(self.data_root, CLASSES_FILE)
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    names = tuple(line.strip() for line in f if line.strip())
                source = repr(path)
        if names is not None:
            check_num_classes(self.expected_num_classes, names, source)
        return names

    def _parse_line(self, line: str, lineno: int) -> Tuple[dict, str]:
        """A list file's line (number ``lineno``): the sample's fields and its label's text."""
        raise NotImplementedError

    def load_data_list(self) -> List[dict]:
        data_list, labels = [], []
        for lineno, line in _read_lines(self.ann_file):
            info, label_text = self._parse_line(line, lineno)
            label = _parse_label(label_text, self.ann_file, lineno, self.expected_num_classes)
            labels.append(label)
            data_list.append({**info, "gt_label": label, "source": f"{self.ann_file}, line {lineno}"})
        if not data_list:
            raise DataError(f"{type(self).__name__}: {self.ann_file} lists nothing")
        names = self._class_names()
        num_classes = len(names) if names is not None else self.expected_num_classes
        if num_classes is None:
            num_classes = max(labels) + 1
        elif max(labels) >= num_classes:  # classes.txt without num_classes
            at = labels.index(max(labels))
            raise DataError(
                f"{data_list[at]['source']}: label {max(labels)} is out of range (expected "
                f"0..{num_classes - 1}: {num_classes} classes)"
            )
        self._metainfo["classes"] = names or tuple(f"class_{i}" for i in range(num_classes))
        return data_list

    def _path(self, relative: str) -> str:
        return os.path.join(self.data_prefix[self.kind], relative)


@DATASETS.register_module()
class VideoListDataset(_ListDataset):
    """Videos listed in a Kinetics-style file: ``relative/path.mp4 label`` per line.

    ``load_data_list()`` gives ``{"filename", "gt_label", "source"}`` per line (``source`` is
    ``"<list file>, line <n>"``, for error messages); fetching a sample adds ``total_frames``
    from the video's index (cached per file), so the pipeline starts with a sampler:
    ``SampleFrames`` or ``UniformSample``, then ``DecodeFrames``.

    Args:
        data_root: The dataset folder; ``ann_file`` and the paths in it are relative to it.
        ann_file: The list file (``train.txt``, ``val.txt``, ...).
        data_prefix: Folder (relative to data_root) that the listed paths are relative to;
            a string or ``{video: folder}``.
        classes: Class names in label order (default: ``classes.txt`` in data_root if any).
        num_classes: Number of classes (configs pass ``${num_classes}``); labels must be below.
        **kwargs: ``skip_bad_samples`` (in training, skip missing, corrupt or truncated videos with a warning), ``pipeline``,
            ``test_mode`` and the rest of :class:`~vitasks.data.imagenet.FileDataset`'s.
    """

    kind = "video"

    def _parse_line(self, line: str, lineno: int) -> Tuple[dict, str]:
        parts = line.rsplit(None, 1)  # the path may contain spaces, the label does not
        if len(parts) != 2:
            raise DataError(f"{self.ann_file}, line {lineno}: expected `relative/path.mp4 label`, got {line!r}")
        return {"filename": self._path(parts[0])}, parts[1]

    def get_data_info(self, idx: int) -> dict:
        info = super().get_data_info(idx)
        if not os.path.isfile(info["filename"]):
            raise DataError(f"video file not found: {info['filename']} (listed in {info['source']})")
        info["total_frames"] = probe_video(info["filename"]).num_frames
        info["start_index"] = 0
        return info


@DATASETS.register_module()
class RawFrameDataset(_ListDataset):
    """Folders of extracted frames listed as ``frame_dir total_frames label`` per line.

    Frame ``i`` (0-based, as the samplers count) of a folder is the file
    ``filename_tmpl.format(i + start_index)``: with the defaults ``img_00001.jpg`` is the first.

    Args:
        data_root: The dataset folder; ``ann_file`` and the folders in it are relative to it.
        ann_file: The list file.
        data_prefix: Folder (relative to data_root) the frame folders are relative to; a
            string or ``{img: folder}``.
        filename_tmpl: Frame file names, formatted with the frame's number.
        start_index: Number of the first frame file (1 for mmaction2's extracted frames).
        classes, num_classes, skip_bad_samples, pipeline, test_mode, lazy_init, max_refetch,
            indices, serialize_data: as :class:`VideoListDataset`.
    """

    kind = "img"

    def __init__(self, data_root: Optional[str] = None, ann_file: str = "train.txt",
                 data_prefix: Union[str, dict, None] = None, filename_tmpl: str = "img_{:05d}.jpg",
                 start_index: int = 1, **kwargs) -> None:
        try:
            filename_tmpl.format(start_index)
        except (IndexError, KeyError, ValueError, AttributeError) as e:
            raise ConfigError(
                f"RawFrameDataset.filename_tmpl {filename_tmpl!r} cannot be formatted with a frame "
                f"number (expected e.g. 'img_{{:05d}}.jpg'): {e}"
            ) from e
        self.filename_tmpl = filename_tmpl
        self.start_index = int(start_index)
        super().__init__(data_root, ann_file, data_prefix, **kwargs)

    def _parse_line(self, line: str, lineno: int) -> Tuple[dict, str]:
        parts = line.rsplit(None, 2)
        total = None
        if len(parts) == 3:
            try:
                total = int(parts[1])
            except ValueError:
                total = None
        if total is None or total < 1:
            raise DataError(
                f"{self.ann_file}, line {lineno}: expected `frame_dir total_frames label` with "
                f"total_frames a positive integer, got {line!r}"
            )
        frame_dir = self._path(parts[0])
        return {"frame_dir": frame_dir, "filename": frame_dir, "total_frames": total}, parts[2]

    def get_data_info(self, idx: int) -> dict:
        info = super().get_data_info(idx)
        if not os.path.isdir(info["frame_dir"]):
            raise DataError(f"frame folder not found: {info['frame_dir']} (listed in {info['source']})")
        info["filename_tmpl"] = self.filename_tmpl
        info["start_index"] = self.start_index
        return info
