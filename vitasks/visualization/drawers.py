"""Per-task drawing of predictions, for ``vitasks infer`` (:func:`vitasks.apis.run_inference`).

A drawer turns one predicted data sample into a JSON-able summary and draws it over the input
image. Drawers are registered in ``vitasks.registry.VISUALIZERS``; each names the task models
it serves (``task_models``, class names, subclasses included) and the data-sample field it
draws (``pred_field``). A new task adds its drawer in its own module::

    @VISUALIZERS.register_module()
    class SegPredictionDrawer(PredictionDrawer):
        task_models = ("EncoderDecoder",)
        pred_field = "pred_sem_seg"
        def summarize(self, sample, class_names, topk): ...
        def draw(self, image, sample, class_names, topk): ...

and ``run_inference`` needs no change.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from vitasks.errors import DataError, VitasksError
from vitasks.registry import VISUALIZERS

#: Drawn images are upscaled to at least this shorter side so that labels stay readable.
MIN_DRAW_SIDE = 256


class PredictionDrawer:
    """Base class: summary and drawing of one task's predictions."""

    #: Class names of the task models this drawer serves (their subclasses too).
    task_models: tuple[str, ...] = ()
    #: The data-sample field this drawer reads; used when no drawer names the model's class.
    pred_field: str | None = None

    @classmethod
    def for_model(cls, model: nn.Module) -> "PredictionDrawer":
        """The drawer for ``model``; drawers needing the model's settings (e.g. its config) read
        them here."""
        return cls()

    @classmethod
    def serves_model(cls, model: nn.Module) -> bool:
        names = {c.__name__ for c in type(model).__mro__}
        return any(name in names for name in cls.task_models)

    @classmethod
    def serves_sample(cls, sample: Any) -> bool:
        return cls.pred_field is not None and cls.pred_field in sample

    def load_image(self, source: str | np.ndarray) -> np.ndarray:
        """The picture to draw on, RGB uint8 (H, W, 3). Video drawers override this."""
        if isinstance(source, np.ndarray):
            return source
        from vitasks.data.transforms import read_image

        return read_image(os.fspath(source))

    def summarize(self, sample: Any, class_names: list[str] | None, topk: int) -> dict:
        raise NotImplementedError

    def draw(self, image: np.ndarray, sample: Any, class_names: list[str] | None, topk: int) -> np.ndarray:
        raise NotImplementedError

    def write_files(self, sample: Any, out_dir: str, stem: str) -> dict:
        """Write extra outputs next to ``<stem>.json`` / ``<stem>.png`` in ``out_dir`` (e.g. a raw
        label map); returns entries for the JSON record (their paths). None by default."""
        return {}


def registered_drawers() -> list[type[PredictionDrawer]]:
    """Every drawer class registered in VISUALIZERS (vitasks' and plugins')."""
    VISUALIZERS.import_from_location()
    return [c for c in VISUALIZERS.module_dict.values() if isinstance(c, type) and issubclass(c, PredictionDrawer)]


def select_drawers(model: nn.Module, sample: Any) -> list[PredictionDrawer]:
    """The drawers for ``model``'s predictions: those naming the model's class, else those whose
    ``pred_field`` is in ``sample``."""
    classes = registered_drawers()
    chosen = [c for c in classes if c.serves_model(model)] or [c for c in classes if c.serves_sample(sample)]
    if not chosen:
        fields = ", ".join(sorted(sample.keys())) if hasattr(sample, "keys") else type(sample).__name__
        raise VitasksError(
            f"no prediction drawer for {type(model).__name__} (prediction fields: {fields}); register a "
            "PredictionDrawer in vitasks.registry.VISUALIZERS"
        )
    return [c.for_model(model) for c in chosen]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or without FreeType: fixed bitmap font
        return ImageFont.load_default()


def font_size_for(image: np.ndarray) -> int:
    """Text height for drawing on ``image``: grows with the image, at least 12 px."""
    return max(12, min(image.shape[:2]) // 18)


def upscale_for_display(image: np.ndarray, min_side: int = MIN_DRAW_SIDE) -> np.ndarray:
    """Enlarge small images (nearest neighbour, so pixels stay visible) for legible labels."""
    h, w = image.shape[:2]
    scale = int(np.ceil(min_side / max(1, min(h, w))))
    if scale <= 1:
        return image
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def draw_text_lines(image: np.ndarray, lines: list[str], origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """``lines`` in white on a translucent dark box at ``origin`` (top left); returns a copy."""
    base = Image.fromarray(np.ascontiguousarray(image[:, :, :3])).convert("RGBA")
    size = font_size_for(image)
    font = _font(size)
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    pad = max(2, size // 4)
    x, y = origin[0] + pad, origin[1] + pad
    boxes = [draw.textbbox((0, 0), line, font=font) for line in lines]
    width = max((b[2] for b in boxes), default=0)
    step = size + pad
    draw.rectangle([origin[0], origin[1], x + width + pad, y + step * len(lines)], fill=(0, 0, 0, 150))
    for i, line in enumerate(lines):
        draw.text((x, y + i * step), line, font=font, fill=(255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(base, overlay).convert("RGB"))


def outline_box(draw: ImageDraw.ImageDraw, box: Any, colour: tuple, width: int) -> None:
    """Outline an xyxy box whose x2, y2 bound its last pixel from the right (continuous
    coordinates). A box thinner than a pixel (a detector may predict one, a pipeline may keep one)
    is drawn one pixel wide: Pillow refuses a rectangle whose end is before its start."""
    x1, y1 = float(box[0]), float(box[1])
    x2, y2 = max(float(box[2]) - 1, x1), max(float(box[3]) - 1, y1)
    draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)


def class_name(class_names: list[str] | None, label: int) -> str | None:
    if class_names is not None and 0 <= label < len(class_names):
        return class_names[label]
    return None


@VISUALIZERS.register_module()
class ClsPredictionDrawer(PredictionDrawer):
    """Image classification: top-k classes and softmax scores (``pred_score``)."""

    task_models = ("ImageClassifier",)
    pred_field = "pred_score"

    def topk(self, sample: Any, class_names: list[str] | None, topk: int) -> list[dict]:
        if "pred_score" not in sample:
            raise DataError("the classifier's prediction has no `pred_score`")
        scores = sample.pred_score.detach().float().cpu().reshape(-1)
        values, labels = scores.topk(min(topk, scores.numel()))
        return [
            {"label": int(label), "class_name": class_name(class_names, int(label)), "score": float(value)}
            for value, label in zip(values, labels)
        ]

    def summarize(self, sample: Any, class_names: list[str] | None, topk: int) -> dict:
        return {"predictions": self.topk(sample, class_names, topk)}

    def draw(self, image: np.ndarray, sample: Any, class_names: list[str] | None, topk: int) -> np.ndarray:
        lines = [
            f"{p['class_name'] if p['class_name'] is not None else '#' + str(p['label'])}: {p['score']:.3f}"
            for p in self.topk(sample, class_names, topk)
        ]
        return draw_text_lines(upscale_for_display(image), lines)
