"""End to end: the segmentation demo config trains on generated data, learns, is evaluated and
dumps its predictions as PNG label maps in the dataset's own values."""

import json
import os

import cv2
import numpy as np
import pytest
import torch

from vitasks.data.synthetic.seg import make_seg_dataset
from vitasks.engine import launch  # not `import test`: pytest would collect it

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo", "seg_synthetic.yaml")


@pytest.fixture
def one_thread():
    """One intra-op thread: with two, OpenMP's spinning barriers make many small kernels 5-10x
    slower whenever another process competes for the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_seg_demo_learns_and_dumps(tmp_path, one_thread, in_process_loaders):
    data = make_seg_dataset(str(tmp_path / "data"), num_train=48, num_val=8, img_size=64, num_classes=5)
    work = str(tmp_path / "work")
    # A shortened schedule of the demo (40 iterations instead of 200), evaluated at the end.
    options = [
        f"data_root={data}",
        "train_cfg.max_iters=40",
        "train_cfg.val_interval=40",
        "param_scheduler.0.end=10",
        "param_scheduler.1.begin=10",
        "param_scheduler.1.end=40",
        "default_hooks.checkpoint.interval=40",
        *in_process_loaders,
    ]
    launch.train(CONFIG, work_dir=work, cfg_options=options)
    with open(os.path.join(work, "last_checkpoint")) as f:
        checkpoint = f.read().strip()
    dump = str(tmp_path / "dump")
    metrics = launch.test(CONFIG, checkpoint, work_dir=str(tmp_path / "test"), dump=dump, cfg_options=options)

    assert set(metrics) == {"aAcc", "mIoU", "mAcc"}
    with open(tmp_path / "test" / "metrics.json") as f:
        assert json.load(f) == metrics
    # Chance level for 5 classes is about 20% IoU; a learning model is far above it.
    assert metrics["mIoU"] > 50, metrics

    files = sorted(os.listdir(dump))
    assert files == sorted(n.replace(".jpg", ".png") for n in os.listdir(os.path.join(data, "images", "validation")))
    pred = cv2.imread(os.path.join(dump, files[0]), cv2.IMREAD_UNCHANGED)
    label = cv2.imread(os.path.join(data, "annotations", "validation", files[0]), cv2.IMREAD_UNCHANGED)
    assert pred.shape == label.shape and pred.dtype == np.uint8
    assert set(np.unique(pred)) <= {1, 2, 3, 4, 5}  # ADE-style values: class + 1
    shapes = label > 0
    assert (pred[shapes] == label[shapes]).mean() > 0.5
