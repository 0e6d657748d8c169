"""Model EMA (``EMAHook``): the average against its formula written out (decay, interval, warm-up),
evaluation and ``save_best`` on the averaged weights, the checkpoint layout, and a stopped run
resumed with the EMA and repeated augmentation on equal to the uninterrupted one."""

import pytest
import torch
from mmengine.hooks import Hook
from torch import nn

import vitasks_toy_plugin as toy
from vitasks.engine.checkpoint import load_checkpoint_file
from vitasks.engine.hooks import EMAHook, ModelEMA
from vitasks.engine.launch import train
from vitasks.errors import ConfigError
from vitasks.registry import HOOKS

# Recorded by EMAProbeHook: trained weights after each iteration, weights seen by validation.
TRAINED, EVALUATED = [], []


@HOOKS.register_module()
class EMAProbeHook(Hook):
    priority = "LOW"  # after EMAHook (NORMAL): validation sees what the EMA hook put in place

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        TRAINED.append({k: v.detach().clone() for k, v in runner.model.state_dict().items()})

    def before_val_epoch(self, runner) -> None:
        EVALUATED.append({k: v.detach().clone() for k, v in runner.model.state_dict().items()})


def brute_force_ema(weights, decay, interval=1, warmup=False):
    """ema after each update: the first copies, update t (t = 1, 2, ...) averages when
    t % interval == 0 with decay_t = min(decay, (1 + t) / (10 + t)) under warm-up."""
    out, ema = [], None
    for t, w in enumerate(weights):
        if t == 0:
            ema = {k: v.clone().double() for k, v in w.items()}
        elif t % interval == 0:
            d = min(decay, (1 + t) / (10 + t)) if warmup else decay
            ema = {k: d * ema[k] + (1 - d) * w[k].double() for k in w}
        out.append(ema)
    return out


@pytest.mark.parametrize("decay,interval,warmup", [(0.9, 1, False), (0.99, 3, False), (0.999, 1, True)])
def test_model_ema_is_its_formula(decay, interval, warmup):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    ema = ModelEMA(model, decay=decay, interval=interval, warmup=warmup)
    weights = []
    for _ in range(12):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
        ema.update_parameters(model)
    expected = brute_force_ema(weights, decay, interval, warmup)[-1]
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v.double(), expected[k], rtol=1e-6, atol=1e-6)
    assert int(ema.steps) == 12
    if warmup:  # the warm-up decay actually bites: without it the average is elsewhere
        plain = brute_force_ema(weights, decay, interval, False)[-1]
        assert not torch.allclose(plain["weight"], expected["weight"], atol=1e-3)


def test_hook_settings_are_checked():
    with pytest.raises(ConfigError, match="decay"):
        EMAHook(decay=1.5)
    with pytest.raises(ConfigError, match="not both"):
        EMAHook(decay=0.9, momentum=0.1)
    with pytest.raises(ConfigError, match="interval"):
        EMAHook(interval=0)
    assert EMAHook(momentum=0.25).decay == 0.75
    assert HOOKS.get("EMAHook") is EMAHook


def _ema_overrides(evaluate=True, extra_hooks=(), repeat_aug=False) -> dict:
    hooks = [dict(type="EMAHook", decay=0.8, evaluate=evaluate), dict(type="EMAProbeHook"), *extra_hooks]
    overrides = dict(custom_hooks=hooks)
    if repeat_aug:
        overrides["train_dataloader"] = dict(sampler=dict(_delete_=True, type="RepeatAugSampler", selected_round=0))
    return overrides


def _ema_config(tmp_path, name="ema.yaml", evaluate=True):
    return toy.write_config(tmp_path, name, **_ema_overrides(evaluate))


def test_training_evaluates_and_saves_the_average(tmp_path):
    del TRAINED[:], EVALUATED[:]
    train(_ema_config(tmp_path), work_dir=str(tmp_path / "wd"))
    assert len(TRAINED) == 16 and len(EVALUATED) == 4  # 4 epochs of 4 iterations, validated each
    expected = brute_force_ema(TRAINED, 0.8)
    # Each validation ran on the average of that epoch's end...
    for epoch, seen in enumerate(EVALUATED):
        for k, v in seen.items():
            torch.testing.assert_close(v.double(), expected[4 * epoch + 3][k], rtol=1e-6, atol=1e-6)
    # ... and the checkpoint's state_dict is the average, the trained weights under ema_state_dict.
    ck = load_checkpoint_file(str(tmp_path / "wd" / "epoch_4.pth"))
    for k, v in ck["state_dict"].items():
        torch.testing.assert_close(v.double(), expected[-1][k], rtol=1e-6, atol=1e-6)
        assert torch.equal(ck["ema_state_dict"]["module." + k], TRAINED[-1][k])
    assert int(ck["ema_state_dict"]["steps"]) == 16 and ck["meta"]["ema_in_state_dict"] is True
    # save_best picked its checkpoint by the average's metric and holds the average too.
    best = [p for p in (tmp_path / "wd").iterdir() if p.name.startswith("best_")]
    assert len(best) == 1
    best_epoch = int(best[0].stem.rsplit("_", 1)[1])
    best_sd = load_checkpoint_file(str(best[0]))["state_dict"]
    for k, v in best_sd.items():
        torch.testing.assert_close(v.double(), expected[4 * best_epoch - 1][k], rtol=1e-6, atol=1e-6)
    # Testing a checkpoint with the hook in the config evaluates its state_dict (the average),
    # not the hook's fresh copy: the test metric is the last validation's.
    from vitasks.engine.launch import test as run_test

    del EVALUATED[:]
    metrics = run_test(_ema_config(tmp_path), str(tmp_path / "wd" / "epoch_4.pth"), work_dir=str(tmp_path / "test"))
    val_log = [m for m in (tmp_path / "wd").rglob("scalars.json")]
    assert metrics["toy/acc"] == pytest.approx(_last_val_metric(val_log[0], "toy/acc"))


def _last_val_metric(path, key):
    import json

    records = [json.loads(line) for line in open(path) if key in line]
    return records[-1][key]


def test_without_evaluate_the_trained_weights_are_evaluated_and_saved(tmp_path):
    del TRAINED[:], EVALUATED[:]
    train(_ema_config(tmp_path, evaluate=False), work_dir=str(tmp_path / "wd"))
    for epoch, seen in enumerate(EVALUATED):
        assert all(torch.equal(seen[k], TRAINED[4 * epoch + 3][k]) for k in seen)
    ck = load_checkpoint_file(str(tmp_path / "wd" / "epoch_4.pth"))
    expected = brute_force_ema(TRAINED, 0.8)[-1]
    for k, v in ck["state_dict"].items():
        assert torch.equal(v, TRAINED[-1][k])
        torch.testing.assert_close(ck["ema_state_dict"]["module." + k].double(), expected[k], rtol=1e-6, atol=1e-6)
    assert ck["meta"]["ema_in_state_dict"] is False


@pytest.mark.parametrize("evaluate", [True, False])
def test_stopped_and_resumed_with_ema_and_repeat_aug_equals_the_uninterrupted_run(tmp_path, evaluate):
    """Same seed, stopped mid-epoch (Ctrl-C: interrupt checkpoint) and resumed: the same losses
    per iteration, the same weights and the same average, bit for bit."""
    ref_losses, losses = tmp_path / "ref.jsonl", tmp_path / "losses.jsonl"
    train(toy.write_config(tmp_path, "ref.yaml", losses=ref_losses, **_ema_overrides(evaluate, repeat_aug=True)),
          work_dir=str(tmp_path / "ref"))
    stop = [dict(type="StopAtIterHook", at_iter=6)]  # 2 iterations into epoch 2
    with pytest.raises(KeyboardInterrupt):
        train(toy.write_config(tmp_path, "stop.yaml", losses=losses, **_ema_overrides(evaluate, stop, repeat_aug=True)),
              work_dir=str(tmp_path / "wd"))
    train(toy.write_config(tmp_path, "resume.yaml", losses=losses, **_ema_overrides(evaluate, repeat_aug=True)),
          work_dir=str(tmp_path / "wd"), resume="auto")
    assert toy.read_losses(losses) == toy.read_losses(ref_losses)
    a = load_checkpoint_file(str(tmp_path / "wd" / "epoch_4.pth"))
    b = load_checkpoint_file(str(tmp_path / "ref" / "epoch_4.pth"))
    for key in ("state_dict", "ema_state_dict"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
