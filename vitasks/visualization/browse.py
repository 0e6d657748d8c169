"""What the training pipeline feeds the model, drawn: ``tools/browse_dataset.py``.

:func:`browse_dataset` builds the config's ``train_dataloader.dataset`` (vitasks' registries, the
config's plugins and default scope, as training does), takes the first ``num`` samples of the
training stream (the config's sampler, seeded with ``randomness.seed``, epoch 0 then 1...: the same
order and the same per-sample seeds as :mod:`vitasks.data.seeding` gives training), runs each
through the full training pipeline, random augmentations included, and writes one PNG per sample:

- the packed image (``inputs``, uint8 CHW) as it is, enlarged by a whole factor for small images
  (nearest neighbour, so every pixel of the pipeline's output shows unchanged);
- above it, a caption: the class (``gt_label``) and the source file;
- over it, what the sample's ground truth holds: the label map (``gt_sem_seg``, ignored pixels
  left clear) and instances (``gt_instances``: masks, boxes and their class names);
- at its right, a legend of the classes drawn;
- a clip (``inputs`` of shape ``(C, T, H, W)``) as a strip of its frames, left to right.

Each kind of ground truth is drawn by a :class:`GroundTruthDrawer` registered in
``vitasks.registry.VISUALIZERS``; a new task (or a plugin) registers one for its field, as it
registers a ``PredictionDrawer`` for ``vitasks infer``, and nothing here changes.
"""

from __future__ import annotations

import copy
import itertools
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.registry import DefaultScope
from PIL import Image, ImageDraw

from vitasks.checks import non_negative_int, options
from vitasks.data.seeding import SEEDED_SAMPLERS, SeededIndex, derive_seed
from vitasks.errors import DataError, VitasksError
from vitasks.registry import DATA_SAMPLERS, DATASETS, VISUALIZERS

from .drawers import class_name, draw_text_lines, font_size_for, outline_box, upscale_for_display
from .seg_drawer import LegendEntry, blend_labels, draw_legend, label_areas, seg_palette

__all__ = [
    "BrowsedSample",
    "DrawContext",
    "GroundTruthDrawer",
    "GtInstancesDrawer",
    "GtLabelDrawer",
    "GtSemSegDrawer",
    "SampleDrawing",
    "browse_dataset",
    "build_train_dataset",
    "draw_sample",
    "frames_of",
    "iter_training_samples",
    "training_indices",
    "registered_gt_drawers",
]

#: White gap between the frames of a clip and around the legend.
FRAME_GAP = 4
#: Opacity of instance masks over the image.
MASK_ALPHA = 0.5
#: Colour of the swatch that stands for ignored pixels (drawn clear, so shown as the panel).
IGNORED_SWATCH = (255, 255, 255)


# ---------------------------------------------------------------------------------------------
# the training stream
# ---------------------------------------------------------------------------------------------


@dataclass
class BrowsedSample:
    """One sample as training gets it.

    Attributes:
        position: its place in the training stream (0 = the first sample of epoch 0).
        index: its index in the dataset.
        seed: the seed of its random draws.
        packed: the pipeline's output, ``{"inputs": uint8 tensor, "data_samples": DataSample}``.
    """

    position: int
    index: int
    seed: int
    packed: dict


def _config_seed(cfg: Config) -> int:
    seed = (cfg.get("randomness") or {}).get("seed")
    if seed is None:
        print_log("browse_dataset: the config sets no randomness.seed; using 0", logger="current")
        return 0
    return non_negative_int(seed, f"{cfg.filename}: randomness.seed")


def _train_dataloader_cfg(cfg: Config) -> dict:
    loader = options(cfg.get("train_dataloader"), f"{cfg.filename}: train_dataloader", required=("dataset",),
                     what="a loader with train_dataloader.dataset (browsing draws its samples)")
    return copy.deepcopy(loader)


def build_train_dataset(cfg: Config):
    """``train_dataloader.dataset`` of ``cfg``, built as training builds it: the config's plugins
    imported, its types checked (a misspelt name is a ConfigError naming the key), built from
    vitasks' DATASETS under the config's ``default_scope``."""
    from vitasks.config import validate_config
    from vitasks.plugins import import_plugins

    import_plugins(cfg)
    dataset_cfg = _train_dataloader_cfg(cfg)["dataset"]
    # Only the dataset's keys are checked: browsing needs no model or schedule.
    validate_config(Config(dict(train_dataloader=dict(dataset=dataset_cfg)), filename=cfg.filename))
    with DefaultScope.overwrite_default_scope(cfg.get("default_scope") or "vitasks"):
        dataset = DATASETS.build(dataset_cfg)
    if hasattr(dataset, "full_init"):
        dataset.full_init()
    if len(dataset) == 0:
        raise DataError(f"{cfg.filename}: train_dataloader.dataset is empty")
    return dataset


def training_indices(cfg: Config, dataset: Any, num: int, seed: int) -> list[SeededIndex]:
    """The first ``num`` (index, seed) pairs of the training stream: the config's sampler (the
    seeded version of mmengine's samplers, as the Runner swaps them in) built with ``seed``,
    epochs 0, 1, ... in turn. A sampler without seeds of its own gets those of the epoch-based
    sampler, ``derive_seed(seed, epoch, position)``."""
    sampler_cfg = dict(_train_dataloader_cfg(cfg).get("sampler") or {"type": "DefaultSampler", "shuffle": True})
    kind = sampler_cfg.get("type")
    if kind in SEEDED_SAMPLERS:
        sampler_cfg["type"] = SEEDED_SAMPLERS[kind]
    with DefaultScope.overwrite_default_scope(cfg.get("default_scope") or "vitasks"):
        sampler = DATA_SAMPLERS.build(sampler_cfg, default_args=dict(dataset=dataset, seed=seed))
    chosen: list[SeededIndex] = []
    for epoch in itertools.count():
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        before = len(chosen)
        for i, index in enumerate(sampler):
            if len(chosen) == num:
                break
            if not isinstance(index, SeededIndex):
                index = SeededIndex(int(index), derive_seed(seed, epoch, i))
            chosen.append(index)
        if len(chosen) == num or len(chosen) == before or not hasattr(sampler, "set_epoch"):
            return chosen
    return chosen  # pragma: no cover  (the loop returns)


def _fetch(dataset: Any, index: SeededIndex) -> dict:
    """``dataset[index]``; the global generators are seeded from the sample's seed too, for
    datasets and transforms that draw from them (``SeededSampleMixin`` does the same)."""
    random.seed(index.seed)
    np.random.seed(index.seed)
    torch.manual_seed(index.seed)
    packed = dataset[index]
    if not isinstance(packed, dict) or "inputs" not in packed:
        raise DataError(
            f"training sample {int(index)}: the pipeline must end in a packing transform giving "
            f"{{'inputs', 'data_samples'}}, got {type(packed).__name__}"
        )
    return packed


def iter_training_samples(cfg: Config, num: int, dataset: Any = None) -> Iterator[BrowsedSample]:
    """The first ``num`` samples of the training stream, each through the training pipeline."""
    dataset = build_train_dataset(cfg) if dataset is None else dataset
    for position, index in enumerate(training_indices(cfg, dataset, num, _config_seed(cfg))):
        yield BrowsedSample(position, int(index), index.seed, _fetch(dataset, index))


# ---------------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------------


@dataclass
class DrawContext:
    """What drawers need beyond the sample.

    Attributes:
        class_names: the dataset's classes (``metainfo["classes"]``), or None.
        ignore_index: the label value drawn clear in label maps.
        scale: how many display pixels one input pixel takes (a whole number).
        palette: one colour per class id, shared by every drawer so colours agree.
    """

    class_names: list[str] | None
    ignore_index: int
    scale: int
    palette: np.ndarray


class GroundTruthDrawer:
    """Draws one ground-truth field of a packed training sample.

    Subclasses are registered in ``vitasks.registry.VISUALIZERS`` and drawn in ``order`` (fills
    first, outlines later) when their ``gt_field`` is in the sample.
    """

    gt_field: str = ""
    order: int = 0

    def applies(self, sample: Any) -> bool:
        return bool(self.gt_field) and self.gt_field in sample

    def num_labels(self, sample: Any, ignore_index: int) -> int:
        """The largest class id this field holds, plus one (the palette's size)."""
        return 0

    def overlay(self, frame: np.ndarray, frame_index: int, sample: Any, context: DrawContext) -> np.ndarray:
        """Draw over one displayed frame (already enlarged by ``context.scale``); returns it."""
        return frame

    def caption(self, sample: Any, context: DrawContext) -> list[str]:
        """Lines for the caption above the picture."""
        return []

    def legend(self, sample: Any, context: DrawContext) -> list[LegendEntry]:
        """Entries for the legend at the right."""
        return []


def _name(context: DrawContext, label: int) -> str:
    """The class name of ``label``, ``#label`` when the dataset names none."""
    return class_name(context.class_names, label) or f"#{label}"


def _colour(context: DrawContext, label: int) -> tuple[int, int, int]:
    """The palette colour of ``label`` (white for a label outside the palette)."""
    if 0 <= label < len(context.palette):
        return tuple(int(v) for v in context.palette[label])
    return (255, 255, 255)


def registered_gt_drawers() -> list[GroundTruthDrawer]:
    """One instance of every GroundTruthDrawer in VISUALIZERS (vitasks' and plugins'), in order."""
    VISUALIZERS.import_from_location()
    classes = [c for c in VISUALIZERS.module_dict.values() if isinstance(c, type) and issubclass(c, GroundTruthDrawer)]
    return [c() for c in sorted(classes, key=lambda c: c.order)]


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


@VISUALIZERS.register_module()
class GtLabelDrawer(GroundTruthDrawer):
    """Classification: the class of ``gt_label`` in the caption."""

    gt_field = "gt_label"
    order = 0

    def caption(self, sample: Any, context: DrawContext) -> list[str]:
        labels = _as_numpy(sample.gt_label).reshape(-1)
        if labels.dtype.kind == "f" and labels.size > 1:  # a soft target: the classes it weighs
            top = np.argsort(-labels)[:3]
            parts = [f"{_name(context, int(c))} {labels[c]:.2f}" for c in top if labels[c] > 0]
            return ["label: " + ", ".join(parts)]
        names = [f"{_name(context, int(c))} ({int(c)})" for c in labels]
        return ["label: " + ", ".join(names)]


@VISUALIZERS.register_module()
class GtSemSegDrawer(GroundTruthDrawer):
    """Segmentation: ``gt_sem_seg`` blended over the image in the class colours; pixels equal to
    the ignore index stay as they are. The legend lists the classes by pixel share, then the
    ignored share."""

    gt_field = "gt_sem_seg"
    order = 10

    @staticmethod
    def labels(sample: Any) -> np.ndarray:
        data = _as_numpy(sample.gt_sem_seg.data).astype(np.int64)
        return data[0] if data.ndim == 3 else data

    def num_labels(self, sample: Any, ignore_index: int) -> int:
        labels = self.labels(sample)
        return int(labels[labels != ignore_index].max(initial=-1)) + 1

    def overlay(self, frame: np.ndarray, frame_index: int, sample: Any, context: DrawContext) -> np.ndarray:
        labels = self.labels(sample)
        big = np.repeat(np.repeat(labels, context.scale, axis=0), context.scale, axis=1)
        if big.shape != frame.shape[:2]:
            raise DataError(
                f"{sample.metainfo.get('img_path', 'sample')}: gt_sem_seg is {labels.shape[0]}x"
                f"{labels.shape[1]} but the image is {frame.shape[0] // context.scale}x"
                f"{frame.shape[1] // context.scale}: the pipeline transformed them differently"
            )
        shown = (big != context.ignore_index) & (big >= 0) & (big < len(context.palette))
        blended = blend_labels(frame, np.where(shown, big, 0), context.palette)
        return np.where(shown[:, :, None], blended, frame)

    def legend(self, sample: Any, context: DrawContext) -> list[LegendEntry]:
        labels = self.labels(sample)
        ignored = labels == context.ignore_index
        valid = labels[~ignored & (labels >= 0) & (labels < len(context.palette))]
        entries = []
        for label, pixels in label_areas(valid):  # most pixels first
            entries.append(LegendEntry(label, f"{_name(context, label)}  {100.0 * pixels / labels.size:.1f}%",
                                       _colour(context, label)))
        if ignored.any():
            entries.append(LegendEntry(context.ignore_index, f"ignored ({context.ignore_index})  "
                                       f"{100.0 * int(ignored.sum()) / labels.size:.1f}%", IGNORED_SWATCH))
        return entries


def _instance_masks(instances: Any) -> np.ndarray | None:
    """``(N, H, W)`` bool masks of ``gt_instances.masks`` when they are an array, a tensor or an
    object with ``to_ndarray()`` / ``masks`` (bitmap masks); None otherwise (polygons are drawn
    by their boxes only)."""
    masks = instances.get("masks") if hasattr(instances, "get") else None
    if masks is None:
        return None
    if hasattr(masks, "to_ndarray"):
        masks = masks.to_ndarray()
    elif not isinstance(masks, (np.ndarray, torch.Tensor)) and hasattr(masks, "masks"):
        masks = masks.masks
    if not isinstance(masks, (np.ndarray, torch.Tensor)):
        return None
    masks = _as_numpy(masks)
    return masks.astype(bool) if masks.ndim == 3 else None


@VISUALIZERS.register_module()
class GtInstancesDrawer(GroundTruthDrawer):
    """Detection / instance segmentation: ``gt_instances.masks`` blended in their class colours,
    ``gt_instances.bboxes`` (``x1, y1, x2, y2`` in input pixels) outlined, each with its class
    name at its top-left corner."""

    gt_field = "gt_instances"
    order = 20

    @staticmethod
    def _labels(sample: Any) -> np.ndarray:
        instances = sample.gt_instances
        labels = instances.get("labels") if hasattr(instances, "get") else None
        return np.zeros(0, np.int64) if labels is None else _as_numpy(labels).astype(np.int64).reshape(-1)

    def num_labels(self, sample: Any, ignore_index: int) -> int:
        return int(self._labels(sample).max(initial=-1)) + 1

    def overlay(self, frame: np.ndarray, frame_index: int, sample: Any, context: DrawContext) -> np.ndarray:
        instances = sample.gt_instances
        labels = self._labels(sample)
        colours = [_colour(context, int(c)) for c in labels]
        masks = _instance_masks(instances)
        if masks is not None:
            for mask, colour in zip(masks, colours):
                big = np.repeat(np.repeat(mask, context.scale, axis=0), context.scale, axis=1)
                if big.shape != frame.shape[:2]:
                    continue  # masks at another size (not yet resized by the pipeline): boxes only
                tint = (1.0 - MASK_ALPHA) * frame.astype(np.float32) + MASK_ALPHA * np.array(colour, np.float32)
                frame = np.where(big[:, :, None], np.clip(np.rint(tint), 0, 255).astype(np.uint8), frame)
        boxes = instances.get("bboxes") if hasattr(instances, "get") else None
        if boxes is None:
            return frame
        boxes = _as_numpy(getattr(boxes, "tensor", boxes)).reshape(-1, 4).astype(np.float64) * context.scale
        canvas = Image.fromarray(np.ascontiguousarray(frame))
        draw = ImageDraw.Draw(canvas)
        width = max(1, context.scale // 2)
        for box, colour in zip(boxes, colours):
            outline_box(draw, box, colour, width)  # x2, y2 exclusive, as the detector's boxes
        frame = np.asarray(canvas)
        for box, label in zip(boxes, labels):
            origin = (int(max(box[0], 0)), int(max(box[1], 0)))
            frame = draw_text_lines(frame, [_name(context, int(label))], origin=origin)
        return frame

    def legend(self, sample: Any, context: DrawContext) -> list[LegendEntry]:
        labels = self._labels(sample)
        entries = []
        for label in sorted(set(labels.tolist())):
            entries.append(LegendEntry(label, f"{_name(context, label)}  x{int((labels == label).sum())}",
                                       _colour(context, label)))
        return entries


def frames_of(inputs: Any) -> list[np.ndarray]:
    """The packed ``inputs`` as RGB uint8 ``(H, W, 3)`` frames: one for an image ``(C, H, W)``;
    ``T`` for a clip ``(C, T, H, W)`` (or ``(T, C, H, W)``); every clip's frames, in order, for
    ``(clips, C, T, H, W)``."""
    array = _as_numpy(inputs)
    if array.dtype != np.uint8:  # a pipeline that ends in floats: show them as pixel values
        array = np.clip(np.rint(array.astype(np.float64)), 0, 255).astype(np.uint8)
    if array.ndim == 3:
        frames = [array.transpose(1, 2, 0)]
    elif array.ndim == 4 and array.shape[0] in (1, 3):
        frames = list(array.transpose(1, 2, 3, 0))
    elif array.ndim == 4 and array.shape[1] in (1, 3):
        frames = list(array.transpose(0, 2, 3, 1))
    elif array.ndim == 5 and array.shape[1] in (1, 3):
        frames = [f for clip in array for f in clip.transpose(1, 2, 3, 0)]
    else:
        raise DataError(
            f"cannot draw packed inputs of shape {tuple(array.shape)}: expected (C, H, W), (C, T, H, W) "
            "or (clips, C, T, H, W) with 1 or 3 channels"
        )
    return [np.repeat(f, 3, axis=2) if f.shape[2] == 1 else np.ascontiguousarray(f) for f in frames]


@dataclass
class SampleDrawing:
    """A drawn sample and where its frames lie in it.

    Attributes:
        image: the drawing, RGB uint8.
        frame_origins: ``(y, x)`` of each frame's top-left pixel.
        scale: display pixels per input pixel.
    """

    image: np.ndarray
    frame_origins: list[tuple[int, int]] = field(default_factory=list)
    scale: int = 1


def _caption_band(lines: list[str], width: int, font_size_of: np.ndarray) -> np.ndarray:
    """A white band ``width`` wide holding ``lines`` (the text style of drawers.draw_text_lines)."""
    size = font_size_for(font_size_of)
    pad = max(2, size // 4)
    height = 2 * pad + (size + pad) * len(lines)
    band = np.full((height, width, 3), 255, np.uint8)
    return draw_text_lines(band, lines)


def draw_sample(
    packed: dict,
    class_names: Sequence[str] | None = None,
    ignore_index: int = 255,
    extra_caption: Sequence[str] = (),
    drawers: Sequence[GroundTruthDrawer] | None = None,
) -> SampleDrawing:
    """Draw one packed training sample (see the module's docstring for the layout)."""
    sample = packed.get("data_samples")
    frames = frames_of(packed["inputs"])
    drawers = registered_gt_drawers() if drawers is None else list(drawers)
    active = [d for d in drawers if sample is not None and d.applies(sample)]
    names = list(class_names) if class_names is not None else None
    num_labels = max([len(names or ())] + [d.num_labels(sample, ignore_index) for d in active])
    shown = [upscale_for_display(f) for f in frames]
    scale = shown[0].shape[0] // frames[0].shape[0]
    context = DrawContext(names, int(ignore_index), scale, seg_palette(max(1, num_labels)))
    for drawer in active:
        shown = [drawer.overlay(frame, i, sample, context) for i, frame in enumerate(shown)]

    # The frames side by side, a white gap between them.
    height = shown[0].shape[0]
    strip_width = sum(f.shape[1] for f in shown) + FRAME_GAP * (len(shown) - 1)
    strip = np.full((height, strip_width, 3), 255, np.uint8)
    xs = []
    x = 0
    for frame in shown:
        strip[:frame.shape[0], x:x + frame.shape[1]] = frame
        xs.append(x)
        x += frame.shape[1] + FRAME_GAP

    lines = [line for d in active for line in d.caption(sample, context)] + list(extra_caption)
    entries = [e for d in active for e in d.legend(sample, context)]
    legend = draw_legend(entries, height, font_size_for(shown[0])) if entries else None
    legend_width = 0 if legend is None else legend.shape[1] + FRAME_GAP
    band = _caption_band(lines, strip_width + legend_width, shown[0]) if lines else None
    top = 0 if band is None else band.shape[0]

    canvas_height = top + max(height, 0 if legend is None else legend.shape[0])
    canvas_width = max(strip_width + legend_width, 0 if band is None else band.shape[1])
    canvas = np.full((canvas_height, canvas_width, 3), 255, np.uint8)
    if band is not None:
        canvas[:top, :band.shape[1]] = band
    canvas[top:top + height, :strip_width] = strip
    if legend is not None:
        canvas[top:top + legend.shape[0], strip_width + FRAME_GAP:strip_width + FRAME_GAP + legend.shape[1]] = legend
    return SampleDrawing(canvas, [(top, x) for x in xs], context.scale)


def _stem(sample: Any, index: int) -> str:
    meta = sample.metainfo if sample is not None and hasattr(sample, "metainfo") else {}
    # An image's path, a video's file or a raw-frame clip's folder.
    path = meta.get("img_path") or meta.get("filename") or meta.get("frame_dir")
    if not path:
        return f"sample{index}"
    stem = os.path.splitext(os.path.basename(str(path)))[0]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or f"sample{index}"


def browse_dataset(
    config: str | os.PathLike | Config,
    out_dir: str | os.PathLike,
    num: int = 10,
    cfg_options: Sequence[str] | dict | None = None,
) -> list[str]:
    """Draw the first ``num`` training samples of ``config`` into ``out_dir``.

    Files are named ``<position>_<image name>.png``, position in the training stream (4 digits).
    The same config and seed give the same files.

    Returns:
        The paths written, in stream order.
    """
    from vitasks.config import as_config

    if num < 1:
        raise VitasksError(f"--num must be at least 1, got {num}")
    cfg = as_config(config, cfg_options)
    dataset = build_train_dataset(cfg)
    meta = getattr(dataset, "metainfo", None) or {}
    class_names = meta.get("classes")
    ignore_index = int(meta.get("ignore_index", 255))
    drawers = registered_gt_drawers()
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for item in iter_training_samples(cfg, num, dataset):
        sample = item.packed.get("data_samples")
        drawing = draw_sample(item.packed, class_names, ignore_index, drawers=drawers,
                              extra_caption=[f"#{item.position}: {_stem(sample, item.index)} (index {item.index})"])
        path = os.path.join(os.fspath(out_dir), f"{item.position:04d}_{_stem(sample, item.index)}.png")
        Image.fromarray(drawing.image).save(path)
        written.append(path)
    return written
