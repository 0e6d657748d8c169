"""ImageNet-style folders: ``<data_root>/<split>/<class>/<image>`` (jpg, jpeg, png, any case)."""

import contextlib
import copy
import logging
import os
from typing import Callable, List, Optional, Sequence, Union

from mmengine.dataset import BaseDataset
from mmengine.logging import print_log

from vitasks.checks import building, config_key, one_of, positive_int
from vitasks.data.seeding import SeededSampleMixin
from vitasks.errors import ConfigError, DataError
from vitasks.registry import DATASETS, TRANSFORMS

IMG_SUFFIXES = (".jpg", ".jpeg", ".png")


def build_pipeline(pipeline: Sequence[Union[dict, Callable]], owner: str) -> List[Callable]:
    """Build transform dicts from vitasks' TRANSFORMS (usable outside a Runner, where mmengine's
    root registry would not find vitasks' names)."""
    built = []
    for i, t in enumerate(pipeline or []):
        if not (isinstance(t, dict) and "type" in t) and (isinstance(t, dict) or not callable(t)):
            raise ConfigError(f"{owner}.pipeline[{i}] must be a transform dict with a `type`, or a callable, got {t!r}")
        if isinstance(t, dict):
            # Under a Runner a transform's errors name `<loader>.dataset.pipeline.<i>.<argument>`.
            with building("pipeline", str(i)) if config_key() else contextlib.nullcontext():
                built.append(TRANSFORMS.build(copy.deepcopy(t)))
        else:
            built.append(t)
    return built


def dataset_key(dataset: object) -> str:
    """What a dataset's errors name: its config key while a Runner builds it
    (``train_dataloader.dataset``...), else its class name."""
    return config_key(default=type(dataset).__name__)


def check_dataset_args(owner: str, data_root: Optional[str], num_classes: Optional[int], layout: str) -> None:
    """What every dataset checks first: ``data_root`` is set (``layout`` says what it should hold)
    and is a folder, ``num_classes`` is None or a positive integer."""
    if not data_root:
        raise ConfigError(f"{owner}: `data_root` is missing; set the config's top-level `data_root` (or "
                          f"--cfg-options data_root=DIR) to {layout}")
    if not os.path.isdir(data_root):
        raise DataError(f"{owner}: data_root {data_root!r} does not exist or is not a folder")
    if num_classes is not None:
        positive_int(num_classes, f"{owner}: num_classes")


def check_num_classes(num_classes: Optional[int], names: Sequence[str], where: str) -> None:
    """The config's ``num_classes`` must match the classes a dataset found (``where`` says
    where, e.g. the split folder); a ConfigError tells the user the value to set."""
    if num_classes is not None and num_classes != len(names):
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise ConfigError(
            f"num_classes is {num_classes} but {where} has {len(names)} classes ({shown}); "
            f"set num_classes={len(names)} (e.g. --cfg-options num_classes={len(names)})"
        )


class SkipBadSamplesMixin:
    """``prepare_data`` that turns a DataError from the pipeline into a warning and ``None``
    when ``skip_bad_samples`` is on in training (mmengine's BaseDataset then draws another
    sample). Evaluation never skips: a dropped sample would change the metric's denominator, so
    the error is raised with a hint instead."""

    skip_bad_samples: bool = False

    def prepare_data(self, idx: int):
        try:
            return super().prepare_data(idx)  # type: ignore[misc]
        except DataError as e:
            if self.skip_bad_samples and not self.test_mode:  # type: ignore[attr-defined]
                print_log(f"skipping a bad sample (skip_bad_samples: true): {e}",
                          logger="current", level=logging.WARNING)
                return None
            if self.skip_bad_samples:
                raise DataError(
                    f"{e} (skip_bad_samples applies to training only: evaluation must see every "
                    "sample; fix or remove the file)"
                ) from e
            raise DataError(f"{e} (set `skip_bad_samples: true` on the training dataset to skip "
                            "unreadable images with a warning)") from e


class FileDataset(SkipBadSamplesMixin, SeededSampleMixin, BaseDataset):
    """What vitasks' datasets share: bad samples skipped in training (:class:`SkipBadSamplesMixin`),
    seeded per-sample randomness, the pipeline built from vitasks' TRANSFORMS, and the keyword
    arguments of mmengine's BaseDataset that configs set (``skip_bad_samples``, ``pipeline``,
    ``test_mode``, ``lazy_init``, ``max_refetch``, ``indices``, ``serialize_data``), which a
    dataset passes on as ``**kwargs``.

    The dataset gives the rest positionally: ``metainfo``, ``paths`` (strings added to the
    metainfo after BaseDataset's init, which would read a string metainfo value as a file to
    load), and BaseDataset's ``ann_file`` and ``data_prefix`` when it reads them."""

    def __init__(self, data_root: Optional[str], metainfo: Optional[dict] = None, paths: Optional[dict] = None,
                 ann_file: str = "", data_prefix: Optional[dict] = None, /, *, skip_bad_samples: bool = False,
                 pipeline: Sequence[Union[dict, Callable]] = (), test_mode: bool = False, lazy_init: bool = False,
                 max_refetch: int = 1000, indices: Optional[Union[int, Sequence[int]]] = None,
                 serialize_data: bool = True) -> None:
        self.skip_bad_samples = bool(skip_bad_samples)
        super().__init__(
            ann_file=ann_file,
            metainfo=metainfo,
            data_root=data_root,
            data_prefix=data_prefix or dict(img_path=""),
            indices=indices,
            serialize_data=serialize_data,
            pipeline=build_pipeline(pipeline, dataset_key(self)),
            test_mode=test_mode,
            lazy_init=lazy_init,
            max_refetch=max_refetch,
        )
        self._metainfo.update(paths or {})


@DATASETS.register_module()
class ImageNetFolder(FileDataset):
    """Classification dataset read from class folders, as ImageNet comes.

    ``load_data_list()`` gives ``{"img_path", "gt_label"}`` per image, images sorted by path;
    metainfo ``classes`` is the sorted list of class folder names (or ``classes`` when given,
    which fixes the label order and may select a subset of the folders).

    Args:
        data_root: The dataset folder (holding ``train/`` and ``val/``).
        split: ``"train"`` or ``"val"``.
        split_dir: Folder name of the split when it is not the split's name (e.g.
            ``validation``).
        classes: Optional class names (folder names) in label order.
        num_classes: Expected number of classes (configs pass ``${num_classes}``); a mismatch
            with the folders is a ConfigError.
        **kwargs: ``skip_bad_samples`` (in training, skip unreadable or truncated images with a warning), ``pipeline``,
            ``test_mode`` and the rest of :class:`~vitasks.data.imagenet.FileDataset`'s.
    """

    SPLITS = ("train", "val", "test")

    def __init__(
        self,
        data_root: Optional[str] = None,
        split: str = "train",
        split_dir: Optional[str] = None,
        classes: Optional[Sequence[str]] = None,
        num_classes: Optional[int] = None,
        **kwargs,
    ) -> None:
        owner = dataset_key(self)
        check_dataset_args(owner, data_root, num_classes, "a folder with train/<class>/ and val/<class>/")
        self.split = one_of(split, self.SPLITS, f"{owner}.split")
        self.split_dir = split_dir or split
        self.split_path = os.path.join(data_root, self.split_dir)
        if not os.path.isdir(self.split_path):
            raise DataError(
                f"{owner}: split folder {self.split_path!r} does not exist "
                f"(expected {data_root}/{self.split_dir}/<class>/<images>)"
            )
        self.expected_num_classes = num_classes

        found = sorted(
            d for d in os.listdir(self.split_path)
            if os.path.isdir(os.path.join(self.split_path, d)) and not d.startswith(".")
        )
        if classes is None:
            class_names = found
        else:
            class_names = [str(c) for c in classes]
            missing = [c for c in class_names if c not in found]
            if missing:
                raise DataError(
                    f"{owner}: classes {missing[:5]}{'...' if len(missing) > 5 else ''} have "
                    f"no folder in {self.split_path!r}"
                )
        if not class_names:
            raise DataError(f"{owner}: {self.split_path!r} has no class folders")
        check_num_classes(num_classes, class_names, repr(self.split_path))
        # `data_root` in the metainfo lets metrics (the prediction dumper) write relative paths.
        super().__init__(data_root, dict(classes=tuple(class_names)), dict(data_root=data_root), **kwargs)

    def load_data_list(self) -> List[dict]:
        data_list = []
        for label, name in enumerate(self.metainfo["classes"]):
            class_dir = os.path.join(self.split_path, name)
            paths = []
            for root, dirs, files in os.walk(class_dir, followlinks=True):
                dirs.sort()
                paths.extend(
                    os.path.join(root, f) for f in files
                    if os.path.splitext(f)[1].lower() in IMG_SUFFIXES and not f.startswith(".")
                )
            data_list.extend({"img_path": p, "gt_label": label} for p in sorted(paths))
        if not data_list:
            raise DataError(
                f"ImageNetFolder: no images (.jpg, .jpeg, .png) under {self.split_path!r}/<class>/"
            )
        return data_list
