"""Video action recognizer: a video backbone + ``VideoClsHead`` (mmaction2's Recognizer3D)."""

from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn

from vitasks.models.tasks.base import TaskModel
from vitasks.registry import MODELS
from vitasks.structures import DataSample


@MODELS.register_module()
class Recognizer(TaskModel):
    """Clip classifier following mmengine's BaseModel protocol.

    The data preprocessor stacks the V views (clips x crops) of each video along the batch, so
    ``inputs`` is (N * V, 3, T, H, W), normalised, and each sample's metainfo says its
    ``num_views``. ``forward(inputs, data_samples, mode)``:

    - ``"tensor"``: logits (N, K) for already-normalised clips (N, 3, T, H, W), one row per clip
      (the public contract ``init_model(cfg)(x, mode="tensor")``);
    - ``"loss"``: ``{"loss": ...}``, every view trained on its video's label;
    - ``"predict"``: the samples with ``pred_score`` (K,) averaged over their views (the head's
      ``average_clips``: softmax probabilities or logits) and ``pred_label``.

    Args:
        backbone: backbone config, e.g. ``{type: VideoVisionTransformer, ...}``, returning a tuple
            whose last element is the pooled feature (N, C).
        head: head config (``VideoClsHead``).
        neck: optional neck config.
        data_preprocessor: preprocessor config; default ``VideoDataPreprocessor()``.
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
            data_preprocessor = dict(type="VideoDataPreprocessor")
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
                raise ValueError("Recognizer(mode='loss') needs data_samples with gt_label")
            return self.head.loss(self.extract_feat(inputs), data_samples)
        if mode == "predict":
            return self.head.predict(self.extract_feat(inputs), data_samples)
        raise ValueError(f"Recognizer: unknown mode {mode!r}; expected 'tensor', 'loss' or 'predict'")
