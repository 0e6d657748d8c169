"""VideoAccuracy against brute-force counting; the video dumper and --dump wiring."""

import json
import os

import pytest
import torch
from mmengine.config import Config

import vitasks.evaluation  # noqa: F401  (registers)
from vitasks.engine.launch import _add_dump
from vitasks.errors import ConfigError
from vitasks.evaluation.video import VideoAccuracy, VideoPredictionDumper
from vitasks.registry import METRICS
from vitasks.structures import DataSample


def make_samples(scores, labels, files=None):
    samples = []
    for i, (score, label) in enumerate(zip(scores, labels)):
        s = DataSample(metainfo={"filename": files[i]} if files else {})
        s.pred_score = score
        s.pred_label = score.argmax().reshape(1)
        s.gt_label = torch.tensor([int(label)])
        samples.append(s.to_dict())
    return samples


def brute_force(scores, labels, num_classes):
    """Percentages by plain loops: top-k by sorting each row in Python; mean class accuracy
    over the classes that have videos."""
    top1 = top5 = 0
    hits, counts = [0] * num_classes, [0] * num_classes
    for row, label in zip(scores.tolist(), labels.tolist()):
        ranked = sorted(range(num_classes), key=lambda c: -row[c])
        top1 += ranked[0] == label
        top5 += label in ranked[:5]
        counts[label] += 1
        hits[label] += ranked[0] == label
    n = len(labels)
    per_class = [h / c for h, c in zip(hits, counts) if c]
    return {"acc/top1": 100.0 * top1 / n, "acc/top5": 100.0 * top5 / n,
            "acc/mean1": 100.0 * sum(per_class) / len(per_class)}


@pytest.mark.parametrize("num_classes, n", [(10, 37), (7, 50), (3, 11)])
def test_metric_equals_brute_force(num_classes, n):
    g = torch.Generator().manual_seed(num_classes)
    # The last class never occurs (left out of the mean class accuracy).
    labels = torch.randint(0, num_classes - 1, (n,), generator=g)
    scores = torch.rand(n, num_classes, generator=g)
    scores[torch.arange(n)[: n // 2], labels[: n // 2]] += 0.5  # half of them likely right
    metric = METRICS.build(dict(type="VideoAccuracy"))
    metric.process({}, make_samples(scores, labels))
    result = metric.evaluate(n)
    expected = brute_force(scores, labels, num_classes)
    assert set(result) == set(expected)
    for key in expected:
        assert result[key] == pytest.approx(expected[key], abs=1e-9), key


def test_mean_class_accuracy_differs_from_top1_on_imbalance():
    # Class 0: 8 videos, all right; class 1: 2 videos, none right -> top1 80, mean1 50.
    labels = torch.tensor([0] * 8 + [1] * 2)
    scores = torch.tensor([[1.0, 0.0]] * 10)
    metric = VideoAccuracy(topk=(1,))
    metric.process({}, make_samples(scores, labels))
    assert metric.evaluate(10) == {"acc/top1": 80.0, "acc/mean1": 50.0}


def test_tied_scores_count_alike_in_top1_and_mean1():
    # An untrained model scores every class alike: whichever class is taken as the top one, the
    # two metrics must agree on it (top1 > 0 exactly when that class occurs).
    labels = torch.tensor([0, 0, 1])
    scores = torch.full((3, 4), 0.25)
    metric = VideoAccuracy(topk=(1,))
    metric.process({}, make_samples(scores, labels))
    result = metric.evaluate(3)
    top = int(scores.topk(1, dim=1).indices[0, 0])
    assert result == {"acc/top1": pytest.approx(100.0 * int((labels == top).sum()) / 3),
                      "acc/mean1": 50.0 if top in (0, 1) else 0.0}


def test_metric_arguments_and_inputs():
    with pytest.raises(ConfigError, match="topk"):
        VideoAccuracy(topk=(0,))
    metric = VideoAccuracy()
    with pytest.raises(ValueError, match="pred_score"):
        metric.process({}, [{"gt_label": torch.tensor([0])}])
    metric.process({}, make_samples(torch.rand(2, 3), torch.tensor([0, 5])))
    with pytest.raises(ValueError, match="num_classes"):
        metric.evaluate(2)


def test_video_dumper_writes_json_lines_relative_to_the_data_root(tmp_path):
    out = tmp_path / "dump" / "preds.jsonl"
    root = str(tmp_path / "k400")
    files = [os.path.join(root, "val", "a.mp4"), "/elsewhere/b.mp4"]
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1]])
    dumper = METRICS.build(dict(type="VideoPredictionDumper", out_path=str(out)))
    assert isinstance(dumper, VideoPredictionDumper)
    dumper.dataset_meta = {"data_root": root}
    dumper.process({}, make_samples(scores, [1, 2], files))
    assert dumper.evaluate(2) == {}
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["file"], r["pred"]) for r in lines] == [("val/a.mp4", 1), ("/elsewhere/b.mp4", 0)]
    assert lines[0]["scores"] == pytest.approx([0.1, 0.7, 0.2])


def test_dump_option_appends_the_video_dumper(tmp_path):
    cfg = Config(dict(test_evaluator=dict(type="VideoAccuracy"), test_dump=dict(type="VideoPredictionDumper")))
    cfg.filename = "video.yaml"
    _add_dump(cfg, str(tmp_path / "p.jsonl"))
    assert [m["type"] for m in cfg.test_evaluator] == ["VideoAccuracy", "VideoPredictionDumper"]
    assert cfg.test_evaluator[1]["out_path"] == str(tmp_path / "p.jsonl")
