"""The classification demo end to end: generate data, train through the runtime, evaluate with
--dump, and check the reported accuracy against an independent count of the dumped predictions."""

import json
import os
from pathlib import Path

import pytest

from vitasks.data.synthetic.cls import make_cls_dataset
from vitasks.engine import launch

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo" / "cls_synthetic.yaml"
# Seeds 0 / 1 / 2 scored 63.0 / 47.5 / 56.0 % (the bar is chance + 10 = 35 %). 14 epochs were
# enough before the demo inverted half its images (60.0 / 49.5 / 58.5), not after (54.0 / 33.5 /
# 49.0): learning both polarities starts slower.
EPOCHS = 20
VAL_PER_CLASS = 50  # 200 validation images: 20 per class moved the score by 10 points between seeds
NUM_CLASSES = 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory, in_process_loaders):
    root = tmp_path_factory.mktemp("cls_demo")
    data_root = root / "data"
    # Four generated shape classes at the demo's 64 px, drawn light or dark over crops of a
    # photograph ("photo" style): the demo must learn objects on real backgrounds.
    make_cls_dataset(str(data_root), num_classes=NUM_CLASSES, train_per_class=80, val_per_class=VAL_PER_CLASS,
                     size=64, seed=0, style="photo")
    work_dir = root / "work"
    options = [
        f"data_root={data_root}",
        f"num_classes={NUM_CLASSES}",
        "train_dataloader.batch_size=16",
        f"train_cfg.max_epochs={EPOCHS}",
        f"train_cfg.val_interval={EPOCHS}",
        "param_scheduler.0.end=1",
        "param_scheduler.1.begin=1",
        f"param_scheduler.1.end={EPOCHS}",
        f"param_scheduler.1.T_max={EPOCHS - 1}",
        f"default_hooks.checkpoint.interval={EPOCHS}",
        "val_evaluator.topk=[1]",
        "test_evaluator.topk=[1]",
        *in_process_loaders,
    ]
    launch.train(str(DEMO_CONFIG), work_dir=str(work_dir), cfg_options=options)
    return root, data_root, work_dir, options


def test_demo_learns_and_dump_matches_metrics(trained):
    root, data_root, work_dir, options = trained
    checkpoint = (work_dir / "last_checkpoint").read_text().strip()
    assert os.path.isfile(checkpoint)
    dump = root / "preds.jsonl"
    test_dir = root / "test"
    metrics = launch.test(str(DEMO_CONFIG), checkpoint, work_dir=str(test_dir), dump=str(dump),
                          cfg_options=options)

    # metrics.json holds exactly what test returned, flat {name: number}.
    on_disk = json.loads((test_dir / "metrics.json").read_text())
    assert on_disk["accuracy/top1"] == pytest.approx(metrics["accuracy/top1"])

    # Independent count: the true class is the folder name in the dumped file path.
    classes = sorted(p.name for p in (data_root / "val").iterdir() if p.is_dir())
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    num_val = sum(1 for _ in (data_root / "val").rglob("*.png"))
    assert len(lines) == num_val
    correct = sum(classes.index(Path(rec["file"]).parent.name) == rec["pred"] for rec in lines)
    assert metrics["accuracy/top1"] == pytest.approx(100.0 * correct / len(lines), abs=1e-6)

    # Well above chance on held-out images: chance is the most frequent class's share of the
    # validation set (what always answering that class scores); ask for 10 points above it, as the
    # multi-task e2e test does. Measured with 4 classes (chance 25 %), the demo's recipe and 50
    # validation images per class: 63.0 / 47.5 / 56.0 % (randomness.seed 0 / 1 / 2, 20 epochs).
    # Session 9, 14 epochs, 20 per class: 56.25 / 45.0 / 55.0: a small validation set and the seed each
    # move the score by several points (another CPU's rounding acts as another seed); validation is
    # cheap, training is what the test pays for.
    counts = [sum(1 for _ in (data_root / "val" / c).iterdir()) for c in classes]
    chance = 100.0 * max(counts) / sum(counts)
    assert metrics["accuracy/top1"] >= chance + 10.0, (metrics, chance)
