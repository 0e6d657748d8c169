"""Resuming: a resumed run continues exactly where the stopped one was (vitasks/engine/runner.py)."""

import json
import os
import signal
import unittest.mock as mock

import pytest
import torch

import vitasks_toy_plugin as toy
from vitasks.config import load_config
from vitasks.engine.checkpoint import load_checkpoint_file
from vitasks.engine.launch import train
from vitasks.errors import CheckpointError

ITERS = 16  # 4 epochs x 4 iterations


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 4-epoch run: its work dir and its per-iteration losses."""
    root = tmp_path_factory.mktemp("reference")
    cfg = toy.write_config(root, losses=root / "losses.jsonl")
    train(cfg, work_dir=str(root / "wd"))
    return root / "wd", toy.read_losses(root / "losses.jsonl")


def _weights(path):
    return load_checkpoint_file(str(path))["state_dict"]


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_reference_run_layout(reference):
    work_dir, losses = reference
    assert sorted(losses) == list(range(ITERS))
    for name in ("epoch_1.pth", "epoch_4.pth", "toy.yaml"):
        assert (work_dir / name).is_file(), name
    assert any(p.name.startswith("best_toy_acc_epoch_") for p in work_dir.iterdir())
    assert (work_dir / "last_checkpoint").read_text().strip() == str(work_dir / "epoch_4.pth")
    # The merged config written to the work dir reads back as the same experiment.
    dumped = load_config(str(work_dir / "toy.yaml"))
    assert dumped.model == dict(type="ToyClassifier")
    assert dumped.train_cfg.max_epochs == 4


def test_ctrl_c_mid_epoch_then_auto_resume_reproduces_the_run(reference, tmp_path):
    ref_dir, ref_losses = reference
    losses = tmp_path / "losses.jsonl"
    stop = dict(custom_hooks=[dict(type="StopAtIterHook", at_iter=6)])  # 2 iterations into epoch 2
    with pytest.raises(KeyboardInterrupt):
        train(toy.write_config(tmp_path, "stop.yaml", losses=losses, **stop), work_dir=str(tmp_path / "wd"))
    saved = tmp_path / "wd" / "interrupted_iter_6.pth"
    assert saved.is_file()
    assert (tmp_path / "wd" / "last_checkpoint").read_text().strip() == str(saved)
    meta = load_checkpoint_file(str(saved))["meta"]
    assert (meta["epoch"], meta["iter"]) == (1, 6)

    # load_from (pretrained weights) must not be mistaken for the checkpoint to resume from.
    cfg = toy.write_config(tmp_path, "stop.yaml", losses=losses, load_from=str(ref_dir / "epoch_1.pth"))
    train(cfg, work_dir=str(tmp_path / "wd"), resume="auto")
    resumed = toy.read_losses(losses)
    assert sorted(resumed) == list(range(ITERS))  # no iteration trained twice or skipped
    assert resumed == ref_losses
    _assert_same_weights(tmp_path / "wd" / "epoch_4.pth", ref_dir / "epoch_4.pth")


def test_resume_from_a_checkpoint_path(reference, tmp_path):
    """2 epochs (the reference's epoch_2.pth) + --resume CKPT in a new work dir = epochs 3-4."""
    ref_dir, ref_losses = reference
    losses = tmp_path / "losses.jsonl"
    train(
        toy.write_config(tmp_path, losses=losses),
        work_dir=str(tmp_path / "wd"),
        resume=str(ref_dir / "epoch_2.pth"),
    )
    resumed = toy.read_losses(losses)
    assert sorted(resumed) == list(range(8, ITERS))
    assert resumed == {i: ref_losses[i] for i in range(8, ITERS)}
    _assert_same_weights(tmp_path / "wd" / "epoch_4.pth", ref_dir / "epoch_4.pth")


def test_an_exception_saves_a_checkpoint_before_propagating(tmp_path):
    crash = dict(train_cfg=dict(max_epochs=2), custom_hooks=[dict(type="StopAtIterHook", at_iter=5, error="crash")])
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(toy.write_config(tmp_path, **crash), work_dir=str(tmp_path / "wd"))
    saved = tmp_path / "wd" / "interrupted_iter_5.pth"
    assert (tmp_path / "wd" / "last_checkpoint").read_text().strip() == str(saved)
    checkpoint = load_checkpoint_file(str(saved))
    assert checkpoint["meta"]["iter"] == 5
    assert {"optimizer", "param_schedulers", "message_hub"} <= set(checkpoint)


def test_sigterm_saves_a_checkpoint(tmp_path):
    stop = dict(train_cfg=dict(max_epochs=1), custom_hooks=[dict(type="StopAtIterHook", at_iter=3, error="SIGTERM")])
    with pytest.raises(KeyboardInterrupt, match="signal"):
        train(toy.write_config(tmp_path, **stop), work_dir=str(tmp_path / "wd"))
    assert (tmp_path / "wd" / "interrupted_iter_3.pth").is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is only there while training


def test_auto_resume_without_a_checkpoint_starts_from_scratch(tmp_path):
    losses = tmp_path / "losses.jsonl"
    train(toy.write_config(tmp_path, losses=losses, train_cfg=dict(max_epochs=1)), work_dir=str(tmp_path / "wd"), resume="auto")
    assert sorted(toy.read_losses(losses)) == [0, 1, 2, 3]


def test_resume_errors(tmp_path):
    cfg = toy.write_config(tmp_path, train_cfg=dict(max_epochs=1))
    with pytest.raises(CheckpointError, match="does not exist"):
        train(cfg, work_dir=str(tmp_path / "wd"), resume=str(tmp_path / "missing.pth"))
    torch.save(toy.ToyClassifier().state_dict(), tmp_path / "weights_only.pth")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        train(cfg, work_dir=str(tmp_path / "wd"), resume=str(tmp_path / "weights_only.pth"))
    os.makedirs(tmp_path / "stale")
    (tmp_path / "stale" / "last_checkpoint").write_text(str(tmp_path / "gone.pth"))
    with pytest.raises(CheckpointError, match="gone.pth"):
        train(cfg, work_dir=str(tmp_path / "stale"), resume="auto")


def _stop_right_after_epoch_2(tmp_path, work_dir, losses):
    """Train the toy run into ``work_dir`` and stop it with Ctrl-C at iteration 8, right after
    epoch 2's checkpoint (``last_checkpoint`` names epoch_2.pth)."""
    stop = dict(custom_hooks=[dict(type="StopAtIterHook", at_iter=8)])
    with pytest.raises(KeyboardInterrupt):
        train(toy.write_config(tmp_path, "stop.yaml", losses=losses, **stop), work_dir=str(work_dir))


def test_unreadable_newest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, capsys):
    """A damaged newest checkpoint (what an interrupted save of a non-atomic writer leaves) is
    named in the log and the previous one is resumed from; the run still ends as the reference."""
    ref_dir, ref_losses = reference
    losses = tmp_path / "losses.jsonl"
    work_dir = tmp_path / "wd"
    _stop_right_after_epoch_2(tmp_path, work_dir, losses)
    newest = work_dir / "epoch_2.pth"
    assert (work_dir / "last_checkpoint").read_text().strip() == str(newest)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])

    capsys.readouterr()
    train(toy.write_config(tmp_path, "stop.yaml", losses=losses), work_dir=str(work_dir), resume="auto")
    log = capsys.readouterr().out  # mmengine's logger writes to the terminal
    assert f"cannot resume from {newest}" in log
    # Epoch 2 was trained again from epoch 1's state, exactly as before.
    _assert_same_weights(work_dir / "epoch_4.pth", ref_dir / "epoch_4.pth")
    records = [json.loads(line) for line in losses.read_text().splitlines()]
    assert [r["iter"] for r in records] == list(range(8)) + list(range(4, ITERS))
    assert {r["iter"]: r["loss"] for r in records} == ref_losses


def test_only_unreadable_checkpoints_is_a_clear_error(tmp_path):
    work_dir = tmp_path / "wd"
    train(toy.write_config(tmp_path, train_cfg=dict(max_epochs=1)), work_dir=str(work_dir))
    for path in work_dir.glob("*.pth"):
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* could be resumed from .*epoch_1\.pth"):
        train(toy.write_config(tmp_path), work_dir=str(work_dir), resume="auto")


def test_checkpoints_are_saved_before_old_ones_are_removed(tmp_path):
    """max_keep_ckpts=1: mmengine removed the old checkpoint before writing the new one (a kill in
    between left none); now the new one is complete and named in last_checkpoint first."""
    order = []
    real_remove = os.remove

    def spy_remove(path, *args, **kwargs):
        order.append(("remove", os.path.basename(str(path))))
        return real_remove(path, *args, **kwargs)

    real_replace = os.replace

    def spy_replace(src, dst, *args, **kwargs):
        order.append(("write", os.path.basename(str(dst))))
        return real_replace(src, dst, *args, **kwargs)

    cfg = toy.write_config(tmp_path, train_cfg=dict(max_epochs=2),
                           default_hooks=dict(checkpoint=dict(max_keep_ckpts=1, save_best=None)))
    with mock.patch("os.remove", spy_remove), mock.patch("os.replace", spy_replace):
        train(cfg, work_dir=str(tmp_path / "wd"))
    epoch2 = order.index(("write", "epoch_2.pth"))
    assert order[epoch2 + 1] == ("write", "last_checkpoint")
    assert order.index(("remove", "epoch_1.pth")) > epoch2 + 1
    assert sorted(p.name for p in (tmp_path / "wd").glob("*.pth")) == ["epoch_2.pth"]
    assert not list((tmp_path / "wd").glob(".*.tmp"))  # no temporary file left behind


ITER_BASED = dict(
    train_cfg=dict(_delete_=True, type="IterBasedTrainLoop", max_iters=12, val_interval=100),
    train_dataloader=dict(sampler=dict(type="InfiniteSampler", shuffle=True)),
    param_scheduler=[dict(type="MultiStepLR", milestones=[5, 9], gamma=0.5, by_epoch=False)],
    default_hooks=dict(checkpoint=dict(by_epoch=False, interval=4, save_best=None)),
)


def test_iteration_based_resume_skips_trained_batches_without_loading_them(tmp_path):
    """The stream continues where it stopped (same batches, losses and weights as the
    uninterrupted run), and the batches already trained on are not loaded again."""
    ref_losses_path = tmp_path / "ref.jsonl"
    train(toy.write_config(tmp_path, "ref.yaml", losses=ref_losses_path, **ITER_BASED), work_dir=str(tmp_path / "ref"))
    ref_losses = toy.read_losses(ref_losses_path)
    assert sorted(ref_losses) == list(range(12))

    losses = tmp_path / "losses.jsonl"
    stop = dict(ITER_BASED, custom_hooks=[dict(type="StopAtIterHook", at_iter=7)])
    with pytest.raises(KeyboardInterrupt):
        train(toy.write_config(tmp_path, "stop.yaml", losses=losses, **stop), work_dir=str(tmp_path / "wd"))
    del toy.LOADED[:]
    train(toy.write_config(tmp_path, "stop.yaml", losses=losses, **ITER_BASED), work_dir=str(tmp_path / "wd"),
          resume="auto")
    assert toy.read_losses(losses) == ref_losses
    assert len(toy.LOADED) == (12 - 7) * 4 + 16  # the batches still to train on, and validation at the end
    _assert_same_weights(tmp_path / "wd" / "iter_12.pth", tmp_path / "ref" / "iter_12.pth")


def test_epoch_resume_mid_epoch_does_not_load_the_trained_batches(reference, tmp_path):
    stop = dict(custom_hooks=[dict(type="StopAtIterHook", at_iter=6)])  # 2 batches into epoch 2
    with pytest.raises(KeyboardInterrupt):
        train(toy.write_config(tmp_path, "stop.yaml", **stop), work_dir=str(tmp_path / "wd"))
    del toy.LOADED[:]
    train(toy.write_config(tmp_path, "stop.yaml"), work_dir=str(tmp_path / "wd"), resume="auto")
    # Training loads 10 batches of 4 (2 left in epoch 2, then 2 epochs), validation 4 x 16.
    assert len(toy.LOADED) == 10 * 4 + 3 * 16
    _assert_same_weights(tmp_path / "wd" / "epoch_4.pth", reference[0] / "epoch_4.pth")


def test_a_moved_work_dir_resumes_from_its_own_newest_checkpoint(reference, tmp_path, capsys):
    """``last_checkpoint`` holds an absolute path; after the work dir is moved, ``--resume``
    finds the newest checkpoint by its name in the new place, not by file times (here made
    misleading: the older epoch_1.pth looks newer)."""
    ref_dir, _ = reference
    losses = tmp_path / "losses.jsonl"
    _stop_right_after_epoch_2(tmp_path, tmp_path / "old", losses)
    moved = tmp_path / "moved"
    os.rename(tmp_path / "old", moved)
    assert (moved / "last_checkpoint").read_text().strip() == str(tmp_path / "old" / "epoch_2.pth")
    later = os.path.getmtime(moved / "epoch_2.pth") + 60
    os.utime(moved / "epoch_1.pth", (later, later))

    capsys.readouterr()
    train(toy.write_config(tmp_path, "stop.yaml", losses=losses), work_dir=str(moved), resume="auto")
    log = capsys.readouterr().out
    assert "cannot resume" not in log  # (errors reach the terminal; "Resuming from" is info)
    records = [json.loads(line) for line in losses.read_text().splitlines()]
    assert [r["iter"] for r in records] == list(range(ITERS))  # epochs 3-4 only: nothing trained twice
    _assert_same_weights(moved / "epoch_4.pth", ref_dir / "epoch_4.pth")


def test_an_empty_last_checkpoint_file_falls_back_to_the_newest_checkpoint(reference, tmp_path, capsys):
    ref_dir, _ = reference
    losses = tmp_path / "losses.jsonl"
    work_dir = tmp_path / "wd"
    _stop_right_after_epoch_2(tmp_path, work_dir, losses)
    (work_dir / "last_checkpoint").write_text("")
    capsys.readouterr()
    train(toy.write_config(tmp_path, "stop.yaml", losses=losses), work_dir=str(work_dir), resume="auto")
    log = capsys.readouterr().out
    assert "last_checkpoint is empty" in log and "trying the checkpoints in" in log
    records = [json.loads(line) for line in losses.read_text().splitlines()]
    assert [r["iter"] for r in records] == list(range(ITERS))  # resumed from epoch_2.pth, the newest
    _assert_same_weights(work_dir / "epoch_4.pth", ref_dir / "epoch_4.pth")
