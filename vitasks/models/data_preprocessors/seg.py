"""Segmentation data preprocessor: normalise, pad images (0) and label maps (255), stack.

Images and labels are padded on the bottom and right, so pixel (y, x) keeps its place; the
sample's metainfo records ``pad_shape``, ``batch_input_shape`` and ``padding_size``
(``[left, right, top, bottom]``, as mmseg), which the segmentor uses to cut the padding off its
predictions.
"""

from __future__ import annotations

import torch.nn.functional as F

from vitasks.registry import MODELS
from vitasks.structures import PixelData

from .normalization import PaddedImagePreprocessor

__all__ = ["SegDataPreprocessor"]


@MODELS.register_module()
class SegDataPreprocessor(PaddedImagePreprocessor):
    """Stack uint8 CHW images into a normalised float batch, padding to a common size.

    In training, images are padded (after normalisation, with ``pad_val``) and label maps (with
    ``seg_pad_val``, ignored by the loss) to at least ``size`` and to a multiple of
    ``size_divisor``. In evaluation, images are only padded to the largest of the batch (labels
    stay at their original size for scoring), so the model sees no extra padding.

    Args:
        seg_pad_val: label padding value (the ignore index).
        *args, **kwargs: ``mean``, ``std``, ``size`` (in training: the crop size, ``[512, 512]``),
            ``size_divisor`` (in training), ``pad_val``, ``to_rgb``, ``non_blocking``,
            ``per_image_norm``: see :class:`~.normalization.PaddedImagePreprocessor`.
    """

    def __init__(self, *args, seg_pad_val: int = 255, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seg_pad_val = int(seg_pad_val)

    def forward(self, data: dict, training: bool = False) -> dict:
        data = self.cast_data(data)
        samples = data.get("data_samples")
        images = self.normalized_images(data["inputs"])
        shapes = [tuple(img.shape[-2:]) for img in images]
        height, width = self.padded_shape(shapes, to_size=training)
        batch = self.pad_batch(images, height, width)
        if samples is not None:
            for sample, (h, w) in zip(samples, shapes):
                sample.set_metainfo(dict(
                    batch_input_shape=(height, width),
                    pad_shape=(height, width),
                    padding_size=[0, width - w, 0, height - h],
                ))
                if "img_shape" not in sample:
                    sample.set_metainfo(dict(img_shape=(h, w)))
                if training and "gt_sem_seg" in sample:
                    label = sample.gt_sem_seg.data
                    if tuple(label.shape[-2:]) != (h, w):
                        raise ValueError(
                            f"label map of {sample.get('img_path', 'a sample')} has size "
                            f"{tuple(label.shape[-2:])} but its image {(h, w)} after the pipeline; "
                            "resize/crop image and label together (Albu, SegRandomResize, SegRandomCrop)"
                        )
                    # A new PixelData: an existing one refuses data of another size.
                    sample.gt_sem_seg = PixelData(
                        data=F.pad(label, (0, width - w, 0, height - h), value=self.seg_pad_val),
                        metainfo=sample.gt_sem_seg.metainfo,
                    )
        return {"inputs": batch, "data_samples": samples}
