"""Drawing a video recognizer's prediction for ``vitasks infer``: the frames the model saw, left to
right, under a caption with the top-k classes.

The frames are the test pipeline's output (after sampling, resizing and cropping), not the
video's own frames, so the strip shows exactly what was classified: ``run_inference`` hands the
packed clip to :meth:`VideoPredictionDrawer.load_image` (``draws_model_input``). With several
test views (clips x crops) every view's frames follow one another, view after view.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vitasks.registry import VISUALIZERS

from .browse import FRAME_GAP, frames_of
from .drawers import ClsPredictionDrawer, draw_text_lines, font_size_for, upscale_for_display


@VISUALIZERS.register_module()
class VideoPredictionDrawer(ClsPredictionDrawer):
    """Video recognition: top-k classes and scores (``pred_score``, averaged over the views) as a
    caption over a strip of the sampled frames."""

    task_models = ("Recognizer",)
    # Chosen by the model's class only: an unknown model with `pred_score` is drawn as an image.
    pred_field = None
    #: ``run_inference`` passes the packed model input (``(3, T, H, W)`` or ``(V, 3, T, H, W)``,
    #: uint8) to :meth:`load_image` instead of the file path.
    draws_model_input = True

    def load_image(self, source: Any) -> np.ndarray:
        """The sampled frames ``(F, H, W, 3)`` uint8 of a packed clip (or of such an array)."""
        if isinstance(source, np.ndarray) and source.ndim == 4 and source.shape[-1] == 3:
            return source
        return np.stack(frames_of(source))

    def draw(self, image: np.ndarray, sample: Any, class_names: list[str] | None, topk: int) -> np.ndarray:
        """``image``: the frames ``(F, H, W, 3)`` from :meth:`load_image`. Returns the strip (every
        frame enlarged by the same whole factor, ``FRAME_GAP`` white pixels between frames) with
        the caption above it."""
        shown = [upscale_for_display(frame, min_side=128) for frame in image]
        height, width = shown[0].shape[:2]
        strip = np.full((height, len(shown) * width + FRAME_GAP * (len(shown) - 1), 3), 255, np.uint8)
        for i, frame in enumerate(shown):
            x = i * (width + FRAME_GAP)
            strip[:, x:x + width] = frame
        lines = [
            f"{p['class_name'] if p['class_name'] is not None else '#' + str(p['label'])}: {p['score']:.3f}"
            for p in self.topk(sample, class_names, topk)
        ]
        views = sample.metainfo.get("num_views", 1) if hasattr(sample, "metainfo") else 1
        lines.append(f"{len(shown)} frames shown ({views} view{'s' if views != 1 else ''})")
        size = font_size_for(strip[:, :width])
        band_height = (size + max(2, size // 4)) * len(lines) + 2 * max(2, size // 4)
        band = draw_text_lines(np.full((band_height, strip.shape[1], 3), 255, np.uint8), lines)
        return np.concatenate([band, strip], axis=0)
