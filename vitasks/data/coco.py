"""COCO-format detection and instance segmentation datasets, read through pycocotools.

Layout (names configurable): ``<data_root>/annotations/instances_train2017.json`` with its images
in ``<data_root>/train2017/`` (``val2017`` likewise). Any dataset in the COCO format works:

- category ids need not be contiguous: the sorted ids become labels ``0..K-1``; metainfo
  ``cat_ids`` (label -> id) and ``classes`` (names in label order) let metrics and dumpers map
  predictions back to the file's ids;
- masks may be polygons or RLE (compressed or not); crowd annotations (``iscrowd: 1``) are kept
  as ignored regions (``ignore_flag``), never training targets;
- in training (``filter_empty_gt``) images without a usable object are skipped; in testing every
  image is kept, so the metric sees all of them.

Annotations that cannot be used are dropped and counted in the log: boxes of zero or negative
width or height, and objects whose polygons all have fewer than three points. An annotation whose
category is not in ``categories``, or whose RLE does not match its image's size, is a DataError
naming the annotation id and the file. A missing image file is a DataError naming it when loaded.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any

from mmengine.logging import print_log
from pycocotools.coco import COCO

from vitasks.data.det_transforms import normalize_segmentation
from vitasks.data.imagenet import FileDataset, check_dataset_args, dataset_key, check_num_classes
from vitasks.errors import DataError
from vitasks.registry import DATASETS

__all__ = ["CocoDataset", "load_coco_api", "read_json"]


def read_json(path: str, what: str, kind: str = "") -> Any:
    """The JSON file ``path`` (a ``what``, e.g. ``annotation file``); a missing or unreadable file
    is a DataError naming it (and its ``kind``)."""
    if not os.path.isfile(path):
        raise DataError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the {kind or what} {path}: {e}") from e


def load_coco_api(path: str) -> COCO:
    """A pycocotools ``COCO`` index of the annotation file at ``path`` (its progress lines go
    to nothing); a missing or malformed file is a DataError naming it."""
    dataset = read_json(path, "annotation file", "COCO annotation file")
    if not isinstance(dataset, dict) or not isinstance(dataset.get("images"), list):
        raise DataError(f"{path} is not a COCO annotation file (expected an object with an `images` list)")
    dataset.setdefault("annotations", [])
    dataset.setdefault("categories", [])
    api = COCO()
    api.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


@DATASETS.register_module()
class CocoDataset(FileDataset):
    """Detection / instance segmentation dataset in the COCO format.

    ``load_data_list()`` gives, per image (sorted by image id)::

        {"img_path", "img_id", "height", "width",
         "instances": [{"bbox": [x1, y1, x2, y2], "bbox_label": 0..K-1, "ignore_flag": 0/1,
                        "mask": polygons / RLE / None, "ann_id": int}, ...]}

    which :class:`~vitasks.data.det_transforms.LoadDetAnnotations` reads.

    Args:
        data_root: the dataset folder; ``ann_file`` and ``img_dir`` are relative to it.
        ann_file: the annotation JSON (``annotations/instances_val2017.json`` for validation).
        img_dir: the image folder (``val2017``).
        num_classes: expected number of categories (configs pass ``${num_classes}``); a
            mismatch with the file's ``categories`` is a ConfigError.
        filter_empty_gt: in training, skip images without an object to learn (no annotation, or
            only crowd regions, as detectron2). Never applied with ``test_mode``.
        **kwargs: ``skip_bad_samples`` (in training, skip unreadable images with a warning), ``pipeline``,
            ``test_mode`` and the rest of :class:`~vitasks.data.imagenet.FileDataset`'s.
    """

    def __init__(
        self,
        data_root: str | None = None,
        ann_file: str = "annotations/instances_train2017.json",
        img_dir: str = "train2017",
        num_classes: int | None = None,
        filter_empty_gt: bool = True,
        **kwargs,
    ) -> None:
        owner = dataset_key(self)
        check_dataset_args(owner, data_root, num_classes, "a folder with annotations/ and the image folders")
        self.ann_path = os.path.abspath(os.path.join(data_root, ann_file))
        self.img_path = os.path.join(data_root, img_dir)
        if not os.path.isdir(self.img_path):
            raise DataError(f"{owner}: image folder {self.img_path!r} (img_dir) does not exist")
        self.filter_empty_gt = bool(filter_empty_gt)
        # What loading dropped, for the log and for callers: {reason: count}.
        self.load_stats: dict[str, int] = {}

        self._coco = load_coco_api(self.ann_path)
        categories = sorted(self._coco.dataset["categories"], key=lambda c: int(c["id"]))
        if not categories:
            raise DataError(f"{self.ann_path} has no `categories`")
        cat_ids = [int(c["id"]) for c in categories]
        if len(set(cat_ids)) != len(cat_ids):
            raise DataError(f"{self.ann_path}: category ids are not unique: {cat_ids}")
        names = [str(c.get("name", c["id"])) for c in categories]
        check_num_classes(num_classes, names, f"{self.ann_path} (its `categories`)")
        self.cat_to_label = {cat_id: label for label, cat_id in enumerate(cat_ids)}

        # The annotation file scores the predictions (CocoMetric) and holds the ids a dump must use.
        super().__init__(data_root, dict(classes=tuple(names), cat_ids=tuple(cat_ids)),
                         dict(ann_file=self.ann_path, data_root=data_root), **kwargs)

    def full_init(self) -> None:
        super().full_init()
        self._coco = None  # the data list holds what is needed; free the index

    def _instance(self, ann: dict, image: dict) -> dict | None:
        """One annotation as an instance dict; ``None`` (counted) when unusable."""
        ann_id = ann.get("id", "?")
        cat_id = ann.get("category_id")
        if cat_id not in self.cat_to_label:
            raise DataError(
                f"{self.ann_path}: annotation {ann_id} (image {image['id']}) has category_id "
                f"{cat_id!r}, which is not among the `categories` ids {sorted(self.cat_to_label)}"
            )
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise DataError(f"{self.ann_path}: annotation {ann_id} has no [x, y, w, h] `bbox` (got {bbox!r})")
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            self._count("boxes of zero or negative size", ann_id)
            return None
        instance = {
            "bbox": [x, y, x + w, y + h],
            "bbox_label": self.cat_to_label[cat_id],
            "ignore_flag": int(bool(ann.get("iscrowd", 0))),
            "mask": None,
            "ann_id": ann_id,
        }
        segmentation = ann.get("segmentation")
        if segmentation:
            try:
                mask = normalize_segmentation(segmentation, int(image["height"]), int(image["width"]))
            except ValueError as e:
                raise DataError(f"{self.ann_path}: annotation {ann_id} (image {image['id']}): {e}") from e
            if mask is None:
                self._count("objects without a valid segmentation (polygons of < 3 points)", ann_id)
                return None
            instance["mask"] = mask
        return instance

    def _count(self, reason: str, ann_id) -> None:
        self.load_stats[reason] = self.load_stats.get(reason, 0) + 1
        self._examples.setdefault(reason, [])
        if len(self._examples[reason]) < 5:
            self._examples[reason].append(ann_id)

    def load_data_list(self) -> list[dict]:
        if self._coco is None:
            self._coco = load_coco_api(self.ann_path)
        self.load_stats, self._examples = {}, {}
        data_list = []
        for img_id in sorted(self._coco.imgs):
            image = self._coco.imgs[img_id]
            for key in ("file_name", "height", "width"):
                if key not in image:
                    raise DataError(f"{self.ann_path}: image {img_id} has no `{key}`")
            instances = [self._instance(ann, image) for ann in self._coco.imgToAnns.get(img_id, [])]
            data_list.append({
                "img_path": os.path.join(self.img_path, image["file_name"]),
                "img_id": img_id,
                "height": int(image["height"]),
                "width": int(image["width"]),
                "instances": [inst for inst in instances if inst is not None],
            })
        for reason, count in self.load_stats.items():
            shown = ", ".join(str(a) for a in self._examples[reason])
            print_log(f"{self.ann_path}: dropped {count} annotation(s): {reason} (ids {shown}"
                      f"{', ...' if count > len(self._examples[reason]) else ''})", logger="current")
        return data_list

    def filter_data(self) -> list[dict]:
        """In training with ``filter_empty_gt``, leave out images without a non-crowd object."""
        if self.test_mode or not self.filter_empty_gt:
            return self.data_list
        kept = [info for info in self.data_list
                if any(not inst["ignore_flag"] for inst in info["instances"])]
        skipped = len(self.data_list) - len(kept)
        self.load_stats["images without objects (skipped in training)"] = skipped
        if skipped:
            print_log(f"{self.ann_path}: {skipped} of {len(self.data_list)} images have no object "
                      "to learn (filter_empty_gt: true) and are skipped in training", logger="current")
        if not kept:
            raise DataError(f"{self.ann_path}: no image has an object to learn (all are empty or crowd only)")
        return kept
