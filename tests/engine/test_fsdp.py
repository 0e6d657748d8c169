"""``strategy: fsdp``: FSDP2 on CPU/gloo gives DDP's weights, resumes exactly, and writes full
state dicts that load anywhere (vitasks/engine/fsdp.py, vitasks/engine/runner.py)."""

import os
import socket
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vitasks_toy_plugin as toy
from vitasks.apis import init_model
from vitasks.engine.checkpoint import load_checkpoint_file
from vitasks.engine.launch import train
from vitasks.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(cfg, work_dir, *args, check=True):
    env = dict(
        os.environ,
        PORT=str(_free_port()),
        PYTHON=sys.executable,
        PYTHONPATH=os.pathsep.join([str(Path(toy.__file__).parent), str(REPO), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        ["bash", str(REPO / "tools" / "dist_train.sh"), cfg, "2", "--work-dir", str(work_dir), *args],
        env=env, capture_output=True, text=True, timeout=300,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _weights(path):
    return load_checkpoint_file(str(path))["state_dict"]


def _assert_close(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    cfg = toy.write_config(root, "fsdp.yaml", strategy="fsdp", log_level="INFO")
    proc = _torchrun(cfg, root / "wd")
    return root, cfg, proc


def test_fsdp_equals_one_process_with_the_summed_batch(fsdp_run, tmp_path):
    """(and so DDP's weights: test_distributed.py shows DDP equals the same single-process run)"""
    root, _, proc = fsdp_run
    assert "FSDP (fully_shard) wraps the model" in proc.stdout + proc.stderr
    # A finished FSDP run exits 0 without an abort, even where torch's FSDP keeps the group's
    # threads alive past its destruction (tools/train.py then ends with os._exit after flushing).
    assert not re.search(r"terminate called|Signal (6|11) \(SIG|exitcode\s*:\s*-(6|11)\b|Fatal Python error",
                         proc.stdout + proc.stderr)
    fsdp = _weights(root / "wd" / "epoch_4.pth")
    assert all(type(v) is torch.Tensor for v in fsdp.values())  # a full state dict, no DTensors
    train(toy.write_config(tmp_path, "single.yaml", train_dataloader=dict(batch_size=8)),
          work_dir=str(tmp_path / "single"))
    _assert_close(fsdp, _weights(tmp_path / "single" / "epoch_4.pth"))


def test_fsdp_run_stopped_and_resumed_reproduces_the_uninterrupted_one(fsdp_run, tmp_path):
    root, _, _ = fsdp_run
    crash = dict(strategy="fsdp", custom_hooks=[dict(type="StopAtIterHook", at_iter=5, error="crash")])
    cfg = toy.write_config(tmp_path, "fsdp.yaml", **crash)
    proc = _torchrun(cfg, tmp_path / "wd", check=False)
    assert proc.returncode != 0
    assert (tmp_path / "wd" / "last_checkpoint").read_text().strip() == str(tmp_path / "wd" / "epoch_2.pth")
    checkpoint = load_checkpoint_file(str(tmp_path / "wd" / "epoch_2.pth"))
    assert checkpoint["optimizer"]["state"]  # the gathered optimizer state is in the file

    _torchrun(toy.write_config(tmp_path, "fsdp.yaml", strategy="fsdp"), tmp_path / "wd", "--resume")
    _assert_close(_weights(tmp_path / "wd" / "epoch_4.pth"), _weights(root / "wd" / "epoch_4.pth"))


def test_fsdp_checkpoint_loads_with_init_model(fsdp_run):
    root, cfg, _ = fsdp_run
    checkpoint = root / "wd" / "epoch_4.pth"
    model = init_model(cfg, str(checkpoint))
    saved = _weights(checkpoint)
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_strategy_errors(tmp_path):
    with pytest.raises(ConfigError, match="strategy: fsdp shards the model .*torchrun"):
        train(toy.write_config(tmp_path, strategy="fsdp"), work_dir=str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="strategy: expected one of ddp, fsdp, got 'zero3'"):
        train(toy.write_config(tmp_path, strategy="zero3"), work_dir=str(tmp_path / "b"))
