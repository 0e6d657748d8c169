"""The classification demo end to end: generate data, train through the runtime, evaluate with
--dump, and check the reported accuracy against an independent count of the dumped predictions."""

import json
import os
from pathlib import Path

import pytest

from vitasks.data.synthetic import make_synthetic
from vitasks.engine import launch

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo" / "cls_synthetic.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, in_process_loaders):
    root = tmp_path_factory.mktemp("cls_demo")
    data_root = root / "data"
    make_synthetic("cls", str(data_root), seed=0)
    work_dir = root / "work"
    # The demo recipe, shortened so the suite stays quick: 6 epochs, one validation at the end.
    options = [
        f"data_root={data_root}",
        "train_cfg.max_epochs=6",
        "train_cfg.val_interval=6",
        "param_scheduler.1.T_max=5",
        "param_scheduler.1.end=6",
        "default_hooks.checkpoint.interval=6",
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
    assert set(on_disk) >= {"accuracy/top1", "accuracy/top5"}

    # Independent count: the true class is the folder name in the dumped file path.
    classes = sorted(p.name for p in (data_root / "val").iterdir() if p.is_dir())
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    num_val = sum(1 for _ in (data_root / "val").rglob("*.png"))
    assert len(lines) == num_val
    correct = sum(classes.index(Path(rec["file"]).parent.name) == rec["pred"] for rec in lines)
    assert metrics["accuracy/top1"] == pytest.approx(100.0 * correct / len(lines), abs=1e-6)

    # Well above chance (1/6 = 16.7%).
    assert metrics["accuracy/top1"] > 40.0, metrics
