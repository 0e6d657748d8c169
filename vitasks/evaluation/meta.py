"""What metrics read from the dataset they evaluate (its metainfo, mmengine's ``dataset_meta``)."""

from typing import Any

from mmengine.evaluator import BaseMetric

from vitasks.errors import ConfigError

__all__ = ["from_dataset"]


def from_dataset(metric: BaseMetric, key: str, what: str, fix: str, given: Any = None) -> Any:
    """``given`` (the metric's own setting) when set, else ``key`` of the dataset's metainfo; when
    neither has it (or it is empty), a ConfigError naming the metric, ``what`` is missing and
    ``fix``."""
    value = given if given is not None else (metric.dataset_meta or {}).get(key)
    if value is None or (hasattr(value, "__len__") and not len(value)):
        raise ConfigError(f"{type(metric).__name__}: no {what} ({key}); {fix}")
    return value
