"""Detection and instance segmentation predictions for ``vitasks infer``: boxes, labels, scores
and masks over the image.

For each input :func:`vitasks.apis.run_inference` writes, through :class:`DetPredictionDrawer`:

- ``<name>.png``: every detection scoring at least ``score_threshold`` drawn over the image
  (enlarged for legibility when small): its mask blended in its class colour (``alpha`` 0.5),
  its box outlined in the same colour and ``"name 0.93"`` at the box's top-left corner;
- in ``<name>.json``: ``"detections": [{"label", "class_name", "score", "bbox", "area",
  "segmentation"}, ...]``, highest score first, with ``bbox`` as ``[x1, y1, x2, y2]`` in the
  original image's pixels, ``area`` the mask's pixel count and ``segmentation`` the mask as a
  COCO compressed RLE (``{"size": [H, W], "counts": str}``, pycocotools decodes it); the last two
  only for a model with a mask head. ``"num_detections"`` counts all the model returned.

Class colours are :func:`vitasks.visualization.seg_palette`'s, so a class looks the same in
segmentation and detection drawings.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch
from PIL import Image, ImageDraw

from vitasks.errors import DataError
from vitasks.registry import VISUALIZERS

from .drawers import PredictionDrawer, class_name, draw_text_lines, outline_box, upscale_for_display
from .seg_drawer import seg_palette

#: Opacity of a detection's mask over the image.
MASK_ALPHA = 0.5
#: Detections below this score are left out of the drawing and the JSON (the model keeps
#: everything above its own, lower, threshold: 0.05 for the RoI heads).
SCORE_THRESHOLD = 0.3


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _instances(sample: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """``(boxes (D, 4), scores (D,), labels (D,), masks (D, H, W) bool or None)`` of a sample's
    ``pred_instances``, highest score first."""
    if "pred_instances" not in sample:
        raise DataError("the detector's prediction has no `pred_instances`")
    found = sample.pred_instances
    boxes = _numpy(found.bboxes).astype(np.float64).reshape(-1, 4)
    scores = _numpy(found.scores).astype(np.float64).reshape(-1)
    labels = _numpy(found.labels).astype(np.int64).reshape(-1)
    masks = _numpy(found.masks).astype(bool) if "masks" in found else None
    order = np.argsort(-scores, kind="stable")
    return boxes[order], scores[order], labels[order], None if masks is None else masks[order]


def encode_mask(mask: np.ndarray) -> dict:
    """A bool (H, W) mask as COCO compressed RLE with a JSON-able ``counts`` string."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


@VISUALIZERS.register_module()
class DetPredictionDrawer(PredictionDrawer):
    """Object detection / instance segmentation (``pred_instances``): masks, boxes, labels and
    scores of the detections scoring at least ``score_threshold``.

    Args:
        score_threshold: the lowest score drawn and listed.
        alpha: opacity of the masks.
    """

    task_models = ("TwoStageDetector",)
    pred_field = "pred_instances"

    def __init__(self, score_threshold: float = SCORE_THRESHOLD, alpha: float = MASK_ALPHA) -> None:
        self.score_threshold = float(score_threshold)
        self.alpha = float(alpha)

    def _kept(self, sample: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        boxes, scores, labels, masks = _instances(sample)
        keep = scores >= self.score_threshold
        return boxes[keep], scores[keep], labels[keep], None if masks is None else masks[keep]

    def summarize(self, sample: Any, class_names: list[str] | None, topk: int) -> dict:
        """The detections at or above ``score_threshold`` (``topk`` does not apply), best first."""
        total = len(_instances(sample)[1])
        boxes, scores, labels, masks = self._kept(sample)
        detections = []
        for index, (box, score, label) in enumerate(zip(boxes, scores, labels)):
            entry = {
                "label": int(label),
                "class_name": class_name(class_names, int(label)),
                "score": float(score),
                "bbox": [float(v) for v in box],
            }
            if masks is not None:
                entry["area"] = int(masks[index].sum())
                entry["segmentation"] = encode_mask(masks[index])
            detections.append(entry)
        return {"num_detections": total, "score_threshold": self.score_threshold, "detections": detections}

    @staticmethod
    def _palette(labels: np.ndarray, class_names: list[str] | None) -> np.ndarray:
        return seg_palette(max(int(labels.max(initial=-1)) + 1, len(class_names or ()), 1))

    def draw(self, image: np.ndarray, sample: Any, class_names: list[str] | None, topk: int) -> np.ndarray:
        boxes, scores, labels, masks = self._kept(sample)
        shown = upscale_for_display(np.ascontiguousarray(image[:, :, :3]))
        scale_y, scale_x = shown.shape[0] / image.shape[0], shown.shape[1] / image.shape[1]
        palette = self._palette(labels, class_names)
        colours = [tuple(int(v) for v in palette[label]) for label in labels]
        if masks is not None:
            for mask, colour in zip(masks, colours):
                if mask.shape != image.shape[:2]:
                    raise DataError(
                        f"a predicted mask is {mask.shape[0]}x{mask.shape[1]} but the image is "
                        f"{image.shape[0]}x{image.shape[1]}: masks must be at the original image's size"
                    )
                rows = (np.arange(shown.shape[0]) / scale_y).astype(np.int64)
                cols = (np.arange(shown.shape[1]) / scale_x).astype(np.int64)
                big = mask[rows][:, cols]
                tint = (1.0 - self.alpha) * shown.astype(np.float32) + self.alpha * np.array(colour, np.float32)
                shown = np.where(big[:, :, None], np.clip(np.rint(tint), 0, 255).astype(np.uint8), shown)
        canvas = Image.fromarray(np.ascontiguousarray(shown))
        draw = ImageDraw.Draw(canvas)
        width = max(1, int(round(min(scale_x, scale_y))) // 2 + 1)
        factor = np.array([scale_x, scale_y, scale_x, scale_y])
        for box, colour in zip(boxes * factor, colours):
            outline_box(draw, box, colour, width)
        drawn = np.asarray(canvas)
        # Lowest score first, so the best detection's caption ends on top where captions overlap.
        for box, score, label in list(zip(boxes * factor, scores, labels))[::-1]:
            name = class_name(class_names, int(label))
            text = f"{name if name is not None else '#' + str(int(label))} {score:.2f}"
            drawn = draw_text_lines(drawn, [text], origin=(int(max(box[0], 0)), int(max(box[1], 0))))
        return drawn
