"""Normalisation statistics, per-image standardisation and the padding preprocessor base shared
by the data preprocessors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from mmengine.model import BaseDataPreprocessor

from vitasks.checks import (
    InRange, IntPair, NonNegativeInt, OrNone, PositiveInt, both_or_neither, building, checked, config_key, options,
)

# ImageNet statistics in 0-255 RGB (torchvision's, which most checkpoints were trained with).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


class PerImageStandardization:
    """Each image and channel to zero mean and unit spread, with the sign that makes the image's
    border darker than its mean: ``x' = s (x - mean) / (std + eps)``, ``s = -sign(border mean)``.

    For classes told apart by shape only, the colours of object and background are noise. A
    small model trained from scratch on a few hundred such images learns nothing with plain
    mean/std normalisation: near initialisation it is almost linear, and a shape drawn dark on
    light and light on dark give opposite-signed inputs, so their gradients cancel. Removing each
    image's own brightness, contrast and polarity per channel gives the model the shape with one
    sign. Measured on 10 shape classes in random colours (600 / 200 images, 30 epochs, the cls
    demo's model): 14 % top-1 with plain normalisation, 86 % with this; on plain white-on-black
    digits both reach 98.5 %.

    Args:
        eps: added to each channel's standard deviation (in normalised units), so flat channels
            stay near zero instead of amplifying noise.
        border: width in pixels of the frame whose mean sets the sign; ``0`` keeps every sign
            (standardisation only).
    """

    config_key = "model.data_preprocessor.per_image_norm"

    @checked
    def __init__(self, eps: InRange(0, low_open=True) = 0.3, border: NonNegativeInt = 4) -> None:
        self.eps = float(eps)
        self.border = int(border)

    @classmethod
    def from_config(cls, cfg: dict | bool | None, owner: str) -> PerImageStandardization | None:
        """The preprocessor option ``per_image_norm`` of the preprocessor at config key ``owner``:
        ``None``/``False`` (off), ``True`` (defaults) or ``{eps, border}``."""
        if cfg is None or cfg is False:
            return None
        if cfg is True:
            return cls()
        cfg = options(cfg, f"{owner}.per_image_norm", ("eps", "border"), "true, false or a dict with eps/border")
        with building("per_image_norm", root=owner):
            return cls(**cfg)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: (..., C, H, W) floats, each image unpadded; returns the same shape."""
        centred = images - images.mean((-2, -1), keepdim=True)
        out = centred / (centred.std((-2, -1), keepdim=True) + self.eps)
        height, width = out.shape[-2:]
        b = min(self.border, height // 2, width // 2)
        if b == 0:
            return out
        frame = torch.ones(height, width, dtype=torch.bool, device=out.device)
        frame[b:height - b, b:width - b] = False
        border_mean = out[..., frame].mean(-1)
        sign = torch.where(border_mean > 0, -1.0, 1.0).to(out.dtype)
        return out * sign[..., None, None]

    def describe(self) -> str:
        return (f"then per image and channel: (x - mean(x)) / (std(x) + {self.eps}), negated where the "
                f"{self.border}-pixel border is above the mean")


class PaddedImagePreprocessor(BaseDataPreprocessor):
    """What the dense-task preprocessors share: normalise each uint8 CHW image (``mean``/``std``
    in 0-255 RGB; both ``None`` leaves the values), optionally standardise each image on its own
    (``per_image_norm``, see :class:`PerImageStandardization`), optionally swap channels 0 and 2,
    and pad a list of images on the bottom and right (pixel (y, x) keeps its place) into one batch.

    Args:
        mean, std: per-channel mean and std in 0-255 RGB (ImageNet's by default); both ``None``
            leaves the values as they are.
        size: ``(H, W)`` minimum padded size, or ``None``.
        size_divisor: pad to a multiple of this, or ``None``.
        pad_val: image padding value after normalisation (0 = the mean colour).
        to_rgb: swap channels 0 and 2 (vitasks' LoadImage already gives RGB).
        non_blocking: non-blocking host-to-device copies.
        per_image_norm: standardise each image on its own after mean/std (``true`` or
            ``{eps, border}``, see :class:`PerImageStandardization`).

    Subclasses choose when the batch is padded to ``size``/``size_divisor``
    (:meth:`padded_shape`) and what to do with the samples.
    """

    config_key = "model.data_preprocessor"

    @checked
    def __init__(
        self,
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
        size: OrNone(IntPair) = None,
        size_divisor: OrNone(PositiveInt) = None,
        pad_val: float = 0.0,
        to_rgb: bool = False,
        non_blocking: bool = False,
        per_image_norm: dict | bool | None = None,
    ) -> None:
        super().__init__(non_blocking=non_blocking)
        owner = config_key(default=self.config_key)
        self.per_image_norm = PerImageStandardization.from_config(per_image_norm, owner)
        both_or_neither(owner, mean=mean, std=std)
        self.normalize = mean is not None
        if self.normalize:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1), False)
        self.size, self.size_divisor = size, size_divisor
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
            if self.per_image_norm is not None:
                img = self.per_image_norm(img)  # before padding: the statistics of the image alone
            images.append(img)
        return images

    def padded_shape(self, shapes: Sequence[tuple[int, int]], to_size: bool = True) -> tuple[int, int]:
        """The (H, W) that images of ``shapes`` are padded to: the largest, then (``to_size``) at
        least ``size`` and a multiple of ``size_divisor``."""
        height = max(h for h, _ in shapes)
        width = max(w for _, w in shapes)
        if not to_size:
            return height, width
        if self.size is not None:
            height, width = max(height, self.size[0]), max(width, self.size[1])
        if self.size_divisor:
            d = self.size_divisor
            height, width = -(-height // d) * d, -(-width // d) * d
        return height, width

    def pad_batch(self, images: list[torch.Tensor], height: int, width: int) -> torch.Tensor:
        """The images padded with ``pad_val`` to ``height`` x ``width`` and stacked."""
        return torch.stack([
            F.pad(img, (0, width - img.shape[-1], 0, height - img.shape[-2]), value=self.pad_val)
            for img in images
        ])
