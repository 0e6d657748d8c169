"""tools/cnn_baseline.py: the plain CNN / FCN yardstick of the demos."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vitasks.benchmarks import cnn_baseline as cb
from vitasks.data.synthetic.cls import make_cls_dataset
from vitasks.data.synthetic.seg import make_seg_dataset

REPO = Path(__file__).resolve().parents[2]


def test_segmentation_scores_match_a_per_class_count():
    rng = np.random.default_rng(0)
    k = 4
    gt = rng.integers(0, k - 1, 500)  # class 3 never occurs in the ground truth ...
    pred = np.where(rng.random(500) < 0.7, gt, rng.integers(0, k - 1, 500))
    pred[:5] = 3  # ... but is predicted five times: IoU 0, counted; mAcc leaves it out
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (gt, pred), 1)
    ious = [((gt == c) & (pred == c)).sum() / ((gt == c) | (pred == c)).sum() for c in range(k)]
    accs = [((gt == c) & (pred == c)).sum() / (gt == c).sum() for c in range(k - 1)]
    scores = cb.segmentation_scores(confusion)
    assert scores["mIoU"] == pytest.approx(round(100 * np.mean(ious), 2))
    assert scores["mAcc"] == pytest.approx(round(100 * np.mean(accs), 2))
    assert scores["aAcc"] == pytest.approx(round(100 * (gt == pred).mean(), 2))


def test_affine_grid_without_change_is_the_identity():
    cfg = dataclasses.replace(cb.CLS_DEFAULTS, scale=(1.0, 1.0), translate=0.0, rotate=0.0)
    grid = cb.random_affine_grid(2, 8, cfg, torch.Generator().manual_seed(0))
    x = torch.rand(2, 3, 8, 8)
    out = torch.nn.functional.grid_sample(x, grid, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, x)


def test_networks_shapes():
    assert cb.PlainCNN(7, width=4)(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    assert cb.PlainFCN(5, width=4)(torch.rand(2, 3, 24, 24)).shape == (2, 5, 24, 24)


def test_cls_and_seg_baselines_learn_plain_shapes(tmp_path):
    root, _ = make_cls_dataset(str(tmp_path / "cls"), num_classes=2, train_per_class=24, val_per_class=10,
                               size=32, seed=0, style="plain")
    cfg = dataclasses.replace(cb.CLS_DEFAULTS, img_size=32, epochs=10, batch_size=8, width=8)
    scores = cb.train_cls_baseline(root, cfg, log=lambda *_: None)
    assert scores["accuracy/top1"] >= 75.0, scores  # chance 50 %
    seg_root = make_seg_dataset(str(tmp_path / "seg"), num_train=16, num_val=4, img_size=32, num_classes=3,
                                style="plain")
    cfg = dataclasses.replace(cb.SEG_DEFAULTS, img_size=32, epochs=6, batch_size=8, width=8)
    scores = cb.train_seg_baseline(seg_root, cb.count_classes(seg_root, default=11), cfg, log=lambda *_: None)
    assert set(scores) == {"aAcc", "mIoU", "mAcc", "seconds"} and 0 <= scores["mIoU"] <= 100
    # More than the background everywhere (the background's share of the labelled pixels).
    assert scores["aAcc"] > 0, scores


def test_command_names_a_missing_folder(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "tools" / "cnn_baseline.py"), "cls", str(tmp_path / "none")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "none" in out.stderr and "ImageNet layout" in out.stderr
