"""Accuracy against an independent top-k count; ClsPredictionDumper's JSON lines."""

import json
import os

import numpy as np
import pytest
import torch
from mmengine.evaluator import Evaluator

import vitasks.evaluation  # noqa: F401
from vitasks.errors import ConfigError
from vitasks.evaluation.accuracy import Accuracy
from vitasks.evaluation.dump import ClsPredictionDumper
from vitasks.registry import METRICS
from vitasks.structures import DataSample


def make_samples(scores, labels, paths=None):
    samples = []
    for i, (s, y) in enumerate(zip(scores, labels)):
        d = DataSample(metainfo={"img_path": paths[i]} if paths else {})
        d.pred_score = torch.as_tensor(s, dtype=torch.float32)
        d.pred_label = torch.tensor([int(np.argmax(s))])
        d.gt_label = torch.tensor([int(y)])
        samples.append(d)
    return samples


def independent_topk(scores, labels, k):
    hits = 0
    for s, y in zip(scores, labels):
        order = sorted(range(len(s)), key=lambda j: -s[j])
        hits += y in order[:k]
    return 100.0 * hits / len(labels)


def test_accuracy_matches_independent_count():
    rng = np.random.default_rng(0)
    scores = rng.random((37, 8)).tolist()  # distinct values: no ties
    labels = rng.integers(0, 8, 37).tolist()
    evaluator = Evaluator([METRICS.build(dict(type="Accuracy", topk=[1, 5]))])
    samples = make_samples(scores, labels)
    # Two batches, as a loop would give them.
    evaluator.process(data_samples=samples[:20])
    evaluator.process(data_samples=samples[20:])
    metrics = evaluator.evaluate(37)
    assert set(metrics) == {"accuracy/top1", "accuracy/top5"}
    assert metrics["accuracy/top1"] == pytest.approx(independent_topk(scores, labels, 1))
    assert metrics["accuracy/top5"] == pytest.approx(independent_topk(scores, labels, 5))


def test_accuracy_known_values_and_few_classes():
    scores = [[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]]
    labels = [1, 1, 0, 0]  # top1 hits: 0 and 3; top2 hits: 0, 1, 3
    metric = Accuracy(topk=(1, 2, 5))
    metric.process(None, [s.to_dict() for s in make_samples(scores, labels)])
    out = metric.evaluate(4)
    assert out == {"accuracy/top1": 50.0, "accuracy/top2": 75.0, "accuracy/top5": 100.0}
    assert Accuracy(prefix="cls").prefix == "cls"
    with pytest.raises(ConfigError, match="topk"):
        Accuracy(topk=[0])


def test_dumper_writes_json_lines(tmp_path):
    root = str(tmp_path / "data")
    paths = [os.path.join(root, "val", "cat", "a.png"), os.path.join(root, "val", "dog", "b.png"),
             "/elsewhere/c.png"]
    scores = [[0.2, 0.8], [0.9, 0.1], [0.4, 0.6]]
    out_path = str(tmp_path / "out" / "preds.jsonl")
    dumper = METRICS.build(dict(type="ClsPredictionDumper", out_path=out_path))
    evaluator = Evaluator([Accuracy(topk=[1]), dumper])
    evaluator.dataset_meta = {"classes": ("cat", "dog"), "data_root": root}
    evaluator.process(data_samples=make_samples(scores, [1, 0, 0], paths))
    metrics = evaluator.evaluate(3)
    assert metrics == {"accuracy/top1": pytest.approx(200 / 3)}  # the dumper adds no numbers
    lines = [json.loads(line) for line in open(out_path)]
    assert lines == [
        {"file": "val/cat/a.png", "pred": 1, "scores": pytest.approx([0.2, 0.8])},
        {"file": "val/dog/b.png", "pred": 0, "scores": pytest.approx([0.9, 0.1])},
        {"file": "/elsewhere/c.png", "pred": 1, "scores": pytest.approx([0.4, 0.6])},
    ]


def test_dumper_needs_out_path():
    with pytest.raises(ConfigError, match="out_path"):
        ClsPredictionDumper()
