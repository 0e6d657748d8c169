"""Detection data preprocessor: normalise, pad the batch, record the padded shapes.

Images are padded on the bottom and right (pixel (y, x) keeps its place, so boxes need no
change) to the largest image of the batch, then to at least ``size`` (ViTDet: a fixed 1024x1024
square, in training and testing, since the backbone's position embeddings are for that grid)
and to a multiple of ``size_divisor``. Each sample's metainfo gets ``batch_input_shape`` and
``pad_shape`` (the padded (H, W)); ``img_shape`` stays the image's own size, which boxes are
clipped to. With ``pad_mask`` the ground-truth bitmaps are padded alike (a head that wants
full-size targets); otherwise they keep the image's size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vitasks.models.data_preprocessors.normalization import IMAGENET_MEAN, IMAGENET_STD, PaddedImagePreprocessor
from vitasks.registry import MODELS

__all__ = ["DetDataPreprocessor"]


@MODELS.register_module()
class DetDataPreprocessor(PaddedImagePreprocessor):
    """Stack uint8 CHW images of different sizes into one normalised, padded float batch.

    Args:
        mean: per-channel mean in 0-255 RGB (ImageNet's by default); ``None`` with ``std``
            ``None`` leaves the values as they are.
        std: per-channel std in 0-255 RGB.
        size: ``(H, W)`` minimum padded size (``[1024, 1024]`` for ViTDet), or ``None``.
        size_divisor: pad to a multiple of this, or ``None``.
        pad_val: image padding value after normalisation (0 = the mean colour).
        pad_mask: pad ``gt_instances.masks`` bitmaps to the batch shape too.
        to_rgb: swap channels 0 and 2 (vitasks' LoadImage already gives RGB).
        non_blocking: non-blocking host-to-device copies.
        per_image_norm: standardise each image on its own after mean/std (``true`` or
            ``{eps, border}``, see :class:`~.normalization.PerImageStandardization`).
    """

    def __init__(
        self,
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
        size: Sequence[int] | None = None,
        size_divisor: int | None = None,
        pad_val: float = 0.0,
        pad_mask: bool = False,
        to_rgb: bool = False,
        non_blocking: bool = False,
        per_image_norm: dict | bool | None = None,
    ) -> None:
        super().__init__(mean, std, size, size_divisor, pad_val, to_rgb, non_blocking, per_image_norm)
        self.pad_mask = bool(pad_mask)

    def batch_shape(self, shapes: Sequence[tuple[int, int]]) -> tuple[int, int]:
        """The padded (H, W) for images of ``shapes``."""
        height = max(h for h, _ in shapes)
        width = max(w for _, w in shapes)
        if self.size is not None:
            height, width = max(height, self.size[0]), max(width, self.size[1])
        if self.size_divisor:
            d = self.size_divisor
            height, width = -(-height // d) * d, -(-width // d) * d
        return height, width

    def forward(self, data: dict, training: bool = False) -> dict:
        data = self.cast_data(data)
        images = self.normalized_images(data["inputs"])
        shapes = [tuple(img.shape[-2:]) for img in images]
        height, width = self.batch_shape(shapes)
        batch = self.pad_batch(images, height, width)
        samples = data.get("data_samples")
        if samples is not None:
            for sample, (h, w) in zip(samples, shapes):
                sample.set_metainfo(dict(batch_input_shape=(height, width), pad_shape=(height, width)))
                if "img_shape" not in sample:
                    sample.set_metainfo(dict(img_shape=(h, w)))
                masks = sample.gt_instances.get("masks") if "gt_instances" in sample else None
                if self.pad_mask and isinstance(masks, torch.Tensor):
                    sample.gt_instances.masks = F.pad(
                        masks, (0, width - masks.shape[-1], 0, height - masks.shape[-2]), value=0
                    )
        return {"inputs": batch, "data_samples": samples}
