"""Semantic segmentation predictions for ``vitasks infer``: the label map over the image, a legend.

For each input :func:`vitasks.apis.run_inference` writes, through :class:`SegPredictionDrawer`:

- ``<name>.png``: the predicted classes blended over the image (``alpha`` 0.5) in the fixed
  palette :func:`seg_palette`, with a legend panel on the right: one swatch, class name and pixel
  share per class present, largest first;
- ``<name>_labels.png``: the raw label map at the image's size, in the dataset's own label values
  (with ``reduce_zero_label``, as ADE20K, class ``c`` is stored as ``c + 1``), as ``tools/test.py
  --dump`` writes it (:func:`vitasks.data.seg_labels.encode_label_map`);
- in ``<name>.json``: ``"classes": [{"label", "value", "class_name", "pixels", "fraction"}, ...]``
  (``label`` the model's class id, ``value`` its value in the label PNG) and ``"label_map"``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from vitasks.data.seg_labels import configured_reduce_zero_label, encode_label_map, sample_reduce_zero_label
from vitasks.errors import DataError
from vitasks.registry import VISUALIZERS

from .drawers import PredictionDrawer, _font, class_name, font_size_for, upscale_for_display

#: Opacity of the class colours over the image.
OVERLAY_ALPHA = 0.5


def seg_palette(num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` uint8 RGB colours, one per class id, the same for every image.

    Class ``c`` gets the colour of index ``c + 1`` in the PASCAL VOC colour-map construction: the
    index's bits are dealt round-robin to R, G and B from the most significant bit down. The map
    from index to colour is one-to-one, so colours are distinct for any number of classes, and
    skipping index 0 keeps black (which reads as "nothing") out of the palette.
    """
    index = np.arange(1, num_classes + 1, dtype=np.int64)
    colours = np.zeros((num_classes, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            colours[:, channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
    return colours.astype(np.uint8)


def label_areas(labels: np.ndarray) -> list[tuple[int, int]]:
    """``(class id, pixels)`` of each class present in ``labels``, most pixels first (ties by id)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64).reshape(-1))
    present = np.flatnonzero(counts)
    order = sorted(present.tolist(), key=lambda c: (-int(counts[c]), c))
    return [(int(c), int(counts[c])) for c in order]


def blend_labels(image: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The image (H, W, 3) with each pixel mixed with its class colour: ``(1 - a) img + a colour``."""
    colours = palette[labels].astype(np.float32)
    mixed = (1.0 - alpha) * image[:, :, :3].astype(np.float32) + alpha * colours
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class LegendEntry:
    """One legend line: a colour swatch and its text."""

    label: int
    text: str
    color: tuple[int, int, int]


@dataclass(frozen=True)
class LegendLayout:
    """Where the legend's parts go inside its panel (pixels, boxes as ``(x0, y0, x1, y1)``)."""

    size: tuple[int, int]  # (width, height) of the panel
    swatches: list[tuple[int, int, int, int]]
    text_origins: list[tuple[int, int]]
    font_size: int


def legend_entries(
    areas: Sequence[tuple[int, int]], class_names: list[str] | None, palette: np.ndarray
) -> list[LegendEntry]:
    """One entry per class in ``areas`` (``(class id, pixels)``): ``"name  12.3%"`` in its colour;
    classes without a name show as ``#id``."""
    total = sum(pixels for _, pixels in areas) or 1
    entries = []
    for label, pixels in areas:
        name = class_name(class_names, label)
        text = f"{name if name is not None else '#' + str(label)}  {100.0 * pixels / total:.1f}%"
        entries.append(LegendEntry(label, text, tuple(int(v) for v in palette[label])))
    return entries


def legend_layout(entries: Sequence[LegendEntry], height: int, font_size: int) -> LegendLayout:
    """Lay the entries out top to bottom in a panel ``height`` pixels tall, starting a new column
    when one is full, each column as wide as its longest text."""
    font = _font(font_size)
    pad = max(2, font_size // 3)
    step = font_size + pad  # row height: swatch (font_size square) plus a gap
    rows = max(1, (height - pad) // step)
    swatches: list[tuple[int, int, int, int]] = []
    origins: list[tuple[int, int]] = []
    x = pad
    width = pad
    for start in range(0, len(entries), rows):
        column = entries[start:start + rows]
        text_x = x + font_size + pad
        text_width = 0
        for row, entry in enumerate(column):
            y = pad + row * step
            swatches.append((x, y, x + font_size, y + font_size))
            origins.append((text_x, y))
            text_width = max(text_width, int(np.ceil(font.getlength(entry.text))))
        x = text_x + text_width + 2 * pad
        width = x
    return LegendLayout(size=(width, max(height, pad + step)), swatches=swatches, text_origins=origins,
                        font_size=font_size)


def draw_legend(entries: Sequence[LegendEntry], height: int, font_size: int) -> np.ndarray:
    """The legend as an RGB panel (``height`` tall): swatches outlined in grey, dark text on white."""
    layout = legend_layout(entries, height, font_size)
    panel = Image.new("RGB", layout.size, (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    font = _font(font_size)
    for entry, box, origin in zip(entries, layout.swatches, layout.text_origins):
        # The outline keeps pale colours visible against the white panel.
        draw.rectangle(box, fill=entry.color, outline=(90, 90, 90))
        draw.text(origin, entry.text, font=font, fill=(20, 20, 20))
    return np.asarray(panel)


def _label_map(sample: Any) -> np.ndarray:
    if "pred_sem_seg" not in sample:
        raise DataError("the segmentor's prediction has no `pred_sem_seg`")
    data = torch.as_tensor(sample.pred_sem_seg.data)
    if data.ndim == 3:
        data = data[0]
    return data.cpu().numpy().astype(np.int64)


def _dataset_reduce_zero_label(model: nn.Module) -> bool:
    """``reduce_zero_label`` of the model's test dataset: its metainfo's, else the config's value,
    else the dataset class's default (ADE20KDataset: true), else false."""
    meta = getattr(model, "dataset_meta", None) or {}
    if meta.get("reduce_zero_label") is not None:
        return bool(meta["reduce_zero_label"])
    cfg = getattr(model, "cfg", None)
    return bool(cfg is not None and configured_reduce_zero_label(cfg))


@VISUALIZERS.register_module()
class SegPredictionDrawer(PredictionDrawer):
    """Semantic segmentation: class colours over the image, a legend, a raw label-map PNG.

    Args:
        reduce_zero_label: store class ``c`` as ``c + 1`` in the label PNG (the dataset's own
            values, ADE20K); a sample's own ``reduce_zero_label`` wins. :meth:`for_model` reads
            it from the model's test dataset.
        alpha: opacity of the class colours.
    """

    task_models = ("EncoderDecoder",)
    pred_field = "pred_sem_seg"

    def __init__(self, reduce_zero_label: bool = False, alpha: float = OVERLAY_ALPHA) -> None:
        self.reduce_zero_label = bool(reduce_zero_label)
        self.alpha = float(alpha)

    @classmethod
    def for_model(cls, model: nn.Module) -> SegPredictionDrawer:
        return cls(reduce_zero_label=_dataset_reduce_zero_label(model))

    def _reduce(self, sample: Any) -> bool:
        return sample_reduce_zero_label(sample, self.reduce_zero_label)

    @staticmethod
    def _palette(sample: Any, labels: np.ndarray, class_names: list[str] | None) -> np.ndarray:
        num = int(labels.max(initial=0)) + 1
        if "seg_logits" in sample:
            num = max(num, int(sample.seg_logits.data.shape[0]))
        return seg_palette(max(num, len(class_names or ())))

    def summarize(self, sample: Any, class_names: list[str] | None, topk: int) -> dict:
        """Every class present (``topk`` does not apply), most pixels first."""
        labels = _label_map(sample)
        offset = 1 if self._reduce(sample) else 0
        total = labels.size or 1
        return {
            "classes": [
                {
                    "label": label,
                    "value": label + offset,
                    "class_name": class_name(class_names, label),
                    "pixels": pixels,
                    "fraction": pixels / total,
                }
                for label, pixels in label_areas(labels)
            ]
        }

    def write_files(self, sample: Any, out_dir: str, stem: str) -> dict:
        path = os.path.join(out_dir, stem + "_labels.png")
        if not cv2.imwrite(path, encode_label_map(_label_map(sample), self._reduce(sample))):
            raise DataError(f"could not write the label map {path}")
        return {"label_map": path}

    def draw(self, image: np.ndarray, sample: Any, class_names: list[str] | None, topk: int) -> np.ndarray:
        labels = _label_map(sample)
        if labels.shape != image.shape[:2]:
            # The prediction is at the image's original size; a drawer earlier in the chain may
            # have resized the picture, so follow it (nearest: class ids must not mix).
            labels = cv2.resize(labels.astype(np.int32), (image.shape[1], image.shape[0]),
                                interpolation=cv2.INTER_NEAREST).astype(np.int64)
        palette = self._palette(sample, labels, class_names)
        shown = upscale_for_display(image[:, :, :3])
        scale = shown.shape[0] // image.shape[0]
        big_labels = np.repeat(np.repeat(labels, scale, axis=0), scale, axis=1)
        overlay = blend_labels(shown, big_labels, palette, self.alpha)
        legend = draw_legend(legend_entries(label_areas(labels), class_names, palette), overlay.shape[0],
                             font_size_for(overlay))
        height = max(overlay.shape[0], legend.shape[0])
        canvas = np.full((height, overlay.shape[1] + legend.shape[1], 3), 255, dtype=np.uint8)
        canvas[:overlay.shape[0], :overlay.shape[1]] = overlay
        canvas[:legend.shape[0], overlay.shape[1]:] = legend
        return canvas
