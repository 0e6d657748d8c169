"""``train``/``test`` entry points (vitasks/engine/launch.py)."""

import json

import pytest
import torch
from torch import nn

import vitasks_toy_plugin as toy
from vitasks.engine import launch
from vitasks.engine.launch import flatten_metrics, train
from vitasks.errors import CheckpointError, ConfigError


@pytest.fixture()
def trained(tmp_path):
    """A checkpoint of a ToyClassifier with random weights, and the model itself."""
    model = toy.ToyClassifier()
    nn.init.normal_(model.head.fc.weight)
    path = tmp_path / "model.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {}}, path)
    return str(path), model


def _predictions(model):
    data = toy.ToyVectorDataset(length=16, seed=1)  # the test set of the toy config
    with torch.no_grad():
        return model(data.x).argmax(1), data.y


def test_test_writes_the_metrics_of_the_checkpoint(tmp_path, trained):
    ckpt, model = trained
    metrics = launch.test(toy.write_config(tmp_path), ckpt, work_dir=str(tmp_path / "wd"))
    pred, gt = _predictions(model)
    assert metrics == {"toy/acc": pytest.approx(100.0 * (pred == gt).float().mean().item()), "toy/count": 16.0}
    assert json.loads((tmp_path / "wd" / "metrics.json").read_text()) == metrics


def test_dump_appends_test_dump_with_out_path(tmp_path, trained):
    ckpt, model = trained
    out = tmp_path / "dump" / "preds.jsonl"
    metrics = launch.test(toy.write_config(tmp_path), ckpt, work_dir=str(tmp_path / "wd"), dump=str(out))
    assert set(metrics) == {"toy/acc", "toy/count"}  # the dumper adds no metric
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    pred, _ = _predictions(model)
    assert rows == [dict(index=i, pred=int(p)) for i, p in enumerate(pred)]


def test_dump_without_test_dump_is_a_config_error(tmp_path, trained):
    ckpt, _ = trained
    cfg = toy.write_config(tmp_path, test_dump=None)
    with pytest.raises(ConfigError, match="test_dump"):
        launch.test(cfg, ckpt, work_dir=str(tmp_path / "wd"), dump=str(tmp_path / "p.jsonl"))


def test_test_defaults_and_errors(tmp_path, trained, monkeypatch):
    ckpt, _ = trained
    cfg = toy.write_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    launch.test(cfg, ckpt)
    assert (tmp_path / "work_dirs" / "toy" / "metrics.json").is_file()
    with pytest.raises(CheckpointError, match="nope.pth"):
        launch.test(cfg, str(tmp_path / "nope.pth"))
    # Evaluating needs every shape to match: no head is silently skipped.
    torch.save({"state_dict": toy.ToyClassifier(num_classes=5).state_dict()}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"'head\.fc\.weight' has shape \(5, 16\)"):
        launch.test(cfg, str(tmp_path / "other.pth"))


def test_amp_settings_are_checked(tmp_path):
    cfg = toy.write_config(tmp_path, optim_wrapper=dict(dtype="float64"))
    with pytest.raises(ConfigError, match="optim_wrapper.dtype"):
        train(cfg, work_dir=str(tmp_path / "wd"))
    cfg = toy.write_config(tmp_path, optim_wrapper=dict(type="OptimWrapperDict"))
    with pytest.raises(ConfigError, match="OptimWrapperDict"):
        train(cfg, work_dir=str(tmp_path / "wd"), amp=True)


def test_compile_switch_trains_the_same(tmp_path):
    """``compile`` goes to torch.compile (the eager backend keeps this fast on CPU)."""
    import torch._dynamo

    short = dict(train_cfg=dict(max_epochs=1))
    train(toy.write_config(tmp_path, "plain.yaml", losses=tmp_path / "plain.jsonl", **short), work_dir=str(tmp_path / "a"))
    torch._dynamo.reset()
    frames_before = torch._dynamo.utils.counters["frames"]["ok"]
    cfg = toy.write_config(tmp_path, "compiled.yaml", losses=tmp_path / "compiled.jsonl", compile=dict(backend="eager"), **short)
    runner = train(cfg, work_dir=str(tmp_path / "b"))
    assert torch._dynamo.utils.counters["frames"]["ok"] > frames_before  # dynamo traced the step
    assert "train_step" in vars(runner.model)  # mmengine replaced the method by the compiled one
    compiled, plain = toy.read_losses(tmp_path / "compiled.jsonl"), toy.read_losses(tmp_path / "plain.jsonl")
    assert compiled.keys() == plain.keys()
    for i in plain:
        assert compiled[i] == pytest.approx(plain[i], rel=1e-5, abs=1e-6)
    torch._dynamo.reset()


def test_flatten_metrics():
    import numpy as np

    flat = flatten_metrics(
        {"a/top1": torch.tensor(75.0), "n": np.int64(3), "nested": {"x": np.float32(0.5)}, "per_class": [1.0, 2.0]}
    )
    assert flat == {"a/top1": 75.0, "n": 3, "nested/x": 0.5}
    assert isinstance(flat["n"], int)


def test_dataset_and_metric_errors_name_their_loader_key(tmp_path, trained):
    """The Runner builds each loader's dataset under ``<stage>_dataloader.dataset`` and each
    evaluator under ``<stage>_evaluator``: their config errors name those keys."""
    ckpt, _ = trained
    no_root = toy.write_config(tmp_path, name="no_root.yaml", test_dataloader=dict(
        dataset=dict(_delete_=True, type="ImageNetFolder", data_root="", split="val")))
    with pytest.raises(ConfigError, match=r"test_dataloader\.dataset: `data_root` is missing"):
        launch.test(no_root, ckpt, work_dir=str(tmp_path / "wd"))
    bad_metric = toy.write_config(tmp_path, name="bad_metric.yaml",
                                  test_evaluator=dict(type="CocoMetric", metric=["keypoints"]))
    with pytest.raises(ConfigError, match=r"test_evaluator\.metric must be a subset of \['bbox', 'segm'\]"):
        launch.test(bad_metric, ckpt, work_dir=str(tmp_path / "wd2"))


def test_a_transform_error_names_its_pipeline_entry(tmp_path, trained):
    """Under the Runner a dataset's transforms are built at ``<loader>.dataset.pipeline.<i>``."""
    from PIL import Image

    ckpt, _ = trained
    (tmp_path / "data" / "val" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "val" / "a" / "x.png")
    pipeline = [dict(type="LoadImage"), dict(type="SegRandomResize", scale=[8, 8], ratio_range=[2.0, 1.0])]
    cfg = toy.write_config(tmp_path, name="bad_ratio.yaml", test_dataloader=dict(dataset=dict(
        _delete_=True, type="ImageNetFolder", data_root=str(tmp_path / "data"), split="val", pipeline=pipeline)))
    with pytest.raises(ConfigError, match=r"test_dataloader\.dataset\.pipeline\.1\.ratio_range must be \[min, max\]"):
        launch.test(cfg, ckpt, work_dir=str(tmp_path / "wd"))
