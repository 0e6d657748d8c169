"""Image classifier: backbone (+ optional neck) + classification head."""

from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn

from vitasks.models.tasks.base import TaskModel
from vitasks.registry import MODELS
from vitasks.structures import DataSample


@MODELS.register_module()
class ImageClassifier(TaskModel):
    """Classifier following mmengine's BaseModel protocol.

    ``forward(inputs, data_samples, mode)``:

    - ``"tensor"``: logits ``(N, K)`` for already-normalised inputs (the public contract
      ``init_model(cfg)(x, mode="tensor")``);
    - ``"loss"``: ``{"loss": ...}``, from hard labels (``gt_label``) or the soft targets
      (``gt_score``) that Mixup/CutMix leave in the samples;
    - ``"predict"``: the samples with ``pred_score`` (softmax) and ``pred_label`` filled.

    Args:
        backbone: Backbone config, e.g. ``{type: VisionTransformer, ...}`` returning a tuple whose
            last element is the pooled feature ``(N, C)``.
        head: Head config (``LinearClsHead`` or ``MLPClsHead``).
        neck: Optional neck config.
        data_preprocessor: Preprocessor config; default ``ClsDataPreprocessor()`` (ImageNet
            mean/std).
        init_cfg: mmengine initialisation config.
    """

    def __init__(
        self,
        backbone: dict,
        head: dict,
        neck: Optional[dict] = None,
        data_preprocessor: Optional[Union[dict, nn.Module]] = None,
        init_cfg: Optional[dict] = None,
    ) -> None:
        if data_preprocessor is None:
            data_preprocessor = dict(type="ClsDataPreprocessor")
        super().__init__(backbone, neck=neck, data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.head = self.build_part(head, "head")

    def forward(
        self,
        inputs: torch.Tensor,
        data_samples: Optional[Sequence[DataSample]] = None,
        mode: str = "tensor",
    ) -> Union[torch.Tensor, dict, List[DataSample]]:
        if mode == "tensor":
            return self.head(self.extract_feat(inputs))
        if mode == "loss":
            if not data_samples:
                raise ValueError("ImageClassifier(mode='loss') needs data_samples with gt_label")
            return self.head.loss(self.extract_feat(inputs), data_samples)
        if mode == "predict":
            return self.head.predict(self.extract_feat(inputs), data_samples)
        raise ValueError(f"ImageClassifier: unknown mode {mode!r}; expected 'tensor', 'loss' or 'predict'")
