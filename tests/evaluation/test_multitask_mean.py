"""The `mean` of a multi-task evaluation: every listed metric in percent, COCO's fractions too."""

import pytest

from vitasks.errors import ConfigError
from vitasks.evaluation.multitask import MEAN_KEY, MultiTaskEvaluator, in_percent


def _evaluator(mean_of):
    return MultiTaskEvaluator({}, build=lambda cfg: cfg, mean_of=mean_of)


def test_mean_counts_coco_fractions_in_percent():
    metrics = {"cls/accuracy/top1": 80.0, "seg/mIoU": 40.0, "det/coco/bbox_mAP_50": 0.3,
               "det/coco/segm_mAP": 0.1}
    out = _evaluator(["cls/accuracy/top1", "seg/mIoU", "det/coco/bbox_mAP_50"]).add_mean(metrics)
    assert out[MEAN_KEY] == pytest.approx((80.0 + 40.0 + 30.0) / 3)
    # The reported metrics themselves are left as they are (fractions stay fractions).
    assert out["det/coco/bbox_mAP_50"] == 0.3 and "mean" not in metrics


def test_in_percent_by_name():
    assert in_percent("det/coco/segm_mAP", 0.25) == pytest.approx(25.0)
    assert in_percent("vid/acc/top1", 61.0) == 61.0
    # A task may be named "coco": only the metric's own name after the prefix decides.
    assert in_percent("coco/mIoU", 40.0) == 40.0


def test_mean_names_the_missing_metric():
    with pytest.raises(ConfigError, match=r"seg/mIoU.*cls/accuracy/top1"):
        _evaluator(["seg/mIoU"]).add_mean({"cls/accuracy/top1": 50.0})


def test_no_mean_without_mean_of():
    assert _evaluator(None).add_mean({"cls/accuracy/top1": 50.0}) == {"cls/accuracy/top1": 50.0}
