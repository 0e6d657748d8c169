"""The example depth plugin (plugins/depth): loss and metrics against their formulas, data
round trip, and a shortened demo run that learns."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins" / "depth"))
import vitasks_depth  # noqa: E402  (registers the plugin's components)
from vitasks_depth import SILogLoss, depth_errors  # noqa: E402
from vitasks_depth.generate import write_dataset  # noqa: E402


def test_silog_loss_equals_the_formula():
    gen = torch.Generator().manual_seed(0)
    log_pred = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    gt = torch.rand(2, 5, 6, generator=gen, dtype=torch.float64) * 5 + 0.5
    gt[0, 0, :3] = 0  # invalid pixels do not count
    pairs = [(p, g) for p, g in zip(log_pred.flatten().tolist(), gt.flatten().tolist()) if g > 0]
    d = [p - math.log(g) for p, g in pairs]
    n = len(d)
    for lambd in (0.0, 0.5, 0.85):
        expected = sum(x * x for x in d) / n - lambd * (sum(d) / n) ** 2
        assert SILogLoss(lambd=lambd)(log_pred, gt).item() == pytest.approx(expected, rel=1e-12)
    # lambda 1: a global scale of the prediction costs nothing
    assert SILogLoss(lambd=1.0)(torch.log(gt.clamp(min=1e-9)) + 0.7, gt).item() == pytest.approx(0, abs=1e-12)


def test_depth_metric_equals_the_formulas():
    from vitasks_depth import DepthMetric

    rng = np.random.default_rng(0)
    gts = [rng.uniform(0.5, 8, (4, 5)), rng.uniform(0.5, 8, (4, 5))]
    preds = [g * rng.uniform(0.7, 1.4, g.shape) for g in gts]
    gts[1][0, :] = 0
    metric = DepthMetric()
    samples = [dict(pred_depth=dict(data=torch.tensor(p[None])), gt_depth=dict(data=torch.tensor(g[None])))
               for p, g in zip(preds, gts)]
    metric.process({}, samples)
    got = metric.compute_metrics(metric.results)
    pairs = [(p, g) for pr, gt in zip(preds, gts) for p, g in zip(pr.flat, gt.flat) if g > 0]
    n = len(pairs)
    assert got["abs_rel"] == pytest.approx(sum(abs(p - g) / g for p, g in pairs) / n)
    assert got["rmse"] == pytest.approx(math.sqrt(sum((p - g) ** 2 for p, g in pairs) / n))
    assert got["delta1"] == pytest.approx(sum(max(p / g, g / p) < 1.25 for p, g in pairs) / n)
    assert depth_errors(torch.ones(2, 2), torch.zeros(2, 2))[3] == 0


def test_generated_depth_reads_back_in_metres(tmp_path):
    from vitasks.registry import DATASETS

    write_dataset(str(tmp_path), size=32, train=3, val=1, seed=1)
    dataset = DATASETS.build(dict(type="DepthFolderDataset", data_root=str(tmp_path), split="train",
                                  pipeline=[dict(type="LoadImage"), dict(type="LoadDepth"),
                                            dict(type="PackDepthInputs")]))
    assert len(dataset) == 3
    item = dataset[0]
    depth = item["data_samples"].gt_depth.data
    assert item["inputs"].shape == (3, 32, 32) and depth.shape == (1, 32, 32)
    import cv2
    raw = cv2.imread(str(tmp_path / "depth" / "train" / "train_00000.png"), cv2.IMREAD_UNCHANGED)
    assert torch.equal(depth[0], torch.from_numpy(raw.astype(np.float32) / 1000.0))
    assert (depth > 0).float().mean() > 0.9 and depth.max() < 12


def test_demo_learns_shortened(tmp_path):
    """100 iterations on 32 px scenes: AbsRel falls well below predicting the mean depth."""
    from vitasks.engine import launch

    write_dataset(str(tmp_path / "data"), size=32, train=48, val=12, seed=0)
    opts = [f"data_root={tmp_path / 'data'}", "model.backbone.img_size=32",
            "train_cfg.max_iters=100", "train_cfg.val_interval=100",
            "default_hooks.checkpoint.interval=100", "param_scheduler.1.end=100", "log_level=WARNING"]
    config = str(REPO / "plugins" / "depth" / "configs" / "depth_synthetic.yaml")
    launch.train(config, work_dir=str(tmp_path / "wd"), cfg_options=opts)
    ckpt = (tmp_path / "wd" / "last_checkpoint").read_text().strip()
    metrics = launch.test(config, ckpt, work_dir=str(tmp_path / "wd"), cfg_options=opts)

    # baseline: the mean training depth everywhere
    import cv2
    def depths(split):
        folder = tmp_path / "data" / "depth" / split
        return [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) / 1000.0 for p in sorted(folder.iterdir())]
    train = np.concatenate([d[d > 0] for d in depths("train")])
    sums = [depth_errors(torch.full(d.shape, float(train.mean())), torch.tensor(d)) for d in depths("val")]
    baseline = sum(s[0] for s in sums) / sum(s[3] for s in sums)
    print("abs_rel", metrics["depth/abs_rel"], "mean-depth baseline", baseline, metrics)
    assert metrics["depth/abs_rel"] < 0.5 * baseline and metrics["depth/delta1"] > 0.5
