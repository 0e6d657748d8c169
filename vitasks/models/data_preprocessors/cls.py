"""Classification data preprocessor: stack, cast to float, normalise, and in training mix.

The dataloader hands over uint8 CHW tensors; the preprocessor stacks them, casts to float and
normalises with mean/std given in 0-255 RGB. In training it can erase rectangles of each image
(timm's RandomErasing, after normalisation as in timm) and mix samples (Mixup or CutMix,
one chosen per batch, as the DeiT recipe) and turns the hard labels into soft targets
``gt_score`` that the loss reads.
"""

from typing import List, Optional, Sequence

from mmengine.model import ImgDataPreprocessor

from vitasks.checks import both_or_neither, config_key
from vitasks.registry import MODELS

from .batch_augments import build_batch_augments, build_random_erasing, mix_batch
from .normalization import IMAGENET_MEAN, IMAGENET_STD, PerImageStandardization

__all__ = ["ClsDataPreprocessor"]


@MODELS.register_module()
class ClsDataPreprocessor(ImgDataPreprocessor):
    """Stacks uint8 CHW images, casts to float, normalises; in training applies batch augments.

    Args:
        mean: Per-channel mean in 0-255 RGB (ImageNet's by default; 127.5 for Google's ViT
            weights).
        std: Per-channel std in 0-255 (ImageNet's by default; 127.5 for Google's weights).
        pad_size_divisor: Pad the batch to a multiple of this size.
        pad_value: Padding value.
        to_rgb: Swap channels 0 and 2 (images from vitasks' LoadImage are already RGB).
        num_classes: Number of classes; needed to turn labels into soft targets when
            ``batch_augments`` is set.
        batch_augments: ``{augments: [{type: Mixup, alpha: 0.8}, {type: CutMix, alpha: 1.0}],
            probs: [0.5, 0.5]}``; ``None`` for none.
        non_blocking: Non-blocking host-to-device copies.
        per_image_norm: Standardise each image on its own after mean/std (``true`` or
            ``{eps, border}``, see :class:`~.normalization.PerImageStandardization`); the
            small-data recipe for classes told apart by shape.
        random_erasing: timm's RandomErasing per image in training, after normalisation and
            before Mixup/CutMix (DeiT: ``{type: RandomErasing, probability: 0.25, mode: pixel}``);
            ``None`` for none.
    """

    def __init__(
        self,
        mean: Optional[Sequence[float]] = IMAGENET_MEAN,
        std: Optional[Sequence[float]] = IMAGENET_STD,
        pad_size_divisor: int = 1,
        pad_value: float = 0,
        to_rgb: bool = False,
        num_classes: Optional[int] = None,
        batch_augments: Optional[dict] = None,
        non_blocking: bool = False,
        per_image_norm: Optional[dict] = None,
        random_erasing: Optional[dict] = None,
    ) -> None:
        where = config_key(default="model.data_preprocessor")
        both_or_neither(where, mean=mean, std=std)
        super().__init__(
            mean=mean,
            std=std,
            pad_size_divisor=pad_size_divisor,
            pad_value=pad_value,
            bgr_to_rgb=to_rgb,
            non_blocking=non_blocking,
        )
        self.num_classes = num_classes
        self.config_path = where  # for errors at run time too
        self.per_image_norm = PerImageStandardization.from_config(per_image_norm, where)
        self.random_erasing = build_random_erasing(random_erasing, where)
        self.batch_augments = build_batch_augments(batch_augments, num_classes, where)

    def forward(self, data: dict, training: bool = False) -> dict:
        data = super().forward(data, training)
        if self.per_image_norm is not None:
            # The batch holds same-sized images (no padding unless pad_size_divisor pads them).
            data["inputs"] = self.per_image_norm(data["inputs"])
        if training and self.random_erasing is not None:
            data["inputs"] = self.random_erasing(data["inputs"])
        samples: Optional[List] = data.get("data_samples")
        if training and self.batch_augments is not None and samples:
            data["inputs"] = mix_batch(self.batch_augments, data["inputs"], samples, self.num_classes,
                                       self.config_path)
        return data
