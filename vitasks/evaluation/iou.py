"""Semantic segmentation scoring (mmsegmentation's definitions) and a PNG prediction dumper.

Per image, only pixels whose label differs from the ignore index count. Four areas per class are
summed over the whole dataset before anything is divided:

- intersection: pixels predicted as the class whose label is the class;
- union: pixels predicted as the class or labelled as it;
- pred / label: pixels predicted as / labelled as the class.

``aAcc = sum(intersection) / sum(label)``; per class ``IoU = intersection / union`` and
``Acc = intersection / label``; ``mIoU`` / ``mAcc`` are the NaN-skipping means over classes (a
class absent from both predictions and labels has ``0 / 0`` = NaN and does not count). All three
are percentages rounded to two decimals, as mmseg reports them.
"""

from __future__ import annotations

import os
import os.path as osp
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from mmengine.evaluator import BaseMetric
from mmengine.logging import print_log

from vitasks.data.seg_labels import encode_label_map, sample_reduce_zero_label
from vitasks.checks import positive_int
from vitasks.errors import ConfigError, DataError
from vitasks.evaluation.dump import PredictionDumper
from vitasks.evaluation.meta import from_dataset
from vitasks.registry import METRICS


def _field(sample: Any, key: str, default: Any = None) -> Any:
    """Read ``key`` from a data sample given as a dict (Evaluator) or a data element."""
    if isinstance(sample, Mapping):
        return sample.get(key, default)
    return getattr(sample, key, default)


def _pixel_data(sample: Any, key: str) -> torch.Tensor | None:
    """The ``(H, W)`` tensor of a PixelData field (``pred_sem_seg`` / ``gt_sem_seg``)."""
    value = _field(sample, key)
    if value is None:
        return None
    data = _field(value, "data", value)
    data = torch.as_tensor(data)
    if data.ndim == 3:
        data = data[0]
    return data


def intersect_and_union(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class intersection, union, prediction and label areas of one image.

    Args:
        pred: predicted class ids, shape (H, W).
        label: ground-truth class ids, shape (H, W); ``ignore_index`` pixels are skipped.
        num_classes: number of classes K.
        ignore_index: label value that does not count.

    Returns:
        Four float64 tensors of shape (K,): intersection, union, pred and label areas.
    """
    pred = pred.reshape(-1).long()
    label = label.reshape(-1).long().to(pred.device)
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]
    # Labels outside [0, K) that are not ignored are a data bug, not something to score silently.
    if label.numel() and (label.min() < 0 or label.max() >= num_classes):
        bad = label[(label < 0) | (label >= num_classes)][0].item()
        raise DataError(
            f"IoUMetric: label value {bad} is neither a class id in [0, {num_classes}) nor the "
            f"ignore index {ignore_index}; check num_classes / reduce_zero_label"
        )
    hit = pred[pred == label]
    area_inter = torch.bincount(hit, minlength=num_classes)[:num_classes]
    # Predictions outside [0, K) (impossible for an argmax over K logits) count as nothing.
    valid_pred = pred[(pred >= 0) & (pred < num_classes)]
    area_pred = torch.bincount(valid_pred, minlength=num_classes)[:num_classes]
    area_label = torch.bincount(label, minlength=num_classes)[:num_classes]
    area_union = area_pred + area_label - area_inter
    return (
        area_inter.double().cpu(),
        area_union.double().cpu(),
        area_pred.double().cpu(),
        area_label.double().cpu(),
    )


def scores_from_areas(
    area_inter: np.ndarray, area_union: np.ndarray, area_label: np.ndarray
) -> dict[str, Any]:
    """aAcc (scalar) and per-class IoU / Acc (arrays, NaN for 0/0) as fractions."""
    area_inter = np.asarray(area_inter, dtype=np.float64)
    area_union = np.asarray(area_union, dtype=np.float64)
    area_label = np.asarray(area_label, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        a_acc = area_inter.sum() / area_label.sum()
        iou = area_inter / area_union
        acc = area_inter / area_label
    return {"aAcc": a_acc, "IoU": iou, "Acc": acc}


def _nanmean(values: np.ndarray) -> float:
    """Mean over the non-NaN entries; NaN (not a warning) when all are NaN."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


@METRICS.register_module()
class IoUMetric(BaseMetric):
    """aAcc, mIoU and mAcc over a dataset, with a per-class IoU/Acc table in the log.

    Args:
        num_classes: number of classes; ``None`` takes ``len(dataset_meta["classes"])``.
        ignore_index: label value excluded from scoring.
        class_names: names for the table; ``None`` takes ``dataset_meta["classes"]``.
        print_table: log the per-class table after each evaluation.
        collect_device: where results are gathered in distributed runs.
        prefix: prefix of the metric names; none by default (keys are ``aAcc``, ``mIoU``,
            ``mAcc`` as in mmseg).
    """

    # An empty prefix (not None): mmseg's names have none, and BaseMetric warns only on None.
    default_prefix: str | None = ""

    def __init__(
        self,
        num_classes: int | None = None,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        print_table: bool = True,
        collect_device: str = "cpu",
        prefix: str | None = None,
    ) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.num_classes = None if num_classes is None else positive_int(num_classes, "IoUMetric.num_classes")
        self.ignore_index = int(ignore_index)
        self.class_names = None if class_names is None else list(class_names)
        self.print_table = print_table

    def _num_classes(self) -> int:
        if self.num_classes is not None:
            classes = (self.dataset_meta or {}).get("classes")
            if classes is not None and len(classes) != self.num_classes:
                raise ConfigError(
                    f"IoUMetric: num_classes={self.num_classes} but the dataset has "
                    f"{len(classes)} classes; set num_classes to {len(classes)}"
                )
            return self.num_classes
        return len(from_dataset(self, "classes", "class names in the dataset's metainfo",
                                "num_classes is not set: set val_evaluator.num_classes"))

    def process(self, data_batch: Any, data_samples: Sequence[Any]) -> None:
        """Accumulate the four areas of each predicted sample."""
        num_classes = self._num_classes()
        for sample in data_samples:
            pred = _pixel_data(sample, "pred_sem_seg")
            label = _pixel_data(sample, "gt_sem_seg")
            name = _field(sample, "img_path", "<unknown image>")
            if pred is None or label is None:
                raise DataError(
                    f"IoUMetric: sample {name} lacks "
                    f"{'pred_sem_seg' if pred is None else 'gt_sem_seg'}; the test pipeline "
                    "must load annotations and the model must predict"
                )
            if pred.shape != label.shape:
                raise DataError(
                    f"IoUMetric: prediction of {name} has size {tuple(pred.shape)} but its label "
                    f"has size {tuple(label.shape)}; predictions are scored at the label size"
                )
            try:
                self.results.append(
                    intersect_and_union(pred, label, num_classes, self.ignore_index)
                )
            except DataError as err:
                raise DataError(f"{err} (sample {name})") from None

    def compute_metrics(self, results: list) -> dict[str, float]:
        """Sum areas over the dataset, divide, and log the per-class table."""
        num_classes = self._num_classes()
        if not results:
            totals = [np.zeros(num_classes)] * 4
        else:
            totals = [sum(np.asarray(r[i], dtype=np.float64) for r in results) for i in range(4)]
        area_inter, area_union, _area_pred, area_label = totals
        scores = scores_from_areas(area_inter, area_union, area_label)
        metrics = {
            "aAcc": round(float(scores["aAcc"]) * 100, 2),
            "mIoU": round(_nanmean(scores["IoU"]) * 100, 2),
            "mAcc": round(_nanmean(scores["Acc"]) * 100, 2),
        }
        if self.print_table:
            names = self.class_names or list((self.dataset_meta or {}).get("classes") or [])
            if len(names) != num_classes:
                names = [str(i) for i in range(num_classes)]
            print_log("per class results:\n" + format_class_table(names, scores), logger="current")
        return metrics


def format_class_table(names: Sequence[str], scores: Mapping[str, np.ndarray]) -> str:
    """A plain-text table of per-class IoU and Acc (percent, two decimals; nan when 0/0)."""
    width = max([len("Class")] + [len(n) for n in names])
    lines = [f"| {'Class':<{width}} |   IoU  |   Acc  |", f"|{'-' * (width + 2)}|--------|--------|"]
    for name, iou, acc in zip(names, scores["IoU"], scores["Acc"]):
        lines.append(f"| {name:<{width}} | {iou * 100:6.2f} | {acc * 100:6.2f} |")
    return "\n".join(lines)


@METRICS.register_module()
class SegPredictionDumper(PredictionDumper):
    """Write each prediction as a PNG label map named after its image (``--dump PATH``).

    The PNG's path under ``out_path`` is the image's path relative to the image folder, with
    ``.png`` for its suffix (``a/x.jpg`` -> ``OUT/a/x.png``; sub-folders are created), so images
    of the same name in different folders do not overwrite each other. The image folder is
    ``img_root``, else the dataset's (``img_root`` in its metainfo, which the segmentation
    datasets give); an image outside it, or without either, is named by its file name, and two
    predictions that would get the same name are refused (DataError) rather than overwritten.

    Values are the dataset's own label values: with ``reduce_zero_label`` (ADE20K) a predicted
    class id ``c`` is written as ``c + 1``, so ADE predictions read 1..150 like its annotations
    (:mod:`vitasks.data.seg_labels`). Maps with values above 255 are written as 16-bit PNGs.

    Args:
        out_path: folder to write into (created if missing).
        reduce_zero_label: used for samples that do not carry their own ``reduce_zero_label``;
            ``None`` takes the dataset's (metainfo).
        img_root: the image folder that names are made relative to; ``None`` takes the
            dataset's.
        **kwargs: ``collect_device`` (unused: files are written by every rank) and ``prefix``,
            as :class:`~vitasks.evaluation.dump.PredictionDumper`.
    """

    def __init__(self, out_path: str, reduce_zero_label: bool | None = None, img_root: str | None = None,
                 **kwargs) -> None:
        super().__init__(out_path, **kwargs)
        self.reduce_zero_label = reduce_zero_label
        self.img_root = img_root
        # Written file -> the image it came from, to refuse a second prediction of the same name.
        self._written: dict[str, str] = {}
        os.makedirs(self.out_path, exist_ok=True)

    def _default_reduce(self) -> bool | None:
        if self.reduce_zero_label is not None:
            return bool(self.reduce_zero_label)
        return (self.dataset_meta or {}).get("reduce_zero_label")

    def output_name(self, img_path: str) -> str:
        """The PNG's path relative to ``out_path`` (``/``-separated) for an image."""
        root = self.img_root or (self.dataset_meta or {}).get("img_root")
        rel = None
        if root:
            rel = osp.relpath(osp.abspath(img_path), osp.abspath(root))
            if rel == os.pardir or rel.startswith(os.pardir + os.sep):
                rel = None  # outside the image folder
        if rel is None:
            rel = osp.basename(img_path)
        return osp.splitext(rel)[0].replace(os.sep, "/") + ".png"

    def process(self, data_batch: Any, data_samples: Sequence[Any]) -> None:
        """Write one PNG per sample."""
        import cv2

        if not self.results:  # a new evaluation (evaluate() empties the results on every rank)
            self._written.clear()
        for index, sample in enumerate(data_samples):
            pred = _pixel_data(sample, "pred_sem_seg")
            if pred is None:
                raise DataError("SegPredictionDumper: a sample has no pred_sem_seg to dump")
            img_path = _field(sample, "img_path") or f"{len(self.results) + index:08d}"
            name = self.output_name(str(img_path))
            if name in self._written:
                raise DataError(
                    f"SegPredictionDumper: {img_path} and {self._written[name]} would both be written "
                    f"to {osp.join(self.out_path, name)}; set the dumper's img_root to the image folder "
                    "so that predictions are named by their path relative to it"
                )
            path = osp.join(self.out_path, *name.split("/"))
            os.makedirs(osp.dirname(path), exist_ok=True)
            values = encode_label_map(pred, sample_reduce_zero_label(sample, self._default_reduce()))
            if not cv2.imwrite(path, values):
                raise DataError(f"SegPredictionDumper: could not write the prediction of {img_path} to {path}")
            self._written[name] = str(img_path)
        self.results.extend([None] * len(data_samples))

    def compute_metrics(self, results: list) -> dict:
        """Nothing to score; the files are the output."""
        print_log(f"segmentation predictions written to {self.out_path}", logger="current")
        return {}
