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

import torch
import torch.nn.functional as F

from vitasks.models.data_preprocessors.normalization import PaddedImagePreprocessor
from vitasks.registry import MODELS

__all__ = ["DetDataPreprocessor"]


@MODELS.register_module()
class DetDataPreprocessor(PaddedImagePreprocessor):
    """Stack uint8 CHW images of different sizes into one normalised, padded float batch.

    Args:
        pad_mask: pad ``gt_instances.masks`` bitmaps to the batch shape too.
        *args, **kwargs: ``mean``, ``std``, ``size`` (``[1024, 1024]`` for ViTDet), ``size_divisor``,
            ``pad_val``, ``to_rgb``, ``non_blocking``, ``per_image_norm``: see
            :class:`~.normalization.PaddedImagePreprocessor`.
    """

    def __init__(self, *args, pad_mask: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pad_mask = bool(pad_mask)

    def forward(self, data: dict, training: bool = False) -> dict:
        data = self.cast_data(data)
        images = self.normalized_images(data["inputs"])
        shapes = [tuple(img.shape[-2:]) for img in images]
        height, width = self.padded_shape(shapes)
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
