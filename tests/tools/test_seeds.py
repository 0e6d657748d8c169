"""tools/seeds.py: one recipe over several seeds, the plain CNN beside it, mean / min / max."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vitasks.benchmarks import seeds as sd

REPO = Path(__file__).resolve().parents[2]
TOOLS = str(REPO / "tools")


def _cells(table: str):
    """``{first cell: [the other cells]}`` of a Markdown table's body rows."""
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_summary_and_table_against_hand_computed_values():
    rows = [
        {"accuracy/top1": 74.5, "baseline accuracy/top1": 63.5},
        {"accuracy/top1": 62.0, "baseline accuracy/top1": 66.5},
        {"accuracy/top1": 70.25, "baseline accuracy/top1": None},  # its baseline gave NaN
    ]
    columns = ["accuracy/top1", "baseline accuracy/top1"]
    summary = sd.summarize(rows, columns)
    assert summary["mean"]["accuracy/top1"] == pytest.approx((74.5 + 62.0 + 70.25) / 3)  # 68.91666
    assert summary["min"]["accuracy/top1"] == 62.0 and summary["max"]["accuracy/top1"] == 74.5
    assert summary["mean"]["baseline accuracy/top1"] == pytest.approx(65.0)  # the two numbers only
    assert summary["min"]["baseline accuracy/top1"] == 63.5
    assert summary["max"]["baseline accuracy/top1"] == 66.5

    table = sd.markdown_table(rows, ["0", "1", "2"], columns, summary)
    lines = table.splitlines()
    assert lines[0] == "| seed | accuracy/top1 | baseline accuracy/top1 |"
    assert lines[1] == "| --- | --- | --- |"
    assert _cells(table) == {
        "0": ["74.5", "63.5"], "1": ["62", "66.5"], "2": ["70.25", "n/a"],
        "mean": ["68.92", "65"], "min": ["62", "63.5"], "max": ["74.5", "66.5"],
    }
    # A failed seed: its note in a last column, the summary over the others.
    noted = sd.markdown_table(rows[:1] + [{}], ["0", "1"], columns[:1], sd.summarize(rows[:1], columns[:1]),
                              notes={"1": "train exited with 1, see D/seed1/train.log"})
    assert _cells(noted)["1"] == ["n/a", "train exited with 1, see D/seed1/train.log"]
    assert _cells(noted)["mean"] == ["74.5", ""]


def test_summary_of_fractions_keeps_digits():
    rows = [{"coco/bbox_mAP_50": 0.4161}, {"coco/bbox_mAP_50": 0.5739}]
    summary = sd.summarize(rows, ["coco/bbox_mAP_50"])
    assert summary["mean"]["coco/bbox_mAP_50"] == pytest.approx(0.495)
    assert _cells(sd.markdown_table(rows, ["0", "1"], ["coco/bbox_mAP_50"], summary))["mean"] == ["0.495"]


def test_main_metrics_per_task():
    assert sd.main_metric_names({"accuracy/top1": 1, "accuracy/top5": 2}) == ["accuracy/top1"]
    assert sd.main_metric_names({"aAcc": 1, "mIoU": 2, "mAcc": 3}) == ["mIoU"]
    det = {f"coco/{kind}_mAP{s}": 0.1 for kind in ("bbox", "segm") for s in ("", "_50", "_75")}
    assert sd.main_metric_names(det) == ["coco/bbox_mAP_50"]
    assert sd.main_metric_names({"acc/top1": 1, "acc/top5": 2, "acc/mean1": 3}) == ["acc/top1"]
    multi = {"cls/accuracy/top1": 1, "cls/accuracy/top5": 1, "seg/aAcc": 1, "seg/mIoU": 2,
             "det/coco/bbox_mAP": 0.1, "det/coco/bbox_mAP_50": 0.2, "mean": 3}
    assert sd.main_metric_names(multi) == ["cls/accuracy/top1", "seg/mIoU", "det/coco/bbox_mAP_50", "mean"]


def test_commands_for_a_seed(tmp_path):
    work = str(tmp_path / "w")
    assert sd.train_command("/t", "c.yaml", work, "data/x", 7, 3, ["train_cfg.max_epochs=2"]) == [
        sys.executable, "/t/train.py", "c.yaml", "--work-dir", f"{work}/seed3",
        "--cfg-options", "data_root=data/x", "num_classes=7", "randomness.seed=3", "train_cfg.max_epochs=2",
    ]
    assert sd.test_command("/t", "c.yaml", "ck.pth", work, "data/x", 7, 3, ["a=1"]) == [
        sys.executable, "/t/test.py", "c.yaml", "ck.pth", "--work-dir", f"{work}/seed3/test",
        "--cfg-options", "data_root=data/x", "num_classes=7", "randomness.seed=3", "a=1",
    ]
    assert sd.baseline_command("/t", "cls", "data/x", 3, "b.json", 7) == [
        sys.executable, "/t/cnn_baseline.py", "cls", "data/x", "--seed", "3", "--json", "b.json"]
    assert sd.baseline_command("/t", "seg", "data/x", 3, "b.json", 7, epochs=2) == [
        sys.executable, "/t/cnn_baseline.py", "seg", "data/x", "--seed", "3", "--json", "b.json",
        "--num-classes", "7", "--epochs", "2"]
    assert sd.baseline_command("/t", "video", "data/v", 1, "b.json", 4) == [
        sys.executable, "/t/cnn_baseline.py", "video", "data/v", "--seed", "1", "--json", "b.json",
        "--num-classes", "4"]
    assert sd.threads_per_job(2, {"OMP_NUM_THREADS": "3"}) is None
    assert int(sd.threads_per_job(10 ** 6, {})) == 1


# A classifier small enough that a training process is mostly its start-up.
TINY_CONFIG = """
_base_:
  - {repo}/configs/_base_/runtime/default.yaml
  - {repo}/configs/_base_/models/vit_base_p16.yaml
  - {repo}/configs/_base_/datasets/imagenet.yaml
img_size: 16
model:
  backbone: {{patch_size: 8, embed_dim: 8, depth: 1, num_heads: 1, mlp_ratio: 1.0}}
  head: {{in_channels: 8}}
train_dataloader:
  batch_size: 8
  num_workers: 0
  persistent_workers: false
  pin_memory: false
  dataset:
    pipeline:
      - {{type: LoadImage}}
      - {{type: ResizeCenterCrop, size: "${{img_size}}", crop_ratio: 1.0}}
      - {{type: Albu, transforms: [{{type: HorizontalFlip, p: 0.5}}]}}
      - {{type: PackInputs}}
val_dataloader: {{batch_size: 8, num_workers: 0, persistent_workers: false, pin_memory: false}}
test_dataloader: {{batch_size: 8, num_workers: 0, persistent_workers: false, pin_memory: false}}
val_evaluator: {{type: Accuracy, topk: [1]}}
test_evaluator: {{type: Accuracy, topk: [1]}}
optim_wrapper:
  optimizer: {{type: AdamW, lr: 1.0e-2}}
param_scheduler: []
train_cfg: {{by_epoch: true, max_epochs: 1, val_interval: 1}}
val_cfg: {{}}
test_cfg: {{}}
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from vitasks.data.synthetic.cls import make_cls_dataset

    root = tmp_path_factory.mktemp("seeds")
    data, _ = make_cls_dataset(str(root / "data"), num_classes=3, train_per_class=6, val_per_class=5,
                               size=16, seed=0, style="plain")
    config = root / "tiny.yaml"
    config.write_text(TINY_CONFIG.format(repo=REPO))
    return root, data, config


def test_two_seeds_end_to_end(tiny):
    root, data, config = tiny
    work, out = root / "work", root / "seeds.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "seeds.py"), str(config), "--data", data, "--num-classes", "3",
         "--seeds", "0", "1", "--jobs", "1", "--work-dir", str(work), "--json", str(out),
         "--cfg-options", "optim_wrapper.optimizer.lr=0.02"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "seed 1 test: done" in proc.stderr

    # Each run's own metrics.json, read here; the runs saw their seed and the extra option.
    on_disk = {s: json.loads((work / f"seed{s}" / "test" / "metrics.json").read_text()) for s in (0, 1)}
    for s in (0, 1):
        merged = (work / f"seed{s}" / "tiny.yaml").read_text()
        assert f"seed: {s}" in merged and "lr: 0.02" in merged
    rows = _cells(proc.stdout.strip())
    assert proc.stdout.splitlines()[0] == "| seed | accuracy/top1 |"
    assert list(rows) == ["0", "1", "mean", "min", "max"]
    top1 = [on_disk[s]["accuracy/top1"] for s in (0, 1)]
    for s in (0, 1):
        assert float(rows[str(s)][0]) == pytest.approx(top1[s], abs=0.005)
    assert float(rows["mean"][0]) == pytest.approx((top1[0] + top1[1]) / 2, abs=0.005)
    assert float(rows["min"][0]) == pytest.approx(min(top1), abs=0.005)
    assert float(rows["max"][0]) == pytest.approx(max(top1), abs=0.005)

    result = json.loads(out.read_text())
    assert [r["metrics"] for r in result["runs"]] == [on_disk[0], on_disk[1]]
    assert result["summary"]["mean"]["accuracy/top1"] == pytest.approx(math.fsum(top1) / 2)
    assert result["table"] == proc.stdout.strip()


# Stand-ins for tools/train.py, test.py and cnn_baseline.py that start at once: train "fails"
# for seed 1 and otherwise leaves a checkpoint; test scores it 10 * seed + 50; the baseline 40 + seed.
FAKE_TRAIN = """
import os, sys
args = sys.argv[1:]
work = args[args.index("--work-dir") + 1]
seed = int([a for a in args if a.startswith("randomness.seed=")][0].split("=")[1])
if seed == 1:
    print("boom: a made-up training error")
    sys.exit(3)
os.makedirs(work, exist_ok=True)
open(os.path.join(work, "epoch_1.pth"), "w").write(str(seed))
open(os.path.join(work, "last_checkpoint"), "w").write(os.path.join(work, "epoch_1.pth"))
"""
FAKE_TEST = """
import json, os, sys
args = sys.argv[1:]
work = args[args.index("--work-dir") + 1]
seed = int(open(args[1]).read())
os.makedirs(work, exist_ok=True)
json.dump({"accuracy/top1": 10.0 * seed + 50, "accuracy/top5": 100.0, "threads": int(os.environ["OMP_NUM_THREADS"])},
          open(os.path.join(work, "metrics.json"), "w"))
"""
FAKE_BASELINE = """
import json, sys
args = sys.argv[1:]
seed = int(args[args.index("--seed") + 1])
json.dump({"accuracy/top1": 40.0 + seed, "seconds": 1.5}, open(args[args.index("--json") + 1], "w"))
"""


def test_a_failed_seed_is_reported_with_its_log_and_the_tool_exits_1(tmp_path, capsys, monkeypatch):
    import importlib.util

    fake = tmp_path / "tools"
    fake.mkdir()
    for name, text in (("train.py", FAKE_TRAIN), ("test.py", FAKE_TEST), ("cnn_baseline.py", FAKE_BASELINE)):
        (fake / name).write_text(text)
    spec = importlib.util.spec_from_file_location("seeds_tool", REPO / "tools" / "seeds.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr(tool, "TOOLS", str(fake))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    work, out = tmp_path / "work", tmp_path / "out" / "seeds.json"

    code = tool.main([str(config), "--data", str(tmp_path), "--num-classes", "3", "--seeds", "0", "1", "2",
                      "--baseline", "cls", "--jobs", "2", "--work-dir", str(work), "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    log = work / "seed1" / "train.log"
    assert f"seeds: seed 1: train exited with 3, see {log}" in captured.err
    assert "boom: a made-up training error" in log.read_text()
    rows = _cells(captured.out.strip())
    assert captured.out.splitlines()[0] == "| seed | accuracy/top1 | baseline accuracy/top1 | note |"
    assert rows == {
        "0": ["50", "40", ""],
        "1": ["n/a", "41", f"failed: train exited with 3, see {log}"],
        "2": ["70", "42", ""],
        "mean": ["60", "41", ""], "min": ["50", "40", ""], "max": ["70", "42", ""],
    }
    result = json.loads(out.read_text())
    assert [r["ok"] for r in result["runs"]] == [True, False, True]
    assert result["runs"][2]["baseline"] == {"accuracy/top1": 42.0, "seconds": 1.5}
    # Each process was given half of this process's cores.
    assert result["runs"][0]["metrics"]["threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    assert result["summary"]["mean"] == {"accuracy/top1": 60.0, "baseline accuracy/top1": 41.0}

    # --metrics all: every number, the baseline's seconds left out (here the video baseline).
    assert tool.main([str(config), "--data", str(tmp_path), "--num-classes", "3", "--seeds", "0",
                      "--metrics", "all", "--baseline", "video", "--work-dir", str(work)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "| seed | accuracy/top1 | accuracy/top5 | threads | baseline accuracy/top1 |")
    # Usage errors are named before anything runs.
    assert tool.main([str(tmp_path / "none.yaml"), "--data", str(tmp_path / "nowhere"), "--num-classes", "3",
                      "--seeds", "0", "0"]) == 2
    err = capsys.readouterr().err
    assert "none.yaml' does not exist" in err and "nowhere' is not a directory" in err and "repeats" in err
