"""Reproducible training with the classification demo's own random augmentations switched on
(random resized crops, flips, colour jitter from albumentations; Mixup/CutMix; drop path):

- two runs with the same seed end with bit-identical weights (and another seed does not);
- the number of data-loading workers changes nothing;
- a run SIGKILLed at random moments, during checkpoint saves included, and resumed each time
  with ``--resume`` ends with the uninterrupted run's weights, and ``last_checkpoint`` never
  names a partial file (four kills: two at random moments of training, two half-way through
  writing a checkpoint);
- with RandAugment, RandomErasing, repeated augmentation (``RepeatAugSampler``) and the weights'
  EMA (``EMAHook``) all on, a run stopped mid-epoch and resumed ends with the uninterrupted run's
  weights and average.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitasks.engine.checkpoint import load_checkpoint_file
from vitasks.engine.launch import train

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo" / "cls_synthetic.yaml"
EPOCHS = 4  # of 3 iterations (12 images, batches of 4)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A tiny dataset in the ImageNet layout: 3 classes of 4 training images (random blobs)."""
    root = tmp_path_factory.mktemp("repro_data")
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 1)):
        for label in range(3):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                img = rng.integers(0, 60, (40, 40, 3), dtype=np.uint8)
                y, x = rng.integers(4, 24, 2)
                img[y:y + 12 + 4 * label, x:x + 12] = 200
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


def _options(data_root, **extra):
    options = {
        "data_root": str(data_root),
        "num_classes": 3,
        "train_cfg.max_epochs": EPOCHS,
        "train_cfg.val_interval": 100,  # no validation: this is about training
        "train_dataloader.batch_size": 4,
        "train_dataloader.num_workers": 0,
        "train_dataloader.persistent_workers": "false",
        # mmengine validates once after the last epoch: in this process (a persistent worker of
        # one run, collected by the next run's gc.collect, costs torch's 5 s shutdown timeout).
        "val_dataloader.num_workers": 0,
        "val_dataloader.persistent_workers": "false",
        "default_hooks.checkpoint.interval": 1,
        "default_hooks.checkpoint.max_keep_ckpts": 2,
        "default_hooks.logger.interval": 1,
        # Every random draw the recipe can make, switched on whatever the demo's defaults are.
        "model.backbone.drop_path_rate": 0.2,
        "model.data_preprocessor.batch_augments": "{augments: [{type: Mixup, alpha: 0.8}, "
                                                  "{type: CutMix, alpha: 1.0}], probs: [0.4, 0.4]}",
        "log_level": "WARNING",
    }
    options.update(extra)
    return [f"{k}={v}" for k, v in options.items()]


def _final_weights(work_dir):
    return load_checkpoint_file(str(Path(work_dir) / f"epoch_{EPOCHS}.pth"))["state_dict"]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("repro_ref") / "wd"
    train(str(DEMO), work_dir=str(work_dir), cfg_options=_options(data_root))
    return _final_weights(work_dir)


def test_same_seed_same_weights_other_seed_other_weights(reference, data_root, tmp_path):
    train(str(DEMO), work_dir=str(tmp_path / "again"), cfg_options=_options(data_root))
    assert _same(_final_weights(tmp_path / "again"), reference)
    train(str(DEMO), work_dir=str(tmp_path / "seed1"),
          cfg_options=_options(data_root, **{"randomness.seed": 1}))
    assert not _same(_final_weights(tmp_path / "seed1"), reference)


def test_num_workers_changes_nothing(reference, data_root, tmp_path):
    train(str(DEMO), work_dir=str(tmp_path / "workers"),
          cfg_options=_options(data_root, **{"train_dataloader.num_workers": 2}))
    assert _same(_final_weights(tmp_path / "workers"), reference)


# DeiT's recipe pieces all on: RandAugment (timm's rand-m9-mstd0.5-inc1), RandomErasing after
# normalisation, repeated augmentation (3 repeats, the epoch length kept: 12 images per epoch)
# and the EMA of the weights.
REPEAT_AUG_EMA = {
    "train_dataloader.dataset.pipeline": "[{type: LoadImage}, {type: RandAugment, config_str: rand-m9-mstd0.5-inc1}, "
                                         "{type: Albu, transforms: [{type: RandomResizedCrop, "
                                         "size: ['${img_size}', '${img_size}'], scale: [0.6, 1.0]}]}, {type: PackInputs}]",
    "model.data_preprocessor.random_erasing": "{type: RandomErasing, probability: 0.5, mode: pixel}",
    "train_dataloader.sampler": "{type: RepeatAugSampler, num_repeats: 3, selected_round: 0}",
    "custom_hooks": "[{type: EMAHook, decay: 0.9, warmup: true}]",
}


def test_repeat_aug_and_ema_same_seed_and_stopped_then_resumed(reference, data_root, tmp_path):
    """With RandAugment, RandomErasing, RepeatAugSampler and EMAHook on, a run with the same seed
    stopped mid-epoch (interrupt checkpoint) and resumed ends with the uninterrupted run's weights
    and average, bit for bit; and the recipe changed the training (the weights are not the plain
    run's)."""
    def final(work_dir):
        ck = load_checkpoint_file(str(Path(work_dir) / f"epoch_{EPOCHS}.pth"))
        return ck["state_dict"], ck["ema_state_dict"]

    train(str(DEMO), work_dir=str(tmp_path / "a"), cfg_options=_options(data_root, **REPEAT_AUG_EMA))
    first = final(tmp_path / "a")
    trained = {k[len("module."):]: v for k, v in first[1].items() if k != "steps"}  # state_dict holds the average
    assert not _same(trained, reference) and not _same(first[0], trained)

    stop = dict(REPEAT_AUG_EMA, plugins="[vitasks_toy_plugin]",
                custom_hooks="[{type: EMAHook, decay: 0.9, warmup: true}, {type: StopAtIterHook, at_iter: 5}]")
    with pytest.raises(KeyboardInterrupt):
        train(str(DEMO), work_dir=str(tmp_path / "c"), cfg_options=_options(data_root, **stop))
    assert (tmp_path / "c" / "interrupted_iter_5.pth").is_file()  # 2 iterations into epoch 2
    train(str(DEMO), work_dir=str(tmp_path / "c"), resume="auto", cfg_options=_options(data_root, **REPEAT_AUG_EMA))
    assert all(_same(x, y) for x, y in zip(first, final(tmp_path / "c")))


def _command(data_root, work_dir, progress, resume):
    options = _options(
        data_root,
        plugins="[vitasks_fault_plugin]",
        custom_hooks=f"[{{type: ProgressHook, path: {progress}, delay: 0.05}}]",
    )
    return [sys.executable, str(REPO / "tools" / "train.py"), str(DEMO), "--work-dir", str(work_dir),
            *(["--resume"] if resume else []), "--cfg-options", *options]


def _env(kill_in_save=0):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    if kill_in_save:
        env["VITASKS_TEST_KILL_IN_SAVE"] = str(kill_in_save)
    return env


def _assert_last_checkpoint_readable(work_dir):
    last = Path(work_dir) / "last_checkpoint"
    if last.exists():
        checkpoint = load_checkpoint_file(last.read_text().strip())  # raises on a partial file
        assert {"state_dict", "optimizer", "meta"} <= set(checkpoint)


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_weights(data_root, tmp_path):
    # The uninterrupted run, as a process like the killed ones (same threads, same code path).
    ref_dir = tmp_path / "ref"
    subprocess.run(_command(data_root, ref_dir, tmp_path / "ref_progress", resume=False),
                   env=_env(), check=True, capture_output=True)
    reference = _final_weights(ref_dir)

    work_dir = tmp_path / "killed"
    rng = random.Random(0)
    # (kill during the n-th checkpoint save of the process) or (kill after k iterations + a pause)
    plan = [("save", 1), ("iter", rng.randint(1, 5)), ("save", 2), ("iter", rng.randint(1, 4))]
    kills = 0
    for attempt, (how, when) in enumerate(plan):
        progress = tmp_path / f"progress_{attempt}"
        proc = subprocess.Popen(_command(data_root, work_dir, progress, resume=attempt > 0),
                                env=_env(when if how == "save" else 0),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if how == "iter":
            # No wall-clock deadline: on a loaded machine the start-up alone can take minutes, and
            # a kill that never comes would let this attempt finish the run (fewer faults).
            while proc.poll() is None:
                if progress.exists() and len(progress.read_text().split()) >= when:
                    time.sleep(rng.uniform(0.0, 0.15))  # somewhere inside the next iteration or save
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.01)
        _, err = proc.communicate(timeout=900)  # a hang guard only
        if proc.returncode == -signal.SIGKILL:
            kills += 1
        else:
            assert proc.returncode == 0, err.decode()[-3000:]
        _assert_last_checkpoint_readable(work_dir)
        if (work_dir / f"epoch_{EPOCHS}.pth").exists():
            break
    assert kills >= 3, "the faults were not injected"
    # Whatever is left to do, uninterrupted.
    if not (work_dir / f"epoch_{EPOCHS}.pth").exists():
        subprocess.run(_command(data_root, work_dir, tmp_path / "progress_last", resume=True),
                       env=_env(), check=True, capture_output=True)
    assert _same(_final_weights(work_dir), reference)


def test_training_checkpoints_record_the_backbone_architecture(data_root, tmp_path, capsys):
    """A checkpoint of the demo names its backbone's settings; loading it into a config that
    changes one of them (LayerNorm eps) warns, naming the setting and both values."""
    from vitasks.apis import init_model

    train(str(DEMO), work_dir=str(tmp_path / "wd"),
          cfg_options=_options(data_root, **{"train_cfg.max_epochs": 1}))
    checkpoint = tmp_path / "wd" / "epoch_1.pth"
    meta = load_checkpoint_file(str(checkpoint))["meta"]
    assert meta["architecture"]["type"] == "VisionTransformer"
    assert meta["architecture"]["depth"] == len(init_model(str(DEMO), cfg_options=_options(data_root)).backbone.blocks)
    capsys.readouterr()
    init_model(str(DEMO), str(checkpoint), cfg_options=_options(data_root, **{"model.backbone.norm_eps": 1e-3}))
    assert "norm_eps: checkpoint 1e-06, config 0.001" in capsys.readouterr().out  # mmengine's logger
