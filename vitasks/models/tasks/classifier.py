"""Image classifier: backbone (+ optional neck) + classification head."""

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmengine.model import BaseModel

from vitasks.errors import ConfigError
from vitasks.registry import MODELS
from vitasks.structures import DataSample


def _build(cfg: Union[dict, nn.Module], what: str) -> nn.Module:
    """Build from the vitasks registry (so it works without mmengine's default scope)."""
    if isinstance(cfg, nn.Module):
        return cfg
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise ConfigError(f"ImageClassifier: `{what}` must be a dict with a `type`, got {cfg!r}")
    return MODELS.build(cfg)


@MODELS.register_module()
class ImageClassifier(BaseModel):
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
        # Built here from vitasks' registry: mmengine's BaseModel would look in its root registry,
        # which finds vitasks' types only inside a Runner (default scope set).
        data_preprocessor = _build(data_preprocessor, "data_preprocessor")
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.backbone = _build(backbone, "backbone")
        self.neck = _build(neck, "neck") if neck is not None else None
        self.head = _build(head, "head")

    def extract_feat(self, inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Backbone (and neck) features as a tuple."""
        feats = self.backbone(inputs)
        if isinstance(feats, torch.Tensor):
            feats = (feats,)
        if self.neck is not None:
            feats = self.neck(feats)
        return tuple(feats)

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
