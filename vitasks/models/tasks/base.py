"""What every task model shares: building its parts from vitasks' registry, and features."""

from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.nn as nn
from mmengine.model import BaseModel

from vitasks.checks import building, config_key, options
from vitasks.registry import MODELS


def build_part(cfg: Union[dict, nn.Module], owner: str, key: str) -> nn.Module:
    """Build ``model.<key>`` of task model ``owner`` from vitasks' registry.

    Built here rather than by mmengine's BaseModel, which looks in its root registry and finds
    vitasks' types only inside a Runner (where the default scope is set). Already built modules
    pass through.
    """
    if isinstance(cfg, nn.Module):
        return cfg
    options(cfg, config_key(key, default="model"), what=f"a dict with a `type` ({owner})", required=("type",))
    with building(key, root="model"):  # the part's errors name `model.<key>` (under a multi-task model's task)
        return MODELS.build(cfg)


class TaskModel(BaseModel):
    """Base of the task models: a data preprocessor, a backbone and an optional neck.

    Subclasses build their heads and implement ``forward(inputs, data_samples, mode)``; a
    ``data_preprocessor`` left out is their ``default_preprocessor``.
    """

    default_preprocessor: dict = {}

    def __init__(self, backbone, neck=None, data_preprocessor=None, init_cfg=None) -> None:
        owner = type(self).__name__
        if data_preprocessor is None:
            data_preprocessor = dict(self.default_preprocessor)
        super().__init__(data_preprocessor=build_part(data_preprocessor, owner, "data_preprocessor"),
                         init_cfg=init_cfg)
        self.backbone = build_part(backbone, owner, "backbone")
        self.neck = build_part(neck, owner, "neck") if neck is not None else None

    def build_part(self, cfg: Union[dict, nn.Module], key: str) -> nn.Module:
        return build_part(cfg, type(self).__name__, key)

    def extract_feat(self, inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Backbone (and neck) features as a tuple."""
        feats = self.backbone(inputs)
        if isinstance(feats, torch.Tensor):
            feats = (feats,)
        if self.neck is not None:
            feats = self.neck(feats)
        return tuple(feats)


class HeadTaskModel(TaskModel):
    """A backbone (+ optional neck) and one ``head`` with ``loss``/``predict``: the shape of the
    image classifier and the video recognizer, which differ only in their default data
    preprocessor (``default_preprocessor``) and in what their heads do.

    ``forward(inputs, data_samples, mode)``: ``"tensor"`` gives the head's raw output,
    ``"loss"`` the head's losses (needs data samples), ``"predict"`` the samples with the head's
    predictions filled in.
    """

    def __init__(
        self,
        backbone: dict,
        head: dict,
        neck: dict | None = None,
        data_preprocessor: dict | nn.Module | None = None,
        init_cfg: dict | None = None,
    ) -> None:
        super().__init__(backbone, neck=neck, data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.head = self.build_part(head, "head")

    def forward(self, inputs: torch.Tensor, data_samples=None, mode: str = "tensor"):
        name = type(self).__name__
        if mode == "tensor":
            return self.head(self.extract_feat(inputs))
        if mode == "loss":
            if not data_samples:
                raise ValueError(f"{name}(mode='loss') needs data_samples with gt_label")
            return self.head.loss(self.extract_feat(inputs), data_samples)
        if mode == "predict":
            return self.head.predict(self.extract_feat(inputs), data_samples)
        raise ValueError(f"{name}: unknown mode {mode!r}; expected 'tensor', 'loss' or 'predict'")
