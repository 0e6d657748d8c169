"""tools/analyze_logs.py: reading mmengine's scalars.json of every run in a work dir, plotting."""

import json

import numpy as np
import pytest
from PIL import Image

from vitasks.cli import main as cli_main
from vitasks.errors import DataError, VitasksError
from vitasks.visualization.log_curves import (
    find_scalar_files,
    load_work_dir_logs,
    plot_curves,
    train_time_stats,
)


def main(argv):
    """tools/analyze_logs.py."""
    return cli_main(["analyze-logs", *argv])


def _train(step, epoch, loss, lr=0.1, time=0.5):
    return {"lr": lr, "data_time": 0.01, "loss": loss, "time": time, "epoch": epoch, "iter": step, "step": step}


def _val(epoch, top1):
    return {"accuracy/top1": top1, "data_time": 0.002, "time": 0.03, "step": epoch}


def _write_run(work_dir, timestamp, records, tail=""):
    vis = work_dir / timestamp / "vis_data"
    vis.mkdir(parents=True)
    (work_dir / timestamp / f"{timestamp}.log").write_text("text log, not read\n")
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    (vis / "scalars.json").write_text(text)


@pytest.fixture
def resumed_work_dir(tmp_path):
    """Two runs, 3 iterations per epoch: the first logs epoch 1 and its validation, then
    iterations 4 and 5 of epoch 2 and is killed mid-write; the second resumes from the epoch-1
    checkpoint and logs iterations 4..6 and epoch 2's validation again."""
    work = tmp_path / "work"
    first = [_train(1, 1, 2.0, time=0.4), _train(2, 1, 1.8, time=0.6), _train(3, 1, 1.7, time=0.5),
             _val(1, 40.0), _train(4, 2, 9.9), _train(5, 2, 9.8)]
    second = [_train(4, 2, 1.5, lr=0.05, time=0.2), _train(5, 2, 1.4, lr=0.05, time=0.3),
              _train(6, 2, 1.2, lr=0.05, time=0.4), _val(2, 55.5)]
    # Name order is time order; the killed run's last line is cut short.
    _write_run(work, "20260101_120000", first, tail='{"lr": 0.1, "loss": 9.')
    _write_run(work, "20260101_120500", second)
    (work / "last_checkpoint").write_text("epoch_2.pth")
    return work


def test_resumed_run_continues_the_curve(resumed_work_dir):
    log = load_work_dir_logs(resumed_work_dir)
    assert [p.rsplit("/", 3)[-3] for p in log.runs] == ["20260101_120000", "20260101_120500"]
    loss = log.curve("loss")
    assert loss.phase == "train" and loss.unit == "iter"
    # Steps 4 and 5 of the killed run are replaced by the resumed run's.
    assert loss.steps.tolist() == [1, 2, 3, 4, 5, 6]
    assert loss.values.tolist() == [2.0, 1.8, 1.7, 1.5, 1.4, 1.2]
    assert log.curve("lr").values.tolist() == [0.1, 0.1, 0.1, 0.05, 0.05, 0.05]
    top1 = log.curve("accuracy/top1")
    assert top1.phase == "val" and top1.unit == "epoch"
    assert top1.steps.tolist() == [1, 2] and top1.values.tolist() == [40.0, 55.5]
    # `time` is logged by training and validation: the training curve is the one plotted.
    assert log.curve("time").values.tolist() == [0.4, 0.6, 0.5, 0.2, 0.3, 0.4]


def test_a_new_run_replaces_what_it_logs_again(tmp_path):
    """Runs out of step order in the file system (a second run from scratch) still give one
    curve sorted by step, the later run winning from its first step on."""
    work = tmp_path / "work"
    _write_run(work, "20260101_000000", [_train(s, 1, float(s)) for s in (1, 2, 3, 4)])
    _write_run(work, "20260102_000000", [_train(s, 1, 10.0 + s) for s in (3, 2)])
    loss = load_work_dir_logs(work).curve("loss")
    assert loss.steps.tolist() == [1, 2, 3]
    assert loss.values.tolist() == [1.0, 12.0, 13.0]


def test_iteration_based_validation_is_by_iteration(tmp_path):
    records = [{"lr": 0.1, "loss": 1.0, "time": 0.1, "iter": 10, "step": 10},
               {"mIoU": 12.5, "aAcc": 60.0, "step": 10},
               {"lr": 0.1, "loss": 0.5, "time": 0.1, "iter": 20, "step": 20},
               {"mIoU": 30.25, "aAcc": 80.0, "step": 20}]
    _write_run(tmp_path, "20260101_000000", records)
    log = load_work_dir_logs(tmp_path)
    miou = log.curve("mIoU")
    assert miou.unit == "iter" and miou.steps.tolist() == [10, 20] and miou.values.tolist() == [12.5, 30.25]
    assert train_time_stats(log) == {"mean": pytest.approx(0.1), "std": pytest.approx(0.0), "records": 2}


def test_reads_what_mmengine_writes(tmp_path):
    """The format assumption: mmengine's LocalVisBackend puts `step` into each JSON line."""
    from mmengine.visualization import LocalVisBackend

    backend = LocalVisBackend(save_dir=str(tmp_path / "20260101_000000" / "vis_data"))
    backend.add_scalars({"loss": 0.75, "lr": 0.01, "epoch": 1, "iter": 5}, step=5)
    backend.add_scalars({"accuracy/top1": 12.0}, step=1)
    log = load_work_dir_logs(tmp_path)
    assert log.curve("loss").steps.tolist() == [5] and log.curve("loss").values.tolist() == [0.75]
    assert log.curve("accuracy/top1").unit == "epoch"


def test_unknown_key_names_the_keys_that_exist(resumed_work_dir, tmp_path):
    log = load_work_dir_logs(resumed_work_dir)
    with pytest.raises(DataError, match=r"'mIoU'.*accuracy/top1, data_time, loss, lr, time"):
        log.curve("mIoU")
    with pytest.raises(DataError, match=r"'mIoU', 'nope'"):
        plot_curves([resumed_work_dir], ["loss", "mIoU", "nope"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_work_dir_run_dir_or_file(resumed_work_dir, tmp_path):
    run = resumed_work_dir / "20260101_120500"
    assert find_scalar_files(run) == [run / "vis_data" / "scalars.json"]
    assert find_scalar_files(run / "vis_data" / "scalars.json") == [run / "vis_data" / "scalars.json"]
    assert len(find_scalar_files(resumed_work_dir)) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no training logs found"):
        find_scalar_files(tmp_path / "empty")


def test_bad_line_names_file_and_line(tmp_path):
    _write_run(tmp_path, "20260101_000000", [_train(1, 1, 1.0)], tail="not json\n" + json.dumps(_train(2, 1, 0.5)))
    with pytest.raises(DataError, match=r"scalars.json:2: not a JSON record"):
        load_work_dir_logs(tmp_path)


def test_train_time_per_epoch(resumed_work_dir):
    stats = train_time_stats(load_work_dir_logs(resumed_work_dir))
    # merged: epoch 1 times 0.4, 0.6, 0.5; epoch 2 (the resumed run's) 0.2, 0.3, 0.4
    assert stats["per_epoch"] == {1: pytest.approx(0.5), 2: pytest.approx(0.3)}
    assert stats["slowest_epoch"] == 1 and stats["fastest_epoch"] == 2
    assert stats["mean"] == pytest.approx(np.mean([0.4, 0.6, 0.5, 0.2, 0.3, 0.4]))
    assert stats["epoch_std"] == pytest.approx(0.1)


def test_plot_writes_a_png_comparing_work_dirs(resumed_work_dir, tmp_path):
    other = tmp_path / "other"
    _write_run(other, "20260101_000000", [_train(s, 1 + (s - 1) // 3, 3.0 - 0.2 * s) for s in range(1, 7)]
               + [_val(1, 20.0)])
    out = tmp_path / "plots" / "curves.png"
    curves = plot_curves([resumed_work_dir, other], ["loss", "accuracy/top1"], out, title="t", legend=["a", "b"])
    assert [[c.key for c in per_dir] for per_dir in curves] == [["loss", "accuracy/top1"]] * 2
    assert curves[1][0].values.tolist() == pytest.approx([2.8, 2.6, 2.4, 2.2, 2.0, 1.8])
    with Image.open(out) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width > 400 and height > 400
    with pytest.raises(VitasksError, match="--legend: expected 2 labels"):
        plot_curves([resumed_work_dir, other], ["loss"], out, legend=["a", "b", "c"])


def test_cli(resumed_work_dir, tmp_path, capsys):
    out = tmp_path / "c.png"
    assert main(["plot_curve", str(resumed_work_dir), "--keys", "loss", "lr", "accuracy/top1",
                 "--out", str(out)]) == 0
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot_curve", str(resumed_work_dir), "--keys", "mIoU", "--out", str(out)]) == 2
    assert "no log record has the key 'mIoU'" in capsys.readouterr().err
    assert main(["cal_train_time", str(resumed_work_dir)]) == 0
    printed = capsys.readouterr().out
    assert "slowest epoch 1, average time is 0.5000 s/iter" in printed
    assert "average iter time: 0.4000 s/iter" in printed
