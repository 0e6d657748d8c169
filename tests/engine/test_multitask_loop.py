"""MultiTaskTrainLoop / MultiTaskValLoop: joint training of the demo's three tasks
(classification, segmentation, detection) on tiny generated data, prefixed metrics, the
schedule, and resume reproducing the uninterrupted run."""

import json
import os

import pytest
import torch

from vitasks.data.synthetic.cls import make_cls_dataset
from vitasks.data.synthetic.det import make_det_dataset
from vitasks.data.synthetic.seg import make_seg_dataset
from vitasks.engine.multitask_loop import TaskSchedule

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo", "multitask_synthetic.yaml")


@pytest.fixture(scope="module")
def data_roots(tmp_path_factory):
    root = tmp_path_factory.mktemp("mt_data")
    cls_root, _ = make_cls_dataset(str(root / "cls"), num_classes=3, train_per_class=4, val_per_class=2, size=32)
    seg_root = make_seg_dataset(str(root / "seg"), num_train=6, num_val=3, img_size=32, num_classes=3)
    det_root = make_det_dataset(str(root / "det"), num_train=6, num_val=3, img_size=32, num_classes=3, empty_prob=0.0)
    return cls_root, seg_root, det_root


TASKS = ("cls", "seg", "det")


def tiny_options(cls_root, seg_root, det_root, max_iters=4, **train):
    opts = [f"cls_data_root={cls_root}", "cls_classes=3", f"seg_data_root={seg_root}", "seg_classes=3",
            f"det_data_root={det_root}", "det_classes=3", "det_input_size=[32,32]",
            "model.tasks.det.rpn_head.anchor_sizes=[8,16,32,64]",
            "embed_dim=32", "model.backbone.depth=2", "model.backbone.num_heads=2",
            "model.backbone.stem.channels=[8,16,32]", "model.backbone.stem.strides=[2,2,2]",
            "model.tasks.seg.data_preprocessor.size=[32,32]", "model.tasks.seg.decode_head.channels=8",
            f"train_cfg.max_iters={max_iters}", f"train_cfg.val_interval={max_iters}",
            "default_hooks.checkpoint.interval=2", "default_hooks.logger.interval=1",
            "param_scheduler=[]", "randomness.seed=3"]
    for stage in ("train", "val"):
        for task in TASKS:
            opts += [f"{stage}_dataloader.tasks.{task}.num_workers=0",
                     f"{stage}_dataloader.tasks.{task}.persistent_workers=false",
                     f"{stage}_dataloader.tasks.{task}.batch_size=2"]
    opts += ["train_dataloader.tasks.seg.dataset.pipeline.3.crop_size=[32,32]",
             "train_dataloader.tasks.seg.dataset.pipeline.2.scale=[64,32]",
             "train_dataloader.tasks.cls.dataset.pipeline.1.size=32",
             "val_dataloader.tasks.cls.dataset.pipeline.1.size=32",
             "val_dataloader.tasks.seg.dataset.pipeline.1.scale=[64,32]"]
    opts += [f"train_cfg.{k}={v}" for k, v in train.items()]
    return opts


def weights_of(work_dir, name):
    from vitasks.apis import read_checkpoint

    return read_checkpoint(os.path.join(work_dir, name))[0]


def test_schedule_positions_follow_from_the_iteration():
    robin = TaskSchedule(["a", "b", "c"], "round_robin")
    assert [robin.tasks_at(i)[0] for i in range(5)] == ["a", "b", "c", "a", "b"]
    assert robin.batches_before(5) == {"a": 2, "b": 2, "c": 1}
    weighted = TaskSchedule(["a", "b"], "weighted", {"a": 3, "b": 1}, seed=7)
    draws = [weighted.tasks_at(i)[0] for i in range(400)]
    # brute force: counting the draws gives the positions; the frequencies follow the weights
    assert weighted.batches_before(400) == {"a": draws.count("a"), "b": draws.count("b")}
    assert 0.65 < draws.count("a") / 400 < 0.85
    assert TaskSchedule(["a", "b"], accumulate=True).batches_before(3) == {"a": 3, "b": 3}


def test_joint_run_resumed_reproduces_the_uninterrupted_one(tmp_path, data_roots):
    """Weighted sampling: the hardest case for resuming (each task's position follows from the
    seeded draws of the iterations before)."""
    from vitasks.engine.launch import train as train_run

    opts = tiny_options(*data_roots, schedule="weighted") + ["default_hooks.checkpoint.save_best=null"]
    full = str(tmp_path / "full")
    runner = train_run(CONFIG, work_dir=full, cfg_options=opts)
    # validation metrics, prefixed per task, with their mean
    scalars = [json.loads(line) for line in open(os.path.join(full, runner.timestamp, "vis_data", "scalars.json"))]
    val = [s for s in scalars if "cls/accuracy/top1" in s][-1]
    assert {"seg/mIoU", "seg/aAcc", "mean"} <= set(val)
    assert {"det/coco/bbox_mAP_50", "det/coco/segm_mAP"} <= set(val)
    # the mean is in percent: COCO's AP (a fraction) counts times 100
    parts = (val["cls/accuracy/top1"], val["seg/mIoU"], 100 * val["det/coco/bbox_mAP_50"])
    assert val["mean"] == pytest.approx(sum(parts) / 3, abs=0.01)
    # interrupted after iteration 2 (its checkpoint), then resumed
    part = str(tmp_path / "part")
    train_run(CONFIG, work_dir=part, cfg_options=opts[:] + ["train_cfg.max_iters=2"])
    first = weights_of(part, "iter_2.pth")
    resumed_opts = opts + [f"resume={os.path.join(part, 'iter_2.pth')}"]
    train_run(CONFIG, work_dir=part, cfg_options=resumed_opts)
    a, b = weights_of(full, "iter_4.pth"), weights_of(part, "iter_4.pth")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # iterations 2 and 3 changed the shared backbone and the heads of the tasks drawn for them,
    # and left the other heads exactly as they were (no gradient: the optimizer skips them)
    assert not torch.equal(first["backbone.blocks.0.attn.qkv.weight"], a["backbone.blocks.0.attn.qkv.weight"])
    trained = {t for i in (2, 3) for t in runner.train_loop.schedule.tasks_at(i)}
    heads = {"cls": "tasks.cls.head.fc.weight", "seg": "tasks.seg.decode_head.conv_seg.weight",
             "det": "tasks.det.roi_head.box_head.cls_score.weight"}
    for task, key in heads.items():
        assert torch.equal(first[key], a[key]) == (task not in trained), (task, trained)


def test_test_writes_prefixed_metrics_json(tmp_path, data_roots):
    from vitasks.engine.launch import test as test_run
    from vitasks.engine.launch import train as train_run

    opts = tiny_options(*data_roots, max_iters=2, accumulate="true")  # both tasks in each step
    work = str(tmp_path / "w")
    train_run(CONFIG, work_dir=work, cfg_options=opts)
    metrics = test_run(CONFIG, os.path.join(work, "iter_2.pth"), work_dir=str(tmp_path / "t"), cfg_options=opts)
    written = json.load(open(tmp_path / "t" / "metrics.json"))
    assert written == metrics
    assert {"cls/accuracy/top1", "cls/accuracy/top5", "seg/mIoU", "seg/aAcc", "seg/mAcc", "det/coco/bbox_mAP",
            "det/coco/segm_mAP_50", "mean"} <= set(written)
    assert os.path.isfile(os.path.join(work, "best_mean_iter_2.pth"))  # save_best: mean


def test_a_task_whose_data_has_another_class_count_is_named(tmp_path, data_roots):
    from vitasks.engine.launch import train as train_run
    from vitasks.errors import VitasksError

    opts = tiny_options(*data_roots) + ["model.tasks.cls.head.num_classes=7",
                                        "model.tasks.cls.data_preprocessor.num_classes=7"]
    with pytest.raises(VitasksError, match="task 'cls'"):
        train_run(CONFIG, work_dir=str(tmp_path / "w"), cfg_options=opts)


def test_ddp_two_processes_match_one_process_with_the_summed_batch(tmp_path, data_roots):
    """torchrun, gloo, 2 processes: the joint loop's DDP path. Iteration 0 trains cls only, so
    the seg and det heads take no part in the step (find_unused_parameters); the weights equal
    those of one process whose cls batch is both processes' batches together. (A patch stem:
    the conv stem's batch norm would see 2 images per process against 4.)"""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from vitasks.engine.checkpoint import load_checkpoint_file
    from vitasks.engine.launch import train as train_run

    repo = Path(__file__).resolve().parents[2]
    config = tmp_path / "ddp.yaml"
    config.write_text(f"_base_: ['{os.path.abspath(CONFIG)}']\n"
                      "model: {backbone: {stem: {_delete_: true, type: PatchEmbed}}}\n"
                      "find_unused_parameters: true\n")
    opts = [o for o in tiny_options(*data_roots, max_iters=1) if not o.startswith("model.backbone.stem")]
    opts += ["train_cfg.val_begin=100", "default_hooks.checkpoint.interval=1", "default_hooks.checkpoint.save_best=null"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PORT=str(port), PYTHON=sys.executable, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    ddp_dir = tmp_path / "ddp"
    proc = subprocess.run(["bash", str(repo / "tools" / "dist_train.sh"), str(config), "2", "--work-dir", str(ddp_dir),
                           "--cfg-options", *opts], env=env, cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = load_checkpoint_file(str(ddp_dir / "iter_1.pth"))["state_dict"]

    single_dir = str(tmp_path / "single")
    train_run(str(config), work_dir=single_dir, cfg_options=opts + ["train_dataloader.tasks.cls.batch_size=4"])
    ref = load_checkpoint_file(os.path.join(single_dir, "iter_1.pth"))["state_dict"]
    assert ddp.keys() == ref.keys()
    for key, value in ref.items():
        torch.testing.assert_close(ddp[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # and that step moved the backbone and the cls head (it is not a comparison of two no-ops)
    first = weights_of(single_dir, "iter_1.pth")
    assert first["tasks.cls.head.fc.weight"].abs().sum() > 0
