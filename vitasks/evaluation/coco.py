"""COCO box and mask AP with pycocotools: the metric, the results dumper and ``tools/eval_coco.py``.

Predictions are data samples with ``pred_instances``: ``bboxes`` (N, 4) xyxy in the original
image's pixels, ``scores`` (N,), ``labels`` (N,) in ``0..K-1`` and, for masks, ``masks`` as bool
(N, H, W) at the original size or a list of COCO RLE dicts. They become COCO results (``bbox`` as
xywh, ``category_id`` mapped back through the dataset's ``cat_ids``, masks RLE-encoded) scored by
``COCOeval`` against the dataset's annotation file.

Names (mmdet's): ``coco/bbox_mAP``, ``coco/bbox_mAP_50``, ``coco/bbox_mAP_75``, ``coco/bbox_mAP_s``,
``coco/bbox_mAP_m``, ``coco/bbox_mAP_l`` and the same with ``segm_``: fractions, pycocotools' own
numbers unrounded (-1 where the annotations have no object of that size), and the 12-line summaries
in the log.

Mask AP follows detectron2 and mmdet: a result's ``bbox`` is left out when scoring ``segm``, so
pycocotools sizes each detection by its mask's area (with the box in, ``loadRes`` would use the
box's area and shift the small/medium/large numbers). ``tools/eval_coco.py`` does the same, and
the dumper also writes the mask results alone to ``<name>.segm.json`` for plain pycocotools.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from mmengine.evaluator import BaseMetric
from mmengine.logging import print_log
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vitasks.checks import config_key
from vitasks.data.coco import load_coco_api, read_json
from vitasks.errors import ConfigError, DataError
from vitasks.evaluation.dump import PredictionDumper
from vitasks.evaluation.meta import from_dataset
from vitasks.registry import METRICS

__all__ = [
    "IOU_TYPES",
    "STAT_NAMES",
    "CocoMetric",
    "CocoResultsDumper",
    "check_results",
    "evaluate_coco",
    "evaluate_results_file",
    "instances_to_coco",
]

IOU_TYPES = ("bbox", "segm")
# COCOeval.stats[0:6] by mmdet's names; the other six (AR) are in the printed summary.
STAT_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")
PREFIX = "coco"


def _field(sample: Any, key: str, default: Any = None) -> Any:
    """``key`` of a data sample given as a dict (what mmengine's Evaluator passes) or an element."""
    if isinstance(sample, Mapping):
        return sample.get(key, default)
    return getattr(sample, key, default)


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _encode_masks(masks: Any, shape: tuple[int, int] | None, where: str) -> list[dict]:
    """COCO RLE (``counts`` as str, JSON-ready) of (N, H, W) masks or a list of RLE dicts."""
    if isinstance(masks, (list, tuple)):
        out = []
        for rle in masks:
            if not isinstance(rle, Mapping) or "counts" not in rle or "size" not in rle:
                raise DataError(f"{where}: a predicted mask given as a list must hold RLE dicts")
            counts = rle["counts"]
            out.append({"size": [int(s) for s in rle["size"]],
                        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts})
        return out
    array = _numpy(masks)
    if array.ndim != 3:
        raise DataError(f"{where}: predicted masks must be (N, H, W), got shape {array.shape}")
    if shape is not None and array.shape[0] and tuple(array.shape[1:]) != tuple(shape):
        raise DataError(
            f"{where}: predicted masks are {array.shape[1]}x{array.shape[2]} but the original image "
            f"is {shape[0]}x{shape[1]}; masks must be pasted at the original size"
        )
    binary = array >= 0.5 if array.dtype.kind == "f" else array.astype(bool)
    # pycocotools encodes (H, W, N) uint8 in column-major order.
    encoded = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8))) \
        if len(binary) else []
    return [{"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
            for rle in encoded]


def instances_to_coco(
    sample: Any, cat_ids: Sequence[int], with_masks: bool | None = None
) -> tuple[int, list[dict]]:
    """A predicted sample's image id and its COCO result entries.

    Each entry: ``image_id``, ``category_id`` (``cat_ids[label]``), ``bbox`` (xywh), ``score``
    and, with masks, ``segmentation`` (RLE). ``with_masks``: ``None`` takes masks when present,
    True requires them (DataError when missing), False leaves them out.
    """
    img_id = _field(sample, "img_id")
    where = f"sample {_field(sample, 'img_path', img_id)}"
    if img_id is None:
        raise DataError(f"{where} has no `img_id` in its metainfo (PackDetInputs' meta_keys must keep it)")
    pred = _field(sample, "pred_instances")
    if pred is None:
        raise DataError(f"{where} has no `pred_instances`; the model must predict boxes")
    bboxes = _numpy(_field(pred, "bboxes")).astype(np.float64).reshape(-1, 4)
    scores = _numpy(_field(pred, "scores")).astype(np.float64).reshape(-1)
    labels = _numpy(_field(pred, "labels")).astype(np.int64).reshape(-1)
    if not len(bboxes) == len(scores) == len(labels):
        raise DataError(f"{where}: {len(bboxes)} boxes, {len(scores)} scores and {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= len(cat_ids)):
        raise DataError(
            f"{where}: predicted label {int(labels.max() if labels.max() >= len(cat_ids) else labels.min())} "
            f"is outside 0..{len(cat_ids) - 1} (the dataset has {len(cat_ids)} categories); check num_classes"
        )
    masks = _field(pred, "masks")
    if with_masks and masks is None and len(labels):
        raise DataError(
            f"{where}: the metric scores `segm` but the predictions have no masks; "
            "set the metric's `metric: [bbox]` for a box-only model"
        )
    rles = None
    if masks is not None and with_masks is not False:
        ori_shape = _field(sample, "ori_shape")
        rles = _encode_masks(masks, None if ori_shape is None else tuple(ori_shape[:2]), where)
        if len(rles) != len(labels):
            raise DataError(f"{where}: {len(rles)} masks for {len(labels)} boxes")
    entries = []
    for i in range(len(labels)):
        x1, y1, x2, y2 = (float(v) for v in bboxes[i])
        entry = {
            "image_id": int(img_id),
            "category_id": int(cat_ids[labels[i]]),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": float(scores[i]),
        }
        if rles is not None:
            entry["segmentation"] = rles[i]
        entries.append(entry)
    return int(img_id), entries


def _segmentation_rle(segmentation: Any, height: int, width: int) -> dict:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as one compressed RLE
    (pycocotools' ``annToRLE`` rule)."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def _complete_ground_truth(api: COCO) -> COCO:
    """Fill the ``iscrowd`` (0) and ``area`` (mask area, else box area) that COCOeval reads and
    some COCO-format files leave out."""
    changed = False
    for ann in api.dataset.get("annotations", []):
        if "iscrowd" not in ann:
            ann["iscrowd"], changed = 0, True
        if "area" not in ann:
            seg, img = ann.get("segmentation"), api.imgs.get(ann.get("image_id"), {})
            if seg and "height" in img:
                ann["area"] = float(mask_utils.area(_segmentation_rle(seg, img["height"], img["width"])))
            else:
                ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
            changed = True
    if changed:
        with contextlib.redirect_stdout(io.StringIO()):
            api.createIndex()
    return api


def load_ground_truth(path: str) -> COCO:
    """The annotation file as pycocotools' COCO, ready for COCOeval."""
    return _complete_ground_truth(load_coco_api(path))


def check_results(results: Any, gt: COCO, source: str) -> list[dict]:
    """Validate COCO results against the annotations; DataErrors name ``source`` and the fault."""
    if not isinstance(results, list):
        raise DataError(
            f"{source}: a COCO results file is a JSON list of detections, got {type(results).__name__}"
        )
    if not results:
        raise DataError(
            f"{source} holds no detections (an empty list); there is nothing to score (a model that "
            "detects nothing scores 0: check the score threshold and that the test ran on images)"
        )
    for i, entry in enumerate(results):
        required = ("image_id", "category_id", "score")
        missing = [k for k in required if not isinstance(entry, dict) or k not in entry]
        if missing or ("bbox" not in entry and "segmentation" not in entry):
            raise DataError(
                f"{source}: detection {i} lacks {', '.join(missing) or 'both bbox and segmentation'} "
                "(each needs image_id, category_id, score and a bbox and/or segmentation)"
            )
    for key, known, message in (
        ("image_id", gt.imgs, "{n} image id(s) are not in the annotations: {ids} (results and annotation file "
                              "do not belong together)"),
        ("category_id", gt.cats, "category id(s) {ids} are not in the annotations' categories {known} (are labels "
                                 "mapped back to category ids?)"),
    ):
        unknown = sorted({r[key] for r in results} - set(known))
        if unknown:
            ids = ", ".join(str(i) for i in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            raise DataError(f"{source}: " + message.format(n=len(unknown), ids=ids, known=sorted(known)[:10]))
    for key in ("segmentation", "bbox"):
        count = sum(key in r for r in results)
        if 0 < count < len(results):
            raise DataError(
                f"{source}: {count} of {len(results)} detections have a `{key}`; all or none must"
            )
    return results


def _empty_results(gt: COCO) -> COCO:
    """A results index without detections (``loadRes`` cannot take an empty list)."""
    res = COCO()
    res.dataset = {"images": list(gt.dataset["images"]),
                   "categories": copy.deepcopy(gt.dataset["categories"]), "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def _results_for(results: list[dict], iou_type: str) -> list[dict]:
    """Copies (``loadRes`` edits its input) of the entries scored for ``iou_type``."""
    if iou_type == "segm":
        # Sized by the mask, not the box (detectron2, mmdet): drop `bbox` so loadRes uses mask area.
        return [{k: v for k, v in r.items() if k != "bbox"} for r in results if "segmentation" in r]
    return [copy.deepcopy(r) for r in results if "bbox" in r]


def per_class_ap(coco_eval: COCOeval) -> list[float]:
    """AP (IoU 0.50:0.95, all areas, 100 detections) of each category in ``params.catIds``; NaN
    where the category has no ground truth."""
    precision = coco_eval.eval["precision"]  # (T IoUs, R recalls, K categories, A areas, M maxDets)
    values = []
    for k in range(precision.shape[2]):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        values.append(float(p.mean()) if p.size else float("nan"))
    return values


def evaluate_coco(
    gt: COCO,
    results: list[dict],
    iou_types: Sequence[str] = IOU_TYPES,
    img_ids: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
) -> tuple[dict[str, float], str]:
    """Score COCO results with COCOeval.

    Args:
        gt: the annotations.
        results: COCO result entries (not modified).
        iou_types: ``bbox`` and/or ``segm``.
        img_ids: the images evaluated (all of the annotations' by default).
        class_names: when given, a per-class AP table is added to the text.

    Returns:
        ``{"bbox_mAP": ..., "segm_mAP_l": ...}`` (unprefixed) and the printed summaries.
    """
    metrics: dict[str, float] = {}
    text = []
    for iou_type in _iou_types(iou_types, "COCO metric types"):
        chosen = _results_for(results, iou_type)
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(chosen) if chosen else _empty_results(gt)
            coco_eval = COCOeval(gt, dt, iou_type)
            if img_ids is not None:
                coco_eval.params.imgIds = sorted(int(i) for i in img_ids)
            coco_eval.evaluate()
            coco_eval.accumulate()
        summary = io.StringIO()
        with contextlib.redirect_stdout(summary):
            coco_eval.summarize()
        text.append(f"COCO {iou_type} ({len(chosen)} detections on {len(coco_eval.params.imgIds)} images):\n"
                    + summary.getvalue().rstrip())
        for i, name in enumerate(STAT_NAMES):
            metrics[f"{iou_type}_{name}"] = float(coco_eval.stats[i])
        if class_names is not None:
            aps = per_class_ap(coco_eval)
            names = [class_names[k] if k < len(class_names) else str(c)
                     for k, c in enumerate(coco_eval.params.catIds)]
            width = max([len("category")] + [len(n) for n in names])
            rows = [f"{n:<{width}}  {ap:.3f}" for n, ap in zip(names, aps)]
            text.append(f"{iou_type} AP per category:\n{'category':<{width}}  AP\n" + "\n".join(rows))
    return metrics, "\n".join(text)


def _iou_types(metric: str | Sequence[str], key: str) -> tuple[str, ...]:
    types = (metric,) if isinstance(metric, str) else tuple(metric)
    if not types or any(m not in IOU_TYPES for m in types):
        raise ConfigError(f"{key} must be a subset of {list(IOU_TYPES)}, got {metric!r}")
    return types


@METRICS.register_module()
class CocoMetric(BaseMetric):
    """COCO AP for boxes and masks, as mmdet's ``CocoMetric`` names it.

    Args:
        ann_file: the annotation JSON; ``None`` takes the dataset's (``ann_file`` in the metainfo
            of :class:`~vitasks.data.coco.CocoDataset`).
        metric: ``bbox`` and/or ``segm``.
        classwise: add a per-category AP table to the log.
        collect_device: where results are gathered in distributed runs.
        prefix: name prefix (``coco``).
    """

    default_prefix: str | None = PREFIX

    def __init__(
        self,
        ann_file: str | None = None,
        metric: str | Sequence[str] = IOU_TYPES,
        classwise: bool = False,
        collect_device: str = "cpu",
        prefix: str | None = None,
    ) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.iou_types = _iou_types(metric, config_key("metric", default="CocoMetric"))
        self.ann_file = ann_file
        self.classwise = bool(classwise)
        self._gt: COCO | None = None
        self._gt_path: str | None = None

    def _ann_file(self) -> str:
        return str(from_dataset(self, "ann_file", "annotation file", "set the evaluator's `ann_file`, or evaluate a "
                                "CocoDataset (its metainfo names the file)", given=self.ann_file or None))

    def _cat_ids(self) -> list[int]:
        cat_ids = (self.dataset_meta or {}).get("cat_ids")
        if cat_ids is None:
            # A dataset without the map (labels are the sorted category ids' positions by the
            # same rule CocoDataset uses).
            cat_ids = sorted(self._ground_truth().cats)
        return [int(c) for c in cat_ids]

    def _ground_truth(self) -> COCO:
        path = self._ann_file()
        if self._gt is None or self._gt_path != path:
            self._gt, self._gt_path = load_ground_truth(path), path
        return self._gt

    def process(self, data_batch: Any, data_samples: Sequence[Any]) -> None:
        """Convert each sample's predictions to COCO results now (masks become RLE, small)."""
        cat_ids = self._cat_ids()
        for sample in data_samples:
            img_id, entries = instances_to_coco(sample, cat_ids, with_masks="segm" in self.iou_types)
            self.results.append((img_id, entries))

    def compute_metrics(self, results: list) -> dict[str, float]:
        gt = self._ground_truth()
        img_ids = sorted({img_id for img_id, _ in results})
        unknown = [i for i in img_ids if i not in gt.imgs]
        if unknown:
            raise DataError(
                f"CocoMetric: image id(s) {unknown[:5]} of the evaluated samples are not in {self._gt_path}; "
                "the metric's ann_file must be the dataset's annotation file"
            )
        entries = [entry for _, sample_entries in results for entry in sample_entries]
        if not entries:
            print_log("CocoMetric: the model made no detection on any image; every AP is 0",
                      logger="current")
        names = (self.dataset_meta or {}).get("classes") if self.classwise else None
        if self.classwise and names is None:
            names = [gt.cats[c].get("name", str(c)) for c in sorted(gt.cats)]
        metrics, text = evaluate_coco(gt, entries, self.iou_types, img_ids=img_ids, class_names=names)
        print_log("\n" + text, logger="current")
        return metrics


@METRICS.register_module()
class CocoResultsDumper(PredictionDumper):
    """Write the predictions as a COCO results JSON (``tools/test.py --dump PATH``): a list of
    ``{image_id, category_id, bbox (xywh), score[, segmentation (RLE)]}`` with the annotation
    file's image and category ids, which pycocotools scores as it is (``tools/eval_coco.py``).

    With masks, the mask results alone (no ``bbox``, so pycocotools sizes them by mask area as
    the metric does) also go to ``<PATH without .json>.segm.json``.

    Args:
        out_path: the JSON file to write (folders are created).
        with_masks: ``None`` writes masks when the predictions have them; False never.
        **kwargs: ``collect_device`` and ``prefix`` (unused: it reports no numbers), as
            :class:`~vitasks.evaluation.dump.PredictionDumper`.
    """

    def __init__(self, out_path: str | None = None, with_masks: bool | None = None, **kwargs) -> None:
        super().__init__(out_path, **kwargs)
        self.with_masks = with_masks

    @property
    def segm_path(self) -> str:
        stem = self.out_path[:-5] if self.out_path.lower().endswith(".json") else self.out_path
        return stem + ".segm.json"

    def _cat_ids(self) -> list[int]:
        cat_ids = from_dataset(self, "cat_ids", "category ids (label -> category id) in the dataset's metainfo",
                               "dump a CocoDataset")
        return [int(c) for c in cat_ids]

    def process(self, data_batch: Any, data_samples: Sequence[Any]) -> None:
        cat_ids = self._cat_ids()
        for sample in data_samples:
            self.results.append(instances_to_coco(sample, cat_ids, with_masks=self.with_masks))

    def compute_metrics(self, results: list) -> dict:
        by_image = sorted(results, key=lambda r: r[0])
        entries = [entry for _, sample_entries in by_image for entry in sample_entries]
        os.makedirs(os.path.dirname(os.path.abspath(self.out_path)), exist_ok=True)
        _write_json(self.out_path, entries)
        written = [self.out_path]
        segm = _results_for(entries, "segm")
        if segm:
            _write_json(self.segm_path, segm)
            written.append(self.segm_path)
        print_log(f"wrote {len(entries)} detections on {len(results)} images to {' and '.join(written)}",
                  logger="current")
        return {}


def _write_json(path: str, data: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def evaluate_results_file(results_path: str, ann_path: str) -> tuple[dict[str, float], str]:
    """Score a COCO results file against an annotation file: ``bbox`` when the entries have
    boxes, ``segm`` when they have segmentations. Returns the prefixed metrics
    (``coco/bbox_mAP``, ...) and the printed summaries."""
    gt = load_ground_truth(ann_path)
    results = read_json(results_path, "results file")
    check_results(results, gt, results_path)
    iou_types = [t for t, key in (("bbox", "bbox"), ("segm", "segmentation")) if key in results[0]]
    metrics, text = evaluate_coco(gt, results, iou_types)
    return {f"{PREFIX}/{name}": value for name, value in metrics.items()}, text
