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
from mmengine.model import BaseDataPreprocessor

from vitasks.errors import ConfigError
from vitasks.models.data_preprocessors.normalization import IMAGENET_MEAN, IMAGENET_STD
from vitasks.registry import MODELS

__all__ = ["DetDataPreprocessor"]


@MODELS.register_module()
class DetDataPreprocessor(BaseDataPreprocessor):
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
    ) -> None:
        super().__init__(non_blocking=non_blocking)
        if (mean is None) != (std is None):
            raise ConfigError("DetDataPreprocessor: give both mean and std, or neither")
        if size is not None and (len(size) != 2 or min(size) <= 0):
            raise ConfigError(f"DetDataPreprocessor.size must be [H, W] > 0, got {size!r}")
        if size_divisor is not None and int(size_divisor) < 1:
            raise ConfigError(f"DetDataPreprocessor.size_divisor must be >= 1, got {size_divisor!r}")
        self.normalize = mean is not None
        if self.normalize:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1), False)
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.size_divisor = None if size_divisor is None else int(size_divisor)
        self.pad_val = float(pad_val)
        self.pad_mask = bool(pad_mask)
        self.to_rgb = bool(to_rgb)

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
        inputs = data["inputs"]
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 4:
            inputs = list(inputs)
        images = []
        for img in inputs:
            img = img.float()
            if self.to_rgb and img.shape[0] == 3:
                img = img[[2, 1, 0]]
            if self.normalize:
                img = (img - self.mean) / self.std
            images.append(img)
        shapes = [tuple(img.shape[-2:]) for img in images]
        height, width = self.batch_shape(shapes)
        batch = torch.stack([
            F.pad(img, (0, width - img.shape[-1], 0, height - img.shape[-2]), value=self.pad_val)
            for img in images
        ])
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
