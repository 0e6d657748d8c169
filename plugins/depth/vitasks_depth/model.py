"""The depth task model: the segmentor's encoder-decoder, predicting depth instead of classes."""

from __future__ import annotations

from typing import Sequence

import torch
from mmengine.structures import PixelData

from vitasks.models.tasks.segmentor import EncoderDecoder
from vitasks.registry import MODELS
from vitasks.structures import DataSample


@MODELS.register_module()
class DepthEstimator(EncoderDecoder):
    """Backbone -> neck -> :class:`~vitasks_depth.head.DepthHead`, with the segmentor's
    inference (whole or sliding window, resizing back to the original size).

    ``predict`` fills ``pred_depth`` (PixelData ``(1, H, W)``, metres). Arguments as
    :class:`~vitasks.models.tasks.segmentor.EncoderDecoder`.
    """

    def predict(self, inputs: torch.Tensor, data_samples: Sequence[DataSample] | None = None) -> list[DataSample]:
        samples = super().predict(inputs, data_samples)
        for sample in samples:
            log_depth = sample.seg_logits.data
            sample.pred_depth = PixelData(data=log_depth.float().exp())
            del sample.seg_logits, sample.pred_sem_seg  # class maps mean nothing here
        return samples
