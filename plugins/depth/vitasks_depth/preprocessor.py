"""The depth data preprocessor: the segmentation one, padding ``gt_depth`` with the batch."""

from __future__ import annotations

import torch.nn.functional as F

from vitasks.models.data_preprocessors.seg import SegDataPreprocessor
from vitasks.registry import MODELS
from vitasks.structures import PixelData


@MODELS.register_module()
class DepthDataPreprocessor(SegDataPreprocessor):
    """:class:`~vitasks.models.data_preprocessors.seg.SegDataPreprocessor` (normalise, pad the
    images on the bottom and right to a common size, at least ``size`` and a multiple of
    ``size_divisor`` in training), which also pads each training sample's ``gt_depth`` to the
    batch's size with 0, the invalid value the loss skips.

    So a training batch may mix sizes (crops smaller than ``crop_size``, or no crop at all) and
    sizes that are not multiples of the backbone's stride: set ``size_divisor`` to that stride.
    In evaluation nothing is padded but the images to the largest of the batch; the depth estimator
    pads to its stride itself and returns depth at each image's original size.

    Arguments as :class:`SegDataPreprocessor` (``seg_pad_val`` is unused: depth pads with 0).
    """

    def forward(self, data: dict, training: bool = False) -> dict:
        data = super().forward(data, training)
        samples = data.get("data_samples")
        if not training or samples is None:
            return data
        height, width = data["inputs"].shape[-2:]
        for sample in samples:
            if "gt_depth" not in sample:
                continue
            depth = sample.gt_depth.data
            pad = sample.padding_size  # [left, right, top, bottom], set by the parent
            image_size = (height - pad[2] - pad[3], width - pad[0] - pad[1])
            if tuple(depth.shape[-2:]) != image_size:
                raise ValueError(
                    f"depth map of {sample.get('img_path', 'a sample')} has size "
                    f"{tuple(depth.shape[-2:])} but its image {image_size} after the pipeline; resize "
                    "and crop image and depth together (DepthResize, DepthRandomResizeCrop)")
            # a new PixelData: an existing one refuses data of another size
            sample.gt_depth = PixelData(data=F.pad(depth, (0, pad[1], 0, pad[3]), value=0.0),
                                        metainfo=sample.gt_depth.metainfo)
        return data
