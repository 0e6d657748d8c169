"""The per-sample record that flows from datasets through models to metrics.

vitasks uses mmengine's data elements as they are. Conventions for the fields:

- every task: metainfo ``img_path``, ``ori_shape`` (H, W of the file), ``img_shape`` (after
  the pipeline);
- classification: ``gt_label`` (LongTensor, shape ``(1,)``), ``pred_score`` (softmax, ``(K,)``),
  ``pred_label`` (LongTensor ``(1,)``);
- segmentation: ``gt_sem_seg`` / ``pred_sem_seg`` / ``seg_logits`` as :class:`PixelData` with
  ``data`` of shape ``(1, H, W)`` (logits: ``(K, H, W)``).
"""

from mmengine.structures import BaseDataElement, LabelData, PixelData

DataSample = BaseDataElement

__all__ = ["DataSample", "LabelData", "PixelData"]
