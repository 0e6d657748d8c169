"""Segmentation label values and class ids: ``reduce_zero_label``, both ways, in one place.

A dataset stores *label values*; a model predicts *class ids*. With ``reduce_zero_label``
(ADE20K) value 0 means "other" and is ignored, and value ``v`` is class ``v - 1``; without it the
values are the class ids. Reading a label map turns values into ids (:func:`reduce_zero`, used by
:class:`~vitasks.data.seg_transforms.LoadSegAnnotations`); writing a prediction in the dataset's
own values (``tools/test.py --dump`` PNGs, the label map of ``vitasks infer``) turns ids back into
values (:func:`encode_label_map`).

Which of the two applies to a sample is decided once, by :func:`sample_reduce_zero_label`: the
sample's own ``reduce_zero_label`` (its dataset puts it in every sample, and it says how that
sample's labels were read), else the configured value, which :func:`configured_reduce_zero_label`
reads from a config's test dataset.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from vitasks.data.dataset_cfg import test_dataset_cfg
from vitasks.registry import DATASETS

__all__ = [
    "configured_reduce_zero_label",
    "encode_label_map",
    "reduce_zero",
    "sample_reduce_zero_label",
]


def reduce_zero(label: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Label values -> class ids: 0 ("other") -> ``ignore_index``, ``v`` -> ``v - 1``;
    ``ignore_index`` itself stays."""
    out = label.astype(np.int64) - 1
    out[label == 0] = ignore_index
    out[label == ignore_index] = ignore_index
    return out


def encode_label_map(pred: torch.Tensor | np.ndarray, reduce_zero_label: bool) -> np.ndarray:
    """Class ids ``(H, W)`` -> the dataset's label values, ready for a PNG (the inverse of
    :func:`reduce_zero` on the classes).

    With ``reduce_zero_label`` (ADE20K) class ``c`` is written as ``c + 1`` (0 stays "other").
    The result is uint8, or uint16 when a value exceeds 255 (a 16-bit PNG).
    """
    values = torch.as_tensor(pred).cpu().numpy().astype(np.int64)
    if reduce_zero_label:
        values = values + 1
    dtype = np.uint8 if values.max(initial=0) <= 255 else np.uint16
    return values.astype(dtype)


def sample_reduce_zero_label(sample: Any, default: bool | None) -> bool:
    """Whether ``sample``'s labels are reduced: its own ``reduce_zero_label`` (a dict or a data
    sample's metainfo), else ``default`` (the configured value), else ``False``."""
    if isinstance(sample, Mapping):
        value = sample.get("reduce_zero_label")
    else:
        value = getattr(sample, "reduce_zero_label", None)
    if value is None:
        value = default
    return bool(value)


def configured_reduce_zero_label(cfg: Mapping) -> bool | None:
    """``reduce_zero_label`` of a config's test dataset: the value it sets, else the dataset
    class's default (ADE20KDataset: true), else ``None`` (not known)."""
    dataset = test_dataset_cfg(cfg) or {}
    if dataset.get("reduce_zero_label") is not None:
        return bool(dataset["reduce_zero_label"])
    kind = dataset.get("type")
    cls = DATASETS.get(kind) if isinstance(kind, str) else kind
    if isinstance(cls, type):
        param = inspect.signature(cls).parameters.get("reduce_zero_label")
        if param is not None and param.default is not inspect.Parameter.empty:
            return bool(param.default)
    return None
