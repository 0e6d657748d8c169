"""Evaluating a multi-task model: each task's metrics on its own data, names prefixed by the task.

``val_evaluator: {tasks: {cls: {type: Accuracy, topk: [1, 5]}, seg: {type: IoUMetric}}}`` gives
``cls/accuracy/top1``, ``cls/accuracy/top5``, ``seg/aAcc``, ``seg/mIoU``, ``seg/mAcc``; with
``mean_of: [cls/accuracy/top1, seg/mIoU]`` also ``mean``, their average (what ``save_best: mean``
picks the best checkpoint by). The average is taken in percent: COCO's AP and AR, which
pycocotools reports as fractions (``det/coco/bbox_mAP_50: 0.412``), count as 41.2, so that every
task weighs alike.
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Sequence

from mmengine.evaluator import Evaluator

from vitasks.checks import building
from vitasks.errors import ConfigError

__all__ = ["MultiTaskEvaluator", "prefixed", "in_percent", "MEAN_KEY"]

#: Name of the average of the ``mean_of`` metrics.
MEAN_KEY = "mean"

#: Metric families reported as fractions (0-1), by their name after the task prefix: COCO's
#: (pycocotools' convention, kept in metrics.json); the mean counts them in percent.
FRACTION_PREFIXES = ("coco/",)


def in_percent(name: str, value: float) -> float:
    """``value`` of the prefixed metric ``name`` in percent (fractions times 100)."""
    unprefixed = name.split("/", 1)[1] if "/" in name else name
    return float(value) * 100.0 if unprefixed.startswith(FRACTION_PREFIXES) else float(value)


def prefixed(task: str, metrics: Mapping[str, float]) -> Dict[str, float]:
    """``{"<task>/<name>": value}``."""
    return {f"{task}/{name}": value for name, value in metrics.items()}


class MultiTaskEvaluator:
    """One mmengine ``Evaluator`` per task; :meth:`evaluate` merges their prefixed metrics.

    Args:
        evaluators: ``{task: evaluator config or Evaluator}``.
        build: how a config becomes an ``Evaluator`` (the Runner's ``build_evaluator``).
        mean_of: prefixed metric names whose average is reported as ``mean``.
        where: the config key, for error messages (``val_evaluator``).
    """

    def __init__(self, evaluators: Mapping[str, object], build: Callable[[object], Evaluator],
                 mean_of: Optional[Sequence[str]] = None, where: str = "val_evaluator") -> None:
        self.where = where
        self.evaluators: Dict[str, Evaluator] = {}
        for name, cfg in evaluators.items():
            with building(where, "tasks", name):  # errors name `<where>.tasks.<name>`
                self.evaluators[name] = cfg if isinstance(cfg, Evaluator) else build(cfg)
        if isinstance(mean_of, str):
            mean_of = [mean_of]
        self.mean_of = list(mean_of or [])

    def evaluate(self, task: str, size: int) -> Dict[str, float]:
        """Task ``task``'s metrics over its ``size`` samples, prefixed."""
        return prefixed(task, self.evaluators[task].evaluate(size))

    def add_mean(self, metrics: Dict[str, float]) -> Dict[str, float]:
        """``metrics`` with ``mean`` added (when ``mean_of`` is set): the average of those
        metrics in percent (:func:`in_percent`); a name that no task reported is an error naming
        the ones that were."""
        if not self.mean_of:
            return metrics
        missing = [k for k in self.mean_of if k not in metrics]
        if missing:
            raise ConfigError(f"{self.where}.mean_of names {missing}, which no task reported; the metrics are "
                              f"{sorted(metrics)}")
        metrics = dict(metrics)
        metrics[MEAN_KEY] = sum(in_percent(k, metrics[k]) for k in self.mean_of) / len(self.mean_of)
        return metrics
