"""A two-task model (classification + segmentation on one backbone) trained by 2 processes (torchrun,
gloo) under FSDP and under DDP gives the weights of one process whose batches are both processes'
batches together: round robin under FSDP (with its validation, and a resume), and
``accumulate: true`` (every task in each step) under FSDP and DDP.

The equality holds because every loss here is a mean over samples (or pixels) of equal count on
each rank: cross-entropy for both tasks (no Dice, no class weights from the batch), no batch norm
(a patch stem, an FCN head without conv blocks), no drop path. The distributed runs share one
torchrun launch (multitask_dist_worker.py).
"""

import glob
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitasks.config import dump_config, load_config
from vitasks.data.synthetic.cls import make_cls_dataset
from vitasks.data.synthetic.seg import make_seg_dataset
from vitasks.engine.checkpoint import load_checkpoint_file
from vitasks.engine.launch import train

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEMO = REPO / "configs" / "demo" / "multitask_synthetic.yaml"
CLS_HEAD = "tasks.cls.head.fc.weight"
SEG_HEAD = "tasks.seg.decode_head.conv_seg.weight"


def two_task_config(directory: Path) -> str:
    """The demo's cls and seg tasks on a 2-block ViT of width 32, 32 px images, batches of 2 per
    task, 2 iterations, a checkpoint every iteration; written as a YAML file."""
    cls_root, _ = make_cls_dataset(str(directory / "cls"), num_classes=3, train_per_class=4, val_per_class=2, size=32)
    seg_root = make_seg_dataset(str(directory / "seg"), num_train=6, num_val=3, img_size=32, num_classes=3)
    options = [f"cls_data_root={cls_root}", "cls_classes=3", f"seg_data_root={seg_root}", "seg_classes=3",
               "embed_dim=32", "model.backbone.depth=2", "model.backbone.num_heads=2",
               "model.backbone.stem.channels=[8,16,32]", "model.backbone.stem.strides=[2,2,2]",
               "model.backbone.drop_path_rate=0.0",
               "model.tasks.seg.data_preprocessor.size=[32,32]",
               "model.tasks.seg.decode_head.num_convs=0", "model.tasks.seg.decode_head.channels=32",
               "model.tasks.seg.decode_head.loss_decode=[{type: CrossEntropyLoss}]",
               "train_cfg.max_iters=2", "train_cfg.val_interval=2", "train_cfg.val_begin=100",
               "default_hooks.checkpoint.interval=1", "default_hooks.checkpoint.max_keep_ckpts=-1",
               "default_hooks.checkpoint.save_best=null", "default_hooks.logger.interval=1",
               "param_scheduler=[]", "randomness.seed=3",
               "train_dataloader.tasks.seg.dataset.pipeline.3.crop_size=[32,32]",
               "train_dataloader.tasks.seg.dataset.pipeline.2.scale=[64,32]",
               "train_dataloader.tasks.cls.dataset.pipeline.1.size=32",
               "val_dataloader.tasks.cls.dataset.pipeline.1.size=32",
               "val_dataloader.tasks.seg.dataset.pipeline.1.scale=[64,32]"]
    for stage in ("train", "val"):
        for task in ("cls", "seg"):
            options += [f"{stage}_dataloader.tasks.{task}.{key}" for key in
                        ("num_workers=0", "persistent_workers=false", "batch_size=2")]
    cfg = load_config(str(DEMO), options).to_dict()
    cfg["model"]["backbone"]["stem"] = {"type": "PatchEmbed"}  # no batch norm (the conv stem has)
    for section in ("model", "train_dataloader", "val_dataloader", "test_dataloader", "val_evaluator",
                    "test_evaluator"):
        del cfg[section]["tasks"]["det"]
    del cfg["model"]["out_indices"]["det"], cfg["model"]["loss_weights"]["det"]
    for section in ("val_evaluator", "test_evaluator"):
        cfg[section]["mean_of"] = ["cls/accuracy/top1", "seg/mIoU"]
    for key in ("cls_data_root", "seg_data_root", "det_data_root", "cls_classes", "seg_classes", "det_classes",
                "embed_dim", "det_input_size"):
        del cfg[key]
    path = directory / "two_tasks.yaml"
    dump_config(cfg, path)
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(work_dir: Path, iteration: int) -> dict:
    return load_checkpoint_file(str(work_dir / f"iter_{iteration}.pth"))["state_dict"]


def assert_weights_close(a: dict, b: dict) -> None:
    """Equal up to fp32 reduction order (a sum over 2 ranks against one over the whole batch)."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def val_metrics(work_dir: Path) -> dict:
    (scalars,) = glob.glob(str(work_dir / "*" / "vis_data" / "scalars.json"))
    return [r for r in map(json.loads, open(scalars)) if "cls/accuracy/top1" in r][-1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The torchrun launch (multitask_dist_worker.py) and the two single-process references, with
    batches of 4 per task."""
    root = tmp_path_factory.mktemp("mt_dist")
    config = two_task_config(root)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
                           str(HERE / "multitask_dist_worker.py"), config, str(root / "dist")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    combined = ["train_dataloader.tasks.cls.batch_size=4", "train_dataloader.tasks.seg.batch_size=4"]
    train(config, work_dir=str(root / "single"), cfg_options=combined + ["train_cfg.val_begin=1"])
    train(config, work_dir=str(root / "single_accumulate"),
          cfg_options=combined + ["train_cfg.accumulate=true", "train_cfg.max_iters=1"])
    return root, proc.stdout + proc.stderr


def test_fsdp_round_robin_equals_one_process_with_the_combined_batch(runs):
    root, log = runs
    assert "FSDP (fully_shard) wraps the model: 2 transformer blocks" in log
    fsdp, single = root / "dist" / "fsdp", root / "single"
    for iteration in (1, 2):
        saved = weights(fsdp, iteration)
        assert all(type(v) is torch.Tensor for v in saved.values())  # full state dicts, no DTensors
        assert_weights_close(saved, weights(single, iteration))
    # Iteration 0 trained cls only: the cls head left its zero initialisation; the seg head had no
    # gradient, so the optimizer left it exactly as initialised (a zero gradient would have moved
    # it by AdamW's weight decay) and holds no state for it. Iteration 1 (seg) the other way round.
    first, second = weights(fsdp, 1), weights(fsdp, 2)
    assert first[CLS_HEAD].abs().sum() > 0
    assert torch.equal(first[SEG_HEAD], weights(single, 1)[SEG_HEAD])
    optim_state = load_checkpoint_file(str(fsdp / "iter_1.pth"))["optimizer"]["state"]
    assert CLS_HEAD in optim_state and SEG_HEAD not in optim_state
    assert torch.equal(second[CLS_HEAD], first[CLS_HEAD])
    assert not torch.equal(second[SEG_HEAD], first[SEG_HEAD])
    # validation under FSDP (each rank half of each task's set) scores as the single process
    fsdp_val, single_val = val_metrics(fsdp), val_metrics(single)
    for name in ("cls/accuracy/top1", "seg/mIoU", "seg/aAcc", "mean"):
        assert fsdp_val[name] == pytest.approx(single_val[name], abs=0.05), name


def test_fsdp_resumed_run_reproduces_the_uninterrupted_one(runs):
    """Resumed after iteration 1, when the seg head had no optimizer state yet."""
    root, _ = runs
    resumed, full = weights(root / "dist" / "fsdp_resumed", 2), weights(root / "dist" / "fsdp", 2)
    assert resumed.keys() == full.keys()
    for key in full:
        assert torch.equal(resumed[key], full[key]), key


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_accumulate_equals_one_process_with_the_combined_batches(runs, strategy):
    """Both tasks' batches in one step: the task gradients sum (FSDP: reduce-scattered after each
    task's backward; DDP: local under no_sync, all-reduced in the last task's backward)."""
    root, _ = runs
    distributed, single = weights(root / "dist" / f"{strategy}_accumulate", 1), weights(root / "single_accumulate", 1)
    assert_weights_close(distributed, single)
    # both heads trained in that one step: the cls head left zero, the seg head its initial value
    # (which the round-robin run's first step, cls only, kept)
    assert single[CLS_HEAD].abs().sum() > 0
    assert not torch.equal(single[SEG_HEAD], weights(root / "single", 1)[SEG_HEAD])


def test_weighted_schedule_draws_the_same_tasks_on_every_rank(monkeypatch):
    """With ``randomness.diff_rank_seed`` mmengine gives rank r the seed ``seed + r`` (its own
    augmentations); the task schedule must still agree across ranks (FSDP's collectives)."""
    from types import SimpleNamespace

    from vitasks.engine import multitask_loop

    schedules = []
    for rank in (0, 1):
        monkeypatch.setattr(multitask_loop, "get_rank", lambda rank=rank: rank)
        runner = SimpleNamespace(seed=3 + rank, _randomness_cfg={"seed": 3, "diff_rank_seed": True})
        seed = multitask_loop._schedule_seed(runner)
        assert seed == 3
        schedule = multitask_loop.TaskSchedule(["cls", "seg"], "weighted", {"cls": 1, "seg": 1}, seed=seed)
        schedules.append([schedule.tasks_at(i)[0] for i in range(32)])
    assert schedules[0] == schedules[1]
    assert set(schedules[0]) == {"cls", "seg"}
