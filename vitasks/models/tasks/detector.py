"""Two-stage detectors: Mask R-CNN and Cascade Mask R-CNN on a (ViTDet) backbone and neck.

backbone -> neck (a feature pyramid, p2-p6) -> ``rpn_head`` (proposals) -> ``roi_head`` (boxes,
classes, masks). The RoI head's type picks the variant: ``StandardRoIHead`` (Mask R-CNN) or
``CascadeRoIHead`` (Cascade Mask R-CNN); without a mask head it is Faster R-CNN.

Data samples (from ``PackDetInputs`` and the detection data preprocessor): ``gt_instances`` with
``bboxes`` (N, 4) xyxy in input-image pixels, ``labels`` (N,) in 0..K-1 and ``masks`` (N, H, W)
bitmaps at the input image size; metainfo ``img_shape`` (the image after resizing, before
padding: proposals and boxes are clipped to it), ``ori_shape`` and ``scale_factor`` (w, h) =
input size / original size.
"""

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmengine.structures import InstanceData

from vitasks.checks import config_key
from vitasks.errors import ConfigError
from vitasks.models.heads.roi_heads import Detections, GroundTruth
from vitasks.models.ops import clip_boxes, nonempty_boxes, paste_masks_in_image
from vitasks.models.tasks.base import TaskModel
from vitasks.registry import MODELS
from vitasks.structures import DataSample

ImageSize = Tuple[int, int]


@MODELS.register_module()
class TwoStageDetector(TaskModel):
    """Region-proposal detector following mmengine's BaseModel protocol.

    ``forward(inputs, data_samples, mode)``:

    - ``"loss"``: ``loss_rpn_cls``, ``loss_rpn_bbox`` and the RoI head's losses (``loss_cls``,
      ``loss_bbox``, ``loss_mask``; the cascade's box losses per stage, ``s0.loss_cls``...);
    - ``"predict"``: the samples with ``pred_instances``: ``bboxes`` (D, 4) xyxy in original
      image pixels (divided by ``scale_factor``, clipped to ``ori_shape``, empty boxes dropped),
      ``scores`` (D,), ``labels`` (D,) in 0..K-1 and, with a mask head, ``masks`` (D, H, W) bool
      at ``ori_shape`` (the mask head's probabilities pasted into the image and thresholded at
      ``mask_threshold``);
    - ``"tensor"``: the raw head outputs for normalised inputs, a dict: ``rpn_objectness`` and
      ``rpn_deltas`` (lists per level of (N, A, H, W) and (N, 4A, H, W)), ``proposals`` (list
      per image of (R_i, 4) boxes in input pixels, the RPN's test-time proposals) and the RoI
      head's outputs for them, all images concatenated: ``cls_logits`` (R, K + 1, background
      last) and ``bbox_deltas`` (R, 4K) (cascade: lists per stage, and ``boxes``, each stage's
      input boxes). Post-processing (softmax, decoding with the box coder, per-class NMS, the
      mask head on the kept boxes, pasting) is what ``predict`` adds.

    Args:
        backbone: backbone config (``VisionTransformer`` with ``out_indices: [-1]``).
        neck: pyramid config (``SimpleFeaturePyramid``: p2-p6).
        rpn_head: ``RPNHead`` config.
        roi_head: ``StandardRoIHead`` or ``CascadeRoIHead`` config.
        mask_threshold: probability from which a pasted mask pixel is set (0.5).
        data_preprocessor: default ``DetDataPreprocessor()``.
        init_cfg: mmengine initialisation config.
    """

    default_preprocessor = dict(type="DetDataPreprocessor")

    def __init__(
        self,
        backbone: dict,
        neck: dict,
        rpn_head: dict,
        roi_head: dict,
        mask_threshold: float = 0.5,
        data_preprocessor: Optional[Union[dict, nn.Module]] = None,
        init_cfg: Optional[dict] = None,
    ) -> None:
        if neck is None:
            raise ConfigError(f"{type(self).__name__}: `{config_key('neck', default='model')}` is required "
                              "(e.g. {type: SimpleFeaturePyramid})")
        super().__init__(backbone, neck=neck, data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.rpn_head = self.build_part(rpn_head, "rpn_head")
        self.roi_head = self.build_part(roi_head, "roi_head")
        self.num_classes = self.roi_head.num_classes
        self.mask_threshold = float(mask_threshold)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _image_sizes(inputs: torch.Tensor, data_samples: Optional[Sequence[DataSample]]) -> List[ImageSize]:
        """Each image's size before padding (``img_shape``), the input's size when unknown."""
        full = (int(inputs.shape[-2]), int(inputs.shape[-1]))
        if not data_samples:
            return [full] * inputs.shape[0]
        sizes = []
        for sample in data_samples:
            height, width = sample.metainfo.get("img_shape", full)[:2]
            sizes.append((min(int(height), full[0]), min(int(width), full[1])))
        return sizes

    @staticmethod
    def _ground_truth(data_samples: Sequence[DataSample], device: torch.device) -> List[GroundTruth]:
        truths = []
        for index, sample in enumerate(data_samples):
            if "gt_instances" not in sample:
                raise ValueError(f"sample {index}: a detector's training sample needs gt_instances")
            instances = sample.gt_instances
            boxes = torch.as_tensor(instances.bboxes, dtype=torch.float32, device=device).reshape(-1, 4)
            labels = torch.as_tensor(instances.labels, dtype=torch.long, device=device).reshape(-1)
            masks = instances.masks if "masks" in instances else None
            truths.append(GroundTruth(boxes, labels, masks))
        return truths

    # ------------------------------------------------------------------ modes
    def forward(
        self,
        inputs: torch.Tensor,
        data_samples: Optional[Sequence[DataSample]] = None,
        mode: str = "tensor",
    ):
        if mode == "loss":
            if not data_samples:
                raise ValueError(f"{type(self).__name__}(mode='loss') needs data_samples with gt_instances")
            return self.loss(inputs, data_samples)
        if mode == "predict":
            return self.predict(inputs, data_samples)
        if mode == "tensor":
            return self._forward_tensor(inputs, data_samples)
        raise ValueError(f"{type(self).__name__}: unknown mode {mode!r}; expected 'tensor', 'loss' or 'predict'")

    def loss(self, inputs: torch.Tensor, data_samples: Sequence[DataSample]) -> Dict[str, torch.Tensor]:
        features = self.extract_feat(inputs)
        image_sizes = self._image_sizes(inputs, data_samples)
        truths = self._ground_truth(data_samples, inputs.device)
        losses, proposals = self.rpn_head.loss_and_proposals(features, image_sizes, [t.boxes for t in truths])
        boxes = [p[0] for p in proposals]
        losses.update(self.roi_head.loss(features, boxes, truths, image_sizes=image_sizes))
        return losses

    def _forward_tensor(self, inputs: torch.Tensor, data_samples: Optional[Sequence[DataSample]]) -> dict:
        features = self.extract_feat(inputs)
        image_sizes = self._image_sizes(inputs, data_samples)
        objectness, deltas = self.rpn_head(features)
        proposals = [p[0] for p in self.rpn_head.proposals_from_outputs(features, objectness, deltas, image_sizes)]
        outputs = {"rpn_objectness": objectness, "rpn_deltas": deltas, "proposals": proposals}
        outputs.update(self.roi_head(features, proposals, image_sizes=image_sizes))
        return outputs

    def predict(
        self, inputs: torch.Tensor, data_samples: Optional[Sequence[DataSample]] = None
    ) -> List[DataSample]:
        """Fill ``pred_instances`` (original-image pixels) into each sample."""
        if data_samples is None:
            shape = tuple(inputs.shape[-2:])
            data_samples = [DataSample(metainfo=dict(img_shape=shape, ori_shape=shape)) for _ in range(len(inputs))]
        features = self.extract_feat(inputs)
        image_sizes = self._image_sizes(inputs, data_samples)
        proposals = [p[0] for p in self.rpn_head.predict(features, image_sizes)]
        detections = self.roi_head.predict(features, proposals, image_sizes)
        for sample, found, size in zip(data_samples, detections, image_sizes):
            sample.pred_instances = self.to_original(found, sample, size)
        return list(data_samples)

    def to_original(self, found: Detections, sample: DataSample, image_size: ImageSize) -> InstanceData:
        """Detections in input pixels -> ``InstanceData`` in the original image's pixels (boxes
        divided by ``scale_factor``; without it by the ratio of ``img_shape`` to ``ori_shape``)."""
        ori_h, ori_w = (int(v) for v in sample.metainfo.get("ori_shape", image_size)[:2])
        scale = sample.metainfo.get("scale_factor")
        if scale is None:
            scale_w, scale_h = image_size[1] / ori_w, image_size[0] / ori_h
        else:
            scale_w, scale_h = (float(s) for s in scale[:2])
        factor = found.boxes.new_tensor([scale_w, scale_h, scale_w, scale_h])
        boxes = clip_boxes(found.boxes / factor, (ori_h, ori_w))
        keep = nonempty_boxes(boxes)
        result = InstanceData()
        result.bboxes = boxes[keep]
        result.scores = found.scores[keep]
        result.labels = found.labels[keep]
        if found.mask_probs is not None:
            result.masks = paste_masks_in_image(
                found.mask_probs[keep], result.bboxes, (ori_h, ori_w), threshold=self.mask_threshold
            )
        return result


@MODELS.register_module()
class MaskRCNN(TwoStageDetector):
    """Mask R-CNN (He et al. 2017): :class:`TwoStageDetector` with a ``StandardRoIHead`` that has
    a mask head; as a config type it reads as the recipe it is."""


@MODELS.register_module()
class CascadeMaskRCNN(TwoStageDetector):
    """Cascade Mask R-CNN (Cai & Vasconcelos 2019): :class:`TwoStageDetector` with a
    ``CascadeRoIHead``."""
