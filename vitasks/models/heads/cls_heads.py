"""Classification heads: pooled backbone features ``(N, C)`` -> logits ``(N, K)``."""

from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule

from vitasks.checks import InRange, PositiveInt, building, checked, config_key
from vitasks.errors import ConfigError
from vitasks.registry import MODELS
from vitasks.structures import DataSample

Feats = Union[torch.Tensor, Sequence[torch.Tensor]]


def _last(feats: Feats) -> torch.Tensor:
    """The head reads the last feature of a backbone/neck tuple."""
    if isinstance(feats, (tuple, list)):
        feats = feats[-1]
    if feats.dim() != 2:
        raise ValueError(
            f"a classification head expects pooled features (N, C), got shape {tuple(feats.shape)}; "
            "use a backbone with pool='token', 'mean' or 'token_mean'"
        )
    return feats


class BaseClsHead(BaseModule):
    """Shared loss/predict logic; subclasses define ``forward(feats) -> logits``.

    Args:
        num_classes: Number of classes K.
        loss: Config of the loss (registered in MODELS), by default cross-entropy.
        init_cfg: mmengine initialisation config.
    """

    config_key = "model.head"

    @checked
    def __init__(
        self,
        num_classes: PositiveInt,
        loss: Optional[dict] = None,
        init_cfg: Optional[dict] = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        self.config_path = config_key(default=self.config_key)  # for errors at run time too
        self.num_classes = num_classes
        loss = dict(type="CrossEntropyLoss") if loss is None else loss
        with building("loss", root=self.config_path):
            self.loss_module = MODELS.build(loss) if isinstance(loss, dict) else loss

    def reset_parameters(self) -> None:
        """The head's own initialisation, done again by :meth:`init_weights` unless an
        ``init_cfg`` says otherwise (none here)."""

    def init_weights(self) -> None:
        super().init_weights()
        if self.init_cfg is None:
            self.reset_parameters()

    def _pooled(self, feats: Feats) -> torch.Tensor:
        """The last pooled feature, checked against ``in_channels`` so that a width mismatch names
        the config key instead of failing inside a matmul."""
        feats = _last(feats)
        if feats.shape[-1] != self.in_channels:
            raise ConfigError(
                f"{type(self).__name__}: in_channels is {self.in_channels} but the backbone gives {feats.shape[-1]} "
                f"features; set {self.config_path}.in_channels to the backbone's width (2 x embed_dim for "
                "pool='token_mean')"
            )
        return feats

    @staticmethod
    def _with_predictions(data_samples: Optional[List[Optional[DataSample]]], scores: torch.Tensor) -> List[DataSample]:
        """Each sample (a new one where None) with ``pred_score`` (K,) and ``pred_label`` (1,),
        the argmax of its row of ``scores``."""
        labels = scores.argmax(dim=1, keepdim=True)
        out = []
        for sample, score, label in zip([None] * len(scores) if data_samples is None else data_samples, scores, labels):
            sample = DataSample() if sample is None else sample
            sample.pred_score = score
            sample.pred_label = label
            out.append(sample)
        return out

    @staticmethod
    def _targets(data_samples: Sequence[DataSample], device: torch.device) -> torch.Tensor:
        """Soft targets ``(N, K)`` when every sample has ``gt_score`` (Mixup/CutMix), else hard
        labels ``(N,)`` from ``gt_label``."""
        if all("gt_score" in s for s in data_samples):
            return torch.stack([s.gt_score for s in data_samples]).to(device)
        return torch.cat([s.gt_label.reshape(-1) for s in data_samples]).to(device).long()

    def loss(self, feats: Feats, data_samples: Sequence[DataSample]) -> dict:
        """Loss dict ``{"loss": ...}`` for a batch."""
        logits = self(feats)
        targets = self._targets(data_samples, logits.device)
        return {"loss": self.loss_module(logits, targets)}

    def predict(
        self, feats: Feats, data_samples: Optional[List[Optional[DataSample]]] = None
    ) -> List[DataSample]:
        """Fill ``pred_score`` (softmax, (K,)) and ``pred_label`` ((1,)) into each sample."""
        return self._with_predictions(data_samples, F.softmax(self(feats).float(), dim=1).detach())


@MODELS.register_module()
class LinearClsHead(BaseClsHead):
    """One linear layer ``fc``.

    Args:
        num_classes: Number of classes K.
        in_channels: Feature width C.
        loss: Loss config (label smoothing goes here).
        init_std: ``0`` (default): weights zero, as for fine-tuning (the first steps train the
            head from a neutral start instead of random logits). ``> 0``: weights normal with
            this std (timm's truncated normal; mmpretrain's ``LinearClsHead`` draws std 0.01).
            Training from scratch wants a random start: with a zero head the backbone's first
            gradients all point along the few directions the head has learned, and on small
            photo sets the demo then learned far slower (docs/demos.md, "Classification"). Biases
            start at zero.
        init_cfg: mmengine initialisation config.
    """

    @checked
    def __init__(
        self,
        num_classes: PositiveInt,
        in_channels: PositiveInt,
        loss: Optional[dict] = None,
        init_std: InRange(0) = 0.0,
        init_cfg: Optional[dict] = None,
    ) -> None:
        super().__init__(num_classes, loss=loss, init_cfg=init_cfg)
        self.in_channels = in_channels
        self.init_std = float(init_std)
        self.fc = nn.Linear(in_channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init_std > 0:
            nn.init.trunc_normal_(self.fc.weight, std=self.init_std)  # (timm's: cut at +-2, absolute)
        else:
            nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, feats: Feats) -> torch.Tensor:
        return self.fc(self._pooled(feats))


@MODELS.register_module()
class MLPClsHead(BaseClsHead):
    """ViT pre-training head: ``hidden`` (Linear) -> tanh -> ``fc`` (zero-initialised).

    Args:
        num_classes: Number of classes K.
        in_channels: Feature width C.
        hidden_channels: Width of the tanh layer (the "pre-logits"; C in the ViT paper).
        loss: Loss config.
        init_cfg: mmengine initialisation config.
    """

    @checked
    def __init__(
        self,
        num_classes: PositiveInt,
        in_channels: PositiveInt,
        hidden_channels: int,
        loss: Optional[dict] = None,
        init_cfg: Optional[dict] = None,
    ) -> None:
        super().__init__(num_classes, loss=loss, init_cfg=init_cfg)
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.hidden = nn.Linear(in_channels, hidden_channels)
        self.fc = nn.Linear(hidden_channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The hidden layer keeps a small random init; the classifier starts at zero.
        nn.init.trunc_normal_(self.hidden.weight, std=0.02)
        nn.init.zeros_(self.hidden.bias)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, feats: Feats) -> torch.Tensor:
        return self.fc(torch.tanh(self.hidden(self._pooled(feats))))
