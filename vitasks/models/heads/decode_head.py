"""Base of the semantic segmentation decode heads.

A decode head maps the backbone/neck tuple of feature maps to class logits ``(N, K, h, w)`` at
some stride. ``loss`` upsamples the logits bilinearly to the (padded) label size and applies its
loss(es) with the ignore index; the segmentor resizes logits for prediction.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitasks.checks import InRange, ListOf, OrNone, PositiveInt, building, checked, config_key
from vitasks.errors import ConfigError
from vitasks.registry import MODELS
from vitasks.structures import DataSample


def resize(x: torch.Tensor, size: Sequence[int], align_corners: bool = False) -> torch.Tensor:
    """Bilinear resize of ``(N, C, H, W)`` to ``size`` (no-op when already there)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(int(s) for s in size), mode="bilinear", align_corners=align_corners)


def _loss_name(cfg: dict | nn.Module, index: int, count: int) -> str:
    name = cfg.get("type") if isinstance(cfg, dict) else type(cfg).__name__
    if name == "CrossEntropyLoss":
        base = "loss_ce"
    else:
        base = "loss_" + str(name).lower().replace("loss", "")
    return base if count == 1 else f"{base}_{index}"


def stack_labels(data_samples: Sequence[DataSample]) -> torch.Tensor:
    """``(N, H, W)`` long labels from the samples' ``gt_sem_seg`` (already padded to one size)."""
    try:
        labels = [s.gt_sem_seg.data for s in data_samples]
    except AttributeError as e:
        raise ValueError("segmentation loss needs `gt_sem_seg` in every data sample") from e
    shapes = {tuple(t.shape[-2:]) for t in labels}
    if len(shapes) > 1:
        raise ValueError(
            f"label maps of one batch have different sizes {sorted(shapes)}; the data preprocessor "
            "(SegDataPreprocessor) pads them to one size"
        )
    return torch.stack([t.reshape(t.shape[-2:]) for t in labels]).long()


class BaseDecodeHead(nn.Module):
    """Feature selection, classifier, loss and accuracy shared by the decode heads.

    Args:
        in_channels: channels of the selected input(s) (an int, or a list for several inputs).
        channels: channels of the head's last feature map (the classifier's input).
        num_classes: number of classes K.
        in_index: index (or list of indices) of the input map(s) in the backbone/neck tuple.
        dropout_ratio: dropout before the classifier.
        loss_decode: a loss config (default: cross-entropy averaged over all pixels, as mmseg) or
            a list of them, summed; a loss config without ``ignore_index`` gets the head's.
        ignore_index: label value excluded from loss and accuracy.
        align_corners: ``align_corners`` of the bilinear resizes.
        with_conv_seg: build the 1x1 classifier (``conv_seg``); heads that classify otherwise
            turn it off.
    """

    config_key = "model.decode_head"

    @checked
    def __init__(
        self,
        in_channels: int | Sequence[int],
        channels: PositiveInt,
        num_classes: PositiveInt,
        in_index: int | Sequence[int] = -1,
        dropout_ratio: InRange(0, 1) = 0.1,
        loss_decode: OrNone(ListOf(object, single=(dict, nn.Module))) = None,
        ignore_index: int = 255,
        align_corners: bool = False,
        with_conv_seg: bool = True,
    ) -> None:
        super().__init__()
        where = self.config_path = config_key(default=self.config_key)  # for errors at run time too
        lists = isinstance(in_index, (list, tuple)), isinstance(in_channels, (list, tuple))
        if lists[0] != lists[1] or (all(lists) and len(in_index) != len(in_channels)):
            raise ConfigError(f"{where}: in_index and in_channels must both be single values or both lists of one "
                              f"length, got in_index={in_index!r}, in_channels={in_channels!r}")
        self.in_channels = list(in_channels) if isinstance(in_channels, (list, tuple)) else int(in_channels)
        self.in_index = list(in_index) if isinstance(in_index, (list, tuple)) else int(in_index)
        self.channels = int(channels)
        self.num_classes = num_classes
        self.ignore_index = int(ignore_index)
        self.align_corners = bool(align_corners)
        loss_cfgs = [dict(type="CrossEntropyLoss")] if loss_decode is None else list(loss_decode)
        self.loss_names = [_loss_name(c, i, len(loss_cfgs)) for i, c in enumerate(loss_cfgs)]
        self.loss_decode = nn.ModuleList()
        for i, c in enumerate(loss_cfgs):
            with building("loss_decode" if len(loss_cfgs) == 1 else f"loss_decode.{i}", root=where):
                self.loss_decode.append(MODELS.build(self._with_ignore_index(c)) if isinstance(c, dict) else c)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        if with_conv_seg:
            self.conv_seg = nn.Conv2d(self.channels, num_classes, kernel_size=1)
            nn.init.normal_(self.conv_seg.weight, std=0.01)
            nn.init.zeros_(self.conv_seg.bias)

    def _with_ignore_index(self, loss_cfg: dict) -> dict:
        """The loss config with the head's ``ignore_index`` when it gives none and the loss takes
        one (a loss config that sets its own keeps it)."""
        loss_cfg = dict(loss_cfg)
        if "ignore_index" not in loss_cfg:
            kind = loss_cfg.get("type")
            loss_cls = MODELS.get(kind) if isinstance(kind, str) else kind
            if isinstance(loss_cls, type) and "ignore_index" in inspect.signature(loss_cls).parameters:
                loss_cfg["ignore_index"] = self.ignore_index
        return loss_cfg

    def _select(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """The input map(s) named by ``in_index``."""
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        indices = self.in_index if isinstance(self.in_index, list) else [self.in_index]
        for i in indices:
            if not -len(inputs) <= i < len(inputs):
                raise ConfigError(
                    f"{self.config_path}.in_index {i} is out of range for {len(inputs)} "
                    "feature maps (check the backbone's out_indices)"
                )
        selected = [inputs[i] for i in indices]
        return selected if isinstance(self.in_index, list) else selected[0]

    def cls_seg(self, feat: torch.Tensor) -> torch.Tensor:
        """Dropout, then the 1x1 classifier."""
        return self.conv_seg(self.dropout(feat))

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def loss(self, inputs: Sequence[torch.Tensor], data_samples: Sequence[DataSample]) -> dict:
        """Losses (and ``acc_seg``, the pixel accuracy in percent) of a batch."""
        return self.loss_by_logits(self.forward(inputs), data_samples)

    def loss_by_logits(self, logits: torch.Tensor, data_samples: Sequence[DataSample]) -> dict:
        labels = stack_labels(data_samples).to(logits.device)
        logits = resize(logits, labels.shape[-2:], self.align_corners)
        losses = {}
        for name, loss in zip(self.loss_names, self.loss_decode):
            losses[name] = loss(logits.float(), labels)
        with torch.no_grad():
            valid = labels != self.ignore_index
            correct = (logits.argmax(1) == labels) & valid
            losses["acc_seg"] = correct.sum().float() * 100.0 / valid.sum().clamp(min=1).float()
        return losses
