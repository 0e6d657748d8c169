"""tools/cnn_baseline.py: the plain CNN / FCN yardstick of the demos."""

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vitasks.benchmarks import cnn_baseline as cb
from vitasks.data.synthetic.cls import make_cls_dataset
from vitasks.data.synthetic.seg import make_seg_dataset
from vitasks.data.synthetic.video import make_video_dataset
from vitasks.data.video_transforms import SampleFrames

REPO = Path(__file__).resolve().parents[2]
EPOCHS, WIDTH, MARGIN = 8, 4, 40.0


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


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
    return make_video_dataset(str(tmp_path_factory.mktemp("video")), seed=0, train_per_class=12, val_per_class=6,
                              size=32, num_frames=12, style="plain")


def test_video_clips_are_the_demos_clips():
    # Test clips as the demo's SampleFrames (test_mode, repeat_last); training starts in range.
    sampler = SampleFrames(clip_len=8, num_clips=3, test_mode=True, out_of_bound_opt="repeat_last")
    for total in (3, 8, 9, 12, 16, 31):
        ours = np.stack([cb.clip_indices(s, total, 8).numpy() for s in cb.test_clip_starts(total, 8, 3)])
        np.testing.assert_array_equal(ours, sampler.frame_indices(total, None))
    totals = torch.tensor([5, 8, 12] * 200)
    starts = cb.train_clip_starts(totals, 8, torch.Generator().manual_seed(0))
    assert starts[totals <= 8].eq(0).all()
    assert set(starts[totals == 12].tolist()) == {0, 1, 2, 3, 4}


def test_video_augmentation_is_the_same_on_every_frame():
    cfg = dataclasses.replace(cb.VIDEO_DEFAULTS, scale=(0.7, 1.3), translate=0.2, rotate=30.0)
    frame = torch.rand(2, 1, 3, 16, 16)
    static = frame.expand(2, 5, 3, 16, 16)  # a clip in which nothing moves ...
    out = cb.augment_clips(static, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, out[:, :1].expand_as(out))  # ... stays still
    assert not torch.allclose(out[:, 0], frame[:, 0], atol=1e-3)  # and was warped
    # A moving clip: every frame warped as the first frame's own grid_sample with the clip's grid.
    moving = torch.rand(1, 4, 3, 16, 16)
    grid = cb.random_affine_grid(1, 16, cfg, torch.Generator().manual_seed(1))
    want = torch.cat([torch.nn.functional.grid_sample(moving[:, t], grid, mode="bilinear",
                                                      padding_mode="reflection", align_corners=False)
                      for t in range(4)])
    torch.testing.assert_close(cb.augment_clips(moving, cfg, torch.Generator().manual_seed(1))[0], want)


def test_plain_cnn3d_shape():
    assert cb.PlainCNN3D(5, width=4)(torch.rand(2, 3, 8, 32, 32)).shape == (2, 5)


def test_video_baseline_learns_the_direction(video_root):
    _, y_val = cb.load_video_list(video_root, "val", 8)
    chance = 100.0 * torch.bincount(y_val).max().item() / len(y_val)  # 25 %
    cfg = dataclasses.replace(cb.VIDEO_DEFAULTS, img_size=32, epochs=EPOCHS, batch_size=8, width=WIDTH)
    scores = cb.train_video_baseline(video_root, cfg=cfg, log=lambda *_: None)
    assert scores["acc/top1"] >= chance + MARGIN, (scores, chance)


def test_video_command_writes_acc_top1(video_root, tmp_path):
    spec = importlib.util.spec_from_file_location("cnn_baseline_tool", REPO / "tools" / "cnn_baseline.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "scores.json"
    assert tool.main(["video", video_root, "--epochs", "1", "--width", "2", "--json", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert set(scores) == {"acc/top1", "seconds"} and 0 <= scores["acc/top1"] <= 100
    # A label past --num-classes is named.
    assert tool.main(["video", video_root, "--epochs", "1", "--width", "2", "--num-classes", "3"]) == 2
