"""Semantic segmentation datasets: an image folder with a parallel label folder, and ADE20K.

A sample pairs ``<img_dir>/<name><img_suffix>`` with ``<ann_dir>/<name><seg_map_suffix>`` (same
relative path, sub-folders allowed). ``load_data_list()`` gives
``{"img_path", "seg_map_path", "reduce_zero_label", "num_classes", "ignore_index"}`` per image,
sorted by path; the last two let :class:`~vitasks.data.seg_transforms.LoadSegAnnotations` reject a
label value that is neither a class nor the ignore index, naming the file.

ADE20K (SceneParsing, ``ADEChallengeData2016``): ``images/{training,validation}/*.jpg`` and
``annotations/{training,validation}/*.png`` with values 0..150, 0 meaning "other". With
``reduce_zero_label`` (the default) 0 becomes 255 (ignored) and the rest move down by one, so the
150 classes are 0..149.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from mmengine.logging import print_log

from vitasks.checks import one_of, strings
from vitasks.data.imagenet import FileDataset, check_dataset_args, dataset_key, check_num_classes
from vitasks.errors import ConfigError, DataError
from vitasks.registry import DATASETS

# The 150 ADE20K SceneParsing classes, in label order (label 1 = "wall" ... 150 = "flag").
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
assert len(ADE20K_CLASSES) == 150

# Optional file in data_root naming the classes, one per line in label order (after
# reduce_zero_label); lets a dataset in the ADE layout but with other classes keep its names.
CLASSES_FILE = "classes.txt"


def _suffixes(value: str | Sequence[str], key: str, owner: str) -> tuple[str, ...]:
    values = strings(value, f"{owner}.{key}", "a suffix like '.jpg' or a list of them", single=True, allow_empty=False)
    return tuple(v.lower() for v in values)


def _read_classes_file(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise DataError(f"{path} names no classes (expected one class name per line)")
    return names


@DATASETS.register_module()
class SegFolderDataset(FileDataset):
    """Images with label maps of the same relative name in a parallel folder.

    Args:
        data_root: dataset folder; ``img_dir`` and ``ann_dir`` are relative to it.
        img_dir: image folder (searched recursively).
        ann_dir: label folder; ``None`` for images without labels (inference only).
        img_suffix: image suffix or list of suffixes (case-insensitive).
        seg_map_suffix: label file suffix (PNG label maps).
        classes: class names in label order (after ``reduce_zero_label``); ``None``: from
            ``data_root/classes.txt`` if present, else ``class_0..class_{K-1}`` from ``num_classes``.
        num_classes: expected number of classes (configs pass ``${num_classes}``); a mismatch with
            ``classes`` is a ConfigError.
        reduce_zero_label: label 0 means "other": map it to ``ignore_index`` and the rest to
            value - 1 (ADE20K).
        ignore_index: label value excluded from loss and metric.
        **kwargs: ``skip_bad_samples`` (in training, skip unreadable samples with a warning), ``pipeline``,
            ``test_mode`` and the rest of :class:`~vitasks.data.imagenet.FileDataset`'s.
    """

    def __init__(
        self,
        data_root: str | None = None,
        img_dir: str = "images/training",
        ann_dir: str | None = "annotations/training",
        img_suffix: str | Sequence[str] = ".jpg",
        seg_map_suffix: str = ".png",
        classes: Sequence[str] | None = None,
        num_classes: int | None = None,
        reduce_zero_label: bool = False,
        ignore_index: int = 255,
        **kwargs,
    ) -> None:
        owner = dataset_key(self)
        check_dataset_args(owner, data_root, num_classes, f"the folder holding {img_dir}/")
        self.img_path = os.path.join(data_root, img_dir)
        self.ann_path = None if ann_dir is None else os.path.join(data_root, ann_dir)
        for path, key in ((self.img_path, "img_dir"), (self.ann_path, "ann_dir")):
            if path is not None and not os.path.isdir(path):
                raise DataError(f"{owner}: {key} folder {path!r} does not exist")
        self.img_suffix = _suffixes(img_suffix, "img_suffix", owner)
        self.seg_map_suffix = _suffixes(seg_map_suffix, "seg_map_suffix", owner)[0]
        self.reduce_zero_label = bool(reduce_zero_label)
        self.ignore_index = int(ignore_index)

        class_names = self._class_names(data_root, classes, num_classes, owner)
        metainfo = dict(
            classes=tuple(class_names),
            reduce_zero_label=self.reduce_zero_label,
            ignore_index=self.ignore_index,
        )
        # The folder that image names are relative to (`--dump` names its PNGs after it).
        super().__init__(data_root, metainfo, dict(img_root=os.path.abspath(self.img_path)), **kwargs)

    def _default_classes(self, data_root: str, num_classes: int | None) -> list[str] | None:
        """Class names when the config gives none (overridden by ADE20K)."""
        return None

    def _class_names(
        self, data_root: str, classes: Sequence[str] | None, num_classes: int | None, owner: str
    ) -> list[str]:
        source = "`classes`"
        if classes is not None:
            names = [str(c) for c in classes]
        else:
            names = self._default_classes(data_root, num_classes)
            source = f"{owner}'s class list"
            classes_file = os.path.join(data_root, CLASSES_FILE)
            if names is None and os.path.isfile(classes_file):
                names, source = _read_classes_file(classes_file), classes_file
            if names is None and num_classes is not None:
                names = [f"class_{i}" for i in range(num_classes)]
        if not names:  # none given, or an empty list
            raise ConfigError(f"{owner}: give `classes` (names in label order, not empty) or `num_classes` (e.g. "
                              f"${{num_classes}}), or put {CLASSES_FILE} in {data_root!r}")
        check_num_classes(num_classes, names, f"{owner} at {data_root!r} (classes from {source})")
        return names

    def load_data_list(self) -> list[dict]:
        owner = type(self).__name__
        images = []
        for root, dirs, files in os.walk(self.img_path, followlinks=True):
            dirs.sort()
            images.extend(
                os.path.join(root, f) for f in files
                if not f.startswith(".") and f.lower().endswith(self.img_suffix)
            )
        images.sort()
        if not images:
            raise DataError(
                f"{owner}: no images ({', '.join(self.img_suffix)}) under {self.img_path!r}; "
                "the split is empty"
            )
        num_classes = len(self.metainfo["classes"])
        data_list = []
        for img_path in images:
            info = dict(
                img_path=img_path,
                reduce_zero_label=self.reduce_zero_label,
                num_classes=num_classes,
                ignore_index=self.ignore_index,
            )
            if self.ann_path is not None:
                rel = os.path.relpath(img_path, self.img_path)
                # Strip the matched suffix (case-insensitively) to find the label's name.
                stem = rel[: len(rel) - len(next(s for s in self.img_suffix if rel.lower().endswith(s)))]
                seg_map_path = os.path.join(self.ann_path, stem + self.seg_map_suffix)
                if not os.path.isfile(seg_map_path):
                    raise DataError(
                        f"{owner}: image {img_path} has no label file (expected {seg_map_path})"
                    )
                info["seg_map_path"] = seg_map_path
            data_list.append(info)
        return data_list


@DATASETS.register_module()
class ADE20KDataset(SegFolderDataset):
    """ADE20K SceneParsing (``ADEChallengeData2016``): 150 classes, label 0 ignored.

    Args:
        data_root: the ``ADEChallengeData2016`` folder.
        split: ``training`` or ``validation`` (the folder names under ``images/`` and
            ``annotations/``).
        classes: class names; ``None``: ADE20K's 150, or ``data_root/classes.txt`` when
            ``num_classes`` differs from 150 (a dataset in the ADE layout with other classes).
        num_classes: expected number of classes (``${num_classes}``).
        reduce_zero_label: map 0 ("other") to 255 and the rest to value - 1.
        **kwargs: ``img_suffix``, ``seg_map_suffix``, ``ignore_index``, ``skip_bad_samples``,
            ``pipeline``, ``test_mode``, ``lazy_init``, ``max_refetch``, ``indices``,
            ``serialize_data``: as :class:`SegFolderDataset`.
    """

    SPLITS = ("training", "validation")

    def __init__(self, data_root: str | None = None, split: str = "training", reduce_zero_label: bool = True,
                 **kwargs) -> None:
        self.split = one_of(split, self.SPLITS, "ADE20KDataset.split")
        fixed = sorted(set(kwargs) & {"img_dir", "ann_dir"})
        if fixed:
            raise ConfigError(f"ADE20KDataset: {', '.join(fixed)} follow from `split` (images/<split>, "
                              "annotations/<split>); use SegFolderDataset for other folders")
        super().__init__(data_root=data_root, img_dir=f"images/{split}", ann_dir=f"annotations/{split}",
                         reduce_zero_label=reduce_zero_label, **kwargs)

    def _default_classes(self, data_root: str, num_classes: int | None) -> list[str] | None:
        if num_classes is None or num_classes == len(ADE20K_CLASSES):
            return list(ADE20K_CLASSES)
        if os.path.isfile(os.path.join(data_root, CLASSES_FILE)):
            return None  # the caller reads it and checks the count
        # A dataset in the ADE layout with other classes (`--cfg-options data_root=DIR
        # num_classes=K`): without a classes.txt its classes get generic names.
        print_log(
            f"ADE20KDataset: num_classes={num_classes} and no {CLASSES_FILE} in {data_root!r}: "
            f"the classes are named class_0..class_{num_classes - 1} (put one name per line in "
            f"{CLASSES_FILE} to name them)",
            logger="current",
        )
        return [f"class_{i}" for i in range(num_classes)]
