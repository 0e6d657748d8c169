"""The example depth plugin (plugins/depth): loss and metrics against their formulas, data
round trip, the resize / crop transforms against hand computations, sizes the stride does not
divide through the model, and a shortened demo run that learns."""

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


def _nearest_by_hand(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize written out: output pixel i takes source pixel floor((i + 0.5) * in / out),
    the source pixel whose area contains the output pixel's centre."""
    out = np.zeros((height, width), array.dtype)
    for i in range(height):
        for j in range(width):
            out[i, j] = array[int((i + 0.5) * array.shape[0] / height), int((j + 0.5) * array.shape[1] / width)]
    return out


def _image_and_depth(height: int, width: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    depth = rng.uniform(0.5, 10.0, (height, width)).astype(np.float32)
    depth[rng.random((height, width)) < 0.2] = 0  # holes
    return image, depth


def test_depth_resize_keeps_ratio_and_moves_depth_nearest():
    from vitasks.registry import TRANSFORMS

    resize = TRANSFORMS.build(dict(type="DepthResize", scale=[320, 80]))
    # the keep-ratio rule by hand: factor min(320 / long, 80 / short), sizes rounded
    for (h, w), expected in {(480, 640): (80, 107), (375, 1242): (80, 265), (64, 64): (80, 80),
                             (100, 1000): (32, 320)}.items():
        image, depth = np.zeros((h, w, 3), np.uint8), np.ones((h, w), np.float32)
        out = resize(dict(img=image, gt_depth=depth))
        assert out["img"].shape[:2] == expected and out["gt_depth"].shape == expected, (h, w)
    image, depth = _image_and_depth(30, 45)
    out = TRANSFORMS.build(dict(type="DepthResize", scale=[90, 20]))(dict(img=image, gt_depth=depth.copy()))
    assert out["img"].shape == (20, 30, 3) and out["gt_depth"].dtype == np.float32
    np.testing.assert_array_equal(out["gt_depth"], _nearest_by_hand(depth, 20, 30))
    # so: holes stay 0 and every depth is one of the source's, none blended across an edge
    assert set(np.unique(out["gt_depth"])) <= set(np.unique(depth))
    assert (out["gt_depth"] == 0).any()
    import cv2
    np.testing.assert_array_equal(out["img"], cv2.resize(image, (30, 20), interpolation=cv2.INTER_LINEAR))


def test_random_resize_crop_cuts_the_same_window_of_image_and_depth():
    from vitasks.registry import TRANSFORMS

    # image channels encode each pixel's row and column; depth encodes them too
    height, width = 50, 70
    rows, cols = np.mgrid[0:height, 0:width]
    image = np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)
    depth = (rows * 100 + cols + 1).astype(np.float32)
    crop = TRANSFORMS.build(dict(type="DepthRandomResizeCrop", scale=[70, 50], ratio_range=[1.0, 1.0],
                                 crop_size=[16, 24]))
    windows = set()
    for seed in range(8):
        out = crop(dict(img=image.copy(), gt_depth=depth.copy(), rng=np.random.default_rng(seed)))
        img, d = out["img"], out["gt_depth"]
        assert img.shape == (16, 24, 3) and d.shape == (16, 24)
        np.testing.assert_array_equal(d, img[..., 0].astype(np.float32) * 100 + img[..., 1] + 1)
        # the window where the sample's generator puts it (mmseg's RandomCrop: y0 then x0)
        rng = np.random.default_rng(seed)
        rng.uniform(1.0, 1.0)  # the ratio draw
        y0, x0 = int(rng.integers(0, 50 - 16 + 1)), int(rng.integers(0, 70 - 24 + 1))
        assert (img[0, 0, 0], img[0, 0, 1]) == (y0, x0)
        windows.add((y0, x0))
    assert len(windows) > 4  # the place is random

    # with a random scale: depth = the nearest resize (sizes by the keep-ratio rule) then the window
    image, depth = _image_and_depth(30, 40, seed=1)
    crop = TRANSFORMS.build(dict(type="DepthRandomResizeCrop", scale=[40, 30], ratio_range=[0.5, 2.0],
                                 crop_size=[20, 20]))
    for seed in range(4):
        out = crop(dict(img=image.copy(), gt_depth=depth.copy(), rng=np.random.default_rng(seed)))
        rng = np.random.default_rng(seed)
        ratio = rng.uniform(0.5, 2.0)
        long_side, short_side = int(40 * ratio), int(30 * ratio)
        factor = min(long_side / 40, short_side / 30)
        h, w = int(30 * factor + 0.5), int(40 * factor + 0.5)
        y0, x0 = int(rng.integers(0, max(h - 20, 0) + 1)), int(rng.integers(0, max(w - 20, 0) + 1))
        expected = _nearest_by_hand(depth, h, w)[y0:y0 + 20, x0:x0 + 20]
        np.testing.assert_array_equal(out["gt_depth"], expected)
        assert out["img"].shape[:2] == expected.shape


def test_depth_transform_config_errors_name_the_transform():
    from vitasks.errors import ConfigError
    from vitasks.registry import TRANSFORMS

    with pytest.raises(ConfigError, match="DepthRandomResizeCrop.*ratio_range"):
        TRANSFORMS.build(dict(type="DepthRandomResizeCrop", ratio_range=[2.0, 1.0]))
    with pytest.raises(ConfigError, match="DepthRandomResizeCrop.*crop_size"):
        TRANSFORMS.build(dict(type="DepthRandomResizeCrop", crop_size=[0, 64]))


def test_depth_preprocessor_pads_depth_with_zero():
    from vitasks.registry import MODELS
    from vitasks.structures import DataSample, PixelData

    pre = MODELS.build(dict(type="DepthDataPreprocessor", mean=[0, 0, 0], std=[1, 1, 1], size_divisor=8))
    shapes = [(13, 21), (9, 30)]
    depths = [torch.rand(1, h, w) + 0.5 for h, w in shapes]
    samples = [DataSample(gt_depth=PixelData(data=d)) for d in depths]
    out = pre(dict(inputs=[torch.zeros(3, h, w, dtype=torch.uint8) for h, w in shapes], data_samples=samples),
              training=True)
    assert out["inputs"].shape == (2, 3, 16, 32)  # the largest sides, rounded up to 8
    for sample, d, (h, w) in zip(out["data_samples"], depths, shapes):
        padded = torch.zeros(1, 16, 32)
        padded[:, :h, :w] = d
        assert torch.equal(sample.gt_depth.data, padded)
    bad = [DataSample(gt_depth=PixelData(data=torch.ones(1, 5, 5)))]
    with pytest.raises(ValueError, match="depth map .* after the pipeline"):
        pre(dict(inputs=[torch.zeros(3, 6, 5, dtype=torch.uint8)], data_samples=bad), training=True)


def _tiny_demo_model():
    from vitasks.config import load_config
    from vitasks.registry import MODELS

    cfg = load_config(str(REPO / "plugins" / "depth" / "configs" / "depth_synthetic.yaml"))
    return cfg, MODELS.build(cfg.model)


def test_sizes_the_stride_does_not_divide_train_and_predict(tmp_path):
    """A KITTI-sized image (375 x 1242, not a multiple of the stride 8) through the demo's test
    pipeline and model: depth comes back at the original size and is scored there; a training batch
    of two odd sizes without a crop gives a finite loss."""
    import cv2
    from vitasks.registry import DATASETS

    cfg, model = _tiny_demo_model()
    model.eval()
    (tmp_path / "images" / "val").mkdir(parents=True)
    (tmp_path / "depth" / "val").mkdir(parents=True)
    image, depth = _image_and_depth(375, 1242)
    cv2.imwrite(str(tmp_path / "images" / "val" / "a.png"), image)
    cv2.imwrite(str(tmp_path / "depth" / "val" / "a.png"), np.round(depth * 1000).astype(np.uint16))
    dataset = DATASETS.build(dict(type="DepthFolderDataset", data_root=str(tmp_path), split="val",
                                  pipeline=cfg.test_pipeline))
    item = dataset[0]
    assert item["inputs"].shape == (3, 80, 265)  # resized to the demo's scale, depth kept as loaded
    assert item["data_samples"].gt_depth.data.shape == (1, 375, 1242)
    with torch.no_grad():
        data = model.data_preprocessor(dict(inputs=[item["inputs"]], data_samples=[item["data_samples"]]))
        (pred,) = model(data["inputs"], data["data_samples"], mode="predict")
    assert pred.pred_depth.data.shape == (1, 375, 1242) and (pred.pred_depth.data > 0).all()

    model.train()
    shapes = [(37, 61), (30, 45)]
    samples = []
    from vitasks.structures import DataSample, PixelData
    for h, w in shapes:
        samples.append(DataSample(gt_depth=PixelData(data=torch.rand(1, h, w) * 5 + 0.5)))
    data = model.data_preprocessor(dict(inputs=[torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
                                                for h, w in shapes], data_samples=samples), training=True)
    assert data["inputs"].shape[-2:] == (64, 64)  # the config's size [64, 64] (and a multiple of 8)
    losses = model(data["inputs"], data["data_samples"], mode="loss")
    assert all(torch.isfinite(v) for v in losses.values())


def test_demo_learns_shortened(tmp_path):
    """100 iterations on 32 px scenes (32 x 32 crops, tested at a short side of 32): AbsRel falls
    well below predicting the mean depth."""
    from vitasks.engine import launch

    write_dataset(str(tmp_path / "data"), size=32, train=48, val=12, seed=0)
    opts = [f"data_root={tmp_path / 'data'}", "model.backbone.img_size=32",
            "train_cfg.max_iters=100", "train_cfg.val_interval=100",
            "default_hooks.checkpoint.interval=100", "param_scheduler.1.end=100", "log_level=WARNING",
            "train_dataloader.dataset.pipeline.2.scale=[128,32]",
            "train_dataloader.dataset.pipeline.2.crop_size=[32,32]", "model.data_preprocessor.size=[32,32]",
            "val_dataloader.dataset.pipeline.1.scale=[128,32]", "test_dataloader.dataset.pipeline.1.scale=[128,32]"]
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
