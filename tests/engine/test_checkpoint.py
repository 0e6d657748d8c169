"""Safe checkpoint loading and the load_from rules (vitasks/engine/checkpoint.py, runner)."""

import copy
import json
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer
from safetensors.torch import save_file
from torch import nn

import vitasks_toy_plugin as toy
from vitasks.engine.checkpoint import (
    RecordedStateDict,
    get_state_dict,
    is_head_key,
    load_checkpoint_file,
    load_model_weights,
    load_state_dict_file,
)
from vitasks.engine.launch import train
from vitasks.errors import CheckpointError


class _CreatesFile:
    """Unpickling this calls ``open(path, "w")``: a payload with a visible effect."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class _LooksUpAttribute:
    """Pickles as ``getattr(HistoryBuffer, name)``: the allowlisted getattr must refuse it."""

    def __init__(self, name):
        self.name = name

    def __reduce__(self):
        return (getattr, (HistoryBuffer, self.name))


def _state_dict():
    return OrderedDict(w=torch.arange(6.0).reshape(2, 3), b=torch.tensor([1, 2], dtype=torch.int64))


def test_load_state_dict_file_reads_torch_and_safetensors(tmp_path):
    sd = _state_dict()
    torch.save(sd, tmp_path / "plain.pth")
    torch.save({"state_dict": sd, "meta": {"epoch": 3}}, tmp_path / "mmengine.pth")
    torch.save({"model": sd, "epoch": 3}, tmp_path / "research.pth")
    save_file(dict(sd), str(tmp_path / "weights.safetensors"))
    for name in ("plain.pth", "mmengine.pth", "research.pth", "weights.safetensors"):
        loaded = load_state_dict_file(str(tmp_path / name))
        assert set(loaded) == {"w", "b"}, name
        assert torch.equal(loaded["w"], sd["w"]) and torch.equal(loaded["b"], sd["b"]), name


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    target = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "payload": _CreatesFile(target)}, evil)
    with pytest.raises(CheckpointError) as err:
        load_state_dict_file(str(evil))
    assert str(evil) in str(err.value)
    assert "would run code" in str(err.value)
    assert not target.exists()
    # The same through a bare pickle file (torch's legacy format path).
    legacy = tmp_path / "evil_legacy.pkl"
    legacy.write_bytes(pickle.dumps({"payload": _CreatesFile(target)}, protocol=2))
    with pytest.raises(CheckpointError, match="evil_legacy.pkl"):
        load_checkpoint_file(str(legacy))
    assert not target.exists()
    # Control: the payload is real; an unrestricted load does create the file.
    torch.load(evil, weights_only=False)
    assert target.exists()


def test_allowlisted_getattr_only_resolves_history_buffer_statistics(tmp_path):
    ok = tmp_path / "ok.pth"
    torch.save({"f": _LooksUpAttribute("mean")}, ok)
    assert load_checkpoint_file(str(ok))["f"] is HistoryBuffer.mean
    bad = tmp_path / "bad.pth"
    torch.save({"f": _LooksUpAttribute("__init__")}, bad)
    with pytest.raises(CheckpointError, match="bad.pth.*would run code"):
        load_checkpoint_file(str(bad))


def test_mmengine_records_load_with_weights_only(tmp_path):
    """What mmengine puts in a checkpoint besides tensors round-trips (HistoryBuffer, numpy)."""
    buf = HistoryBuffer()
    for v in (1.5, 2.5, 4.0):
        buf.update(v)
    ckpt = {
        "meta": {"epoch": 1, "dataset_meta": {"classes": ("a", "b"), "palette": np.array([[1, 2, 3]], np.uint8)}},
        "message_hub": {"log_scalars": {"train/loss": buf}, "runtime_info": {"eta": np.float64(3.25)}},
        "state_dict": _state_dict(),
    }
    path = tmp_path / "ckpt.pth"
    torch.save(ckpt, path)
    with pytest.raises(pickle.UnpicklingError):  # what mmengine's bare torch.load hits on torch >= 2.6
        torch.load(path)
    loaded = load_checkpoint_file(str(path))
    restored = loaded["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(restored, HistoryBuffer)
    assert restored.mean() == pytest.approx((1.5 + 2.5 + 4.0) / 3)
    assert loaded["message_hub"]["runtime_info"]["eta"] == 3.25
    np.testing.assert_array_equal(loaded["meta"]["dataset_meta"]["palette"], [[1, 2, 3]])


def test_missing_and_non_dict_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict_file(str(tmp_path / "nope.pth"))
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="list.pth"):
        load_state_dict_file(str(tmp_path / "list.pth"))
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth.*not a valid torch checkpoint"):
        load_state_dict_file(str(tmp_path / "garbage.pth"))
    assert get_state_dict({"module": {"a": 1}}) == {"a": 1}


def test_is_head_key():
    assert is_head_key("head.fc.weight")
    assert is_head_key("decode_head.conv_seg.bias")
    assert is_head_key("roi_head.bbox_head.fc_cls.weight")
    assert not is_head_key("backbone.blocks.0.attn.qkv.weight")
    assert not is_head_key("headless.weight")


class _Resampling(nn.Module):
    """A module whose load hook adapts a differently sized ``pos`` (like the ViT's pos_embed)."""

    def __init__(self, n: int):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, n))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "pos"
        if key in state_dict and state_dict[key].shape != self.pos.shape:
            state_dict[key] = nn.functional.interpolate(state_dict[key][None], size=self.pos.shape[1])[0]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def test_load_model_weights_rules():
    source = toy.ToyClassifier(num_classes=5)
    nn.init.normal_(source.head.fc.weight)
    model = toy.ToyClassifier(num_classes=3)
    sd = {f"module.{k}": v for k, v in source.state_dict().items()}  # saved from a DDP wrapper
    sd["extra.weight"] = torch.zeros(1)
    result = load_model_weights(model, sd, "test checkpoint")
    assert torch.equal(model.backbone[0].weight, source.backbone[0].weight)
    assert torch.count_nonzero(model.head.fc.weight) == 0  # the new head keeps its zero init
    assert result["skipped"] == ["head.fc.bias", "head.fc.weight"]
    assert result["unexpected"] == ["extra.weight"]
    assert result["missing"] == []

    with pytest.raises(CheckpointError) as err:
        load_model_weights(model, source.state_dict(), "test checkpoint", skip_head_mismatch=False)
    assert "'head.fc.weight'" in str(err.value) and "(5, 16)" in str(err.value) and "(3, 16)" in str(err.value)

    wide = toy.ToyClassifier(hidden=32)
    with pytest.raises(CheckpointError) as err:
        load_model_weights(model, wide.state_dict(), "wide.pth")
    msg = str(err.value)
    assert "wide.pth" in msg and "'backbone.0.weight'" in msg and "(32, 8)" in msg and "(16, 8)" in msg

    holder = nn.Module()
    holder.backbone = _Resampling(6)
    result = load_model_weights(holder, {"backbone.pos": torch.arange(3.0)[None]}, "grid")
    assert result == dict(missing=[], unexpected=[], skipped=[], architecture=[])
    assert holder.backbone.pos.shape == (1, 6)


def test_load_from_in_a_config(tmp_path):
    """``load_from`` before training: backbone loaded, a head for a new class count skipped."""
    pretrained = toy.ToyClassifier(num_classes=5)
    nn.init.normal_(pretrained.head.fc.weight)
    torch.save({"state_dict": pretrained.state_dict(), "meta": {}}, tmp_path / "pre.pth")
    # One epoch at learning rate 0: the weights after training are the loaded ones.
    frozen = dict(train_cfg=dict(max_epochs=1), optim_wrapper=dict(optimizer=dict(lr=0.0)))
    cfg = toy.write_config(tmp_path, load_from=str(tmp_path / "pre.pth"), **frozen)
    runner = train(cfg, work_dir=str(tmp_path / "wd"))
    assert torch.equal(runner.model.backbone[0].weight, pretrained.backbone[0].weight)
    assert torch.count_nonzero(runner.model.head.fc.weight) == 0

    wide = toy.ToyClassifier(hidden=32)
    torch.save({"model": wide.state_dict()}, tmp_path / "wide.pth")
    cfg = toy.write_config(tmp_path, load_from=str(tmp_path / "wide.pth"), **frozen)
    with pytest.raises(CheckpointError, match=r"'backbone\.0\.weight' has shape \(32, 8\)"):
        train(cfg, work_dir=str(tmp_path / "wd2"))


def test_a_recorded_architecture_travels_with_the_state_dict_and_is_never_saved(tmp_path):
    arch = {"type": "VisionTransformer", "norm_eps": 1e-12}
    sd = _state_dict()
    torch.save({"state_dict": sd, "meta": {"architecture": arch}}, tmp_path / "converted.pth")
    save_file(dict(sd), str(tmp_path / "converted.safetensors"),
              metadata={"vitasks_meta": json.dumps({"architecture": arch, "converted_from": "timm"})})
    for name in ("converted.pth", "converted.safetensors"):
        loaded = load_checkpoint_file(str(tmp_path / name))
        assert loaded["meta"]["architecture"] == arch, name
        assert isinstance(loaded["state_dict"], RecordedStateDict) and loaded["state_dict"].architecture == arch
        unwrapped = get_state_dict(loaded)  # what init_model passes on
        assert unwrapped.architecture == arch and set(unwrapped) == {"w", "b"}
        assert torch.equal(unwrapped["w"], sd["w"])
    # Saved again, it is a plain OrderedDict: torch's own weights-only loader (no vitasks
    # allowlist) reads it, and copies drop the record.
    torch.save(loaded, tmp_path / "again.pth")
    again = torch.load(tmp_path / "again.pth", weights_only=True)
    assert type(again["state_dict"]) is OrderedDict and torch.equal(again["state_dict"]["w"], sd["w"])
    assert type(copy.deepcopy(loaded["state_dict"])) is OrderedDict
    # A safetensors file without vitasks metadata stays a flat tensor dict.
    save_file(dict(sd), str(tmp_path / "plain.safetensors"))
    assert set(load_checkpoint_file(str(tmp_path / "plain.safetensors"))) == {"w", "b"}
    # A record with a model whose backbone is not a ViT: nothing to compare.
    result = load_model_weights(toy.ToyClassifier(), loaded["state_dict"], "converted")
    assert result["architecture"] == [] and sorted(result["unexpected"]) == ["b", "w"]
