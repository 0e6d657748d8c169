"""Normalisation statistics and the padding preprocessor base shared by the data preprocessors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from mmengine.model import BaseDataPreprocessor

from vitasks.errors import ConfigError

# ImageNet statistics in 0-255 RGB (torchvision's, which most checkpoints were trained with).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


class PaddedImagePreprocessor(BaseDataPreprocessor):
    """What the dense-task preprocessors share: normalise each uint8 CHW image (``mean``/``std``
    in 0-255 RGB; both ``None`` leaves the values), optionally swap channels 0 and 2, and pad a
    list of images on the bottom and right (pixel (y, x) keeps its place) into one batch.

    Subclasses choose the padded size (``size``: a minimum ``(H, W)``; ``size_divisor``: a
    multiple) and what to do with the samples.
    """

    def __init__(
        self,
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
        size: Sequence[int] | None = None,
        size_divisor: int | None = None,
        pad_val: float = 0.0,
        to_rgb: bool = False,
        non_blocking: bool = False,
    ) -> None:
        super().__init__(non_blocking=non_blocking)
        owner = type(self).__name__
        if (mean is None) != (std is None):
            raise ConfigError(f"{owner}: give both mean and std, or neither")
        if size is not None and (len(size) != 2 or min(size) <= 0):
            raise ConfigError(f"{owner}.size must be [H, W] > 0, got {size!r}")
        if size_divisor is not None and int(size_divisor) < 1:
            raise ConfigError(f"{owner}.size_divisor must be >= 1, got {size_divisor!r}")
        self.normalize = mean is not None
        if self.normalize:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1), False)
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.size_divisor = None if size_divisor is None else int(size_divisor)
        self.pad_val = float(pad_val)
        self.to_rgb = bool(to_rgb)

    def normalized_images(self, inputs) -> list[torch.Tensor]:
        """The batch's images (a list, or a stacked N x C x H x W tensor) as normalised floats."""
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
        return images

    def pad_batch(self, images: list[torch.Tensor], height: int, width: int) -> torch.Tensor:
        """The images padded with ``pad_val`` to ``height`` x ``width`` and stacked."""
        return torch.stack([
            F.pad(img, (0, width - img.shape[-1], 0, height - img.shape[-2]), value=self.pad_val)
            for img in images
        ])
