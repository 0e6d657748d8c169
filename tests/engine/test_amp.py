"""Mixed precision (``--amp``, ``optim_wrapper.dtype``) on CPU (vitasks/engine/amp.py)."""

import math

import pytest
import torch

import vitasks_toy_plugin as toy
from vitasks.engine import launch
from vitasks.engine.amp import MixedPrecisionOptimWrapper
from vitasks.engine.launch import train
from vitasks.errors import ConfigError

SHORT = dict(train_cfg=dict(max_epochs=1))


@pytest.fixture(autouse=True)
def _clear_seen_dtypes():
    toy.SEEN_DTYPES.clear()
    yield


def test_amp_trains_in_bfloat16_and_validates_under_autocast(tmp_path):
    losses = tmp_path / "losses.jsonl"
    runner = train(toy.write_config(tmp_path, losses=losses, **SHORT), work_dir=str(tmp_path / "wd"), amp=True)
    assert isinstance(runner.optim_wrapper, MixedPrecisionOptimWrapper)
    assert not runner.optim_wrapper.loss_scaler.is_enabled()  # bf16 needs no loss scaling
    assert toy.SEEN_DTYPES == {"loss": torch.bfloat16, "predict": torch.bfloat16}
    values = toy.read_losses(losses)
    assert len(values) == 4 and all(math.isfinite(v) for v in values.values())
    # The parameters stay float32 (autocast only changes the compute dtype) and were updated.
    assert runner.model.head.fc.weight.dtype == torch.float32
    assert torch.count_nonzero(runner.model.head.fc.weight) > 0


def test_without_amp_everything_is_float32(tmp_path):
    train(toy.write_config(tmp_path, **SHORT), work_dir=str(tmp_path / "wd"))
    assert toy.SEEN_DTYPES == {"loss": torch.float32, "predict": torch.float32}


def test_float16_with_loss_scaling_from_the_config(tmp_path):
    cfg = toy.write_config(tmp_path, optim_wrapper=dict(dtype="float16"), **SHORT)
    runner = train(cfg, work_dir=str(tmp_path / "wd"))
    assert toy.SEEN_DTYPES["loss"] == torch.float16
    scaler = runner.optim_wrapper.loss_scaler
    assert scaler.is_enabled() and scaler.get_scale() > 1.0
    # The scaler state is part of the checkpoint, so a resumed fp16 run keeps its scale.
    assert "loss_scaler" in runner.optim_wrapper.state_dict()


def test_test_runs_under_autocast_with_amp(tmp_path):
    model = toy.ToyClassifier()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "m.pth")
    launch.test(toy.write_config(tmp_path), str(tmp_path / "m.pth"), work_dir=str(tmp_path / "wd"), amp=True)
    assert toy.SEEN_DTYPES == {"predict": torch.bfloat16}


def test_bad_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="float64"):
        MixedPrecisionOptimWrapper(dtype="float64", optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
