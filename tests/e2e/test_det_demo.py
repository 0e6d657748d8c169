"""End to end: the detection demo config trains on generated COCO-layout data (shapes drawn over
crops of a photograph), learns boxes and masks (far above random boxes of the training set's
sizes, scored the same way), is evaluated with pycocotools, and its ``--dump`` results file
scores the same numbers through ``tools/eval_coco.py``'s function."""

import json
import os

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from vitasks.data.synthetic.det import make_det_dataset
from vitasks.engine import launch  # not `import test`: pytest would collect it
from vitasks.evaluation.coco import evaluate_results_file

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo", "det_synthetic.yaml")
ITERS = 150
NUM_CLASSES = 3
SIZE = 64


@pytest.fixture
def one_thread():
    """One intra-op thread: with two, OpenMP's spinning barriers make many small kernels several
    times slower whenever another process competes for the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rectangle_rle(x, y, w, h, height, width) -> dict:
    """The box as a mask, in the RLE that results files carry."""
    rle = mask_utils.frPyObjects([[x, y, x + w, y, x + w, y + h, x, y + h]], height, width)[0]
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def random_box_results(data: str, path: str, per_image: int = 100, seed: int = 0) -> None:
    """A COCO results file of chance detections: per validation image ``per_image`` boxes (as
    many as pycocotools counts) of the training set's box sizes, at uniform places, of uniform
    categories and scores, each with its rectangle as mask."""
    with open(os.path.join(data, "annotations", "instances_train2017.json")) as f:
        train = json.load(f)
    with open(os.path.join(data, "annotations", "instances_val2017.json")) as f:
        val = json.load(f)
    sizes = np.array([a["bbox"][2:] for a in train["annotations"]])
    categories = [c["id"] for c in val["categories"]]
    rng = np.random.default_rng(seed)
    results = []
    for image in val["images"]:
        for w, h in sizes[rng.integers(len(sizes), size=per_image)]:
            x = rng.uniform(0, image["width"] - w)
            y = rng.uniform(0, image["height"] - h)
            results.append({"image_id": image["id"], "category_id": int(rng.choice(categories)),
                            "bbox": [x, y, w, h], "score": float(rng.uniform()),
                            "segmentation": rectangle_rle(x, y, w, h, image["height"], image["width"])})
    with open(path, "w") as f:
        json.dump(results, f)


def test_det_demo_learns_boxes_and_masks_and_dumps(tmp_path, one_thread, in_process_loaders):
    # Shapes drawn light or dark over crops of a photograph ("photo" style): objects on real
    # backgrounds.
    data = make_det_dataset(str(tmp_path / "data"), num_train=64, num_val=16, img_size=SIZE,
                            num_classes=NUM_CLASSES, empty_prob=0.0, style="photo")
    work = str(tmp_path / "work")
    # A shortened schedule of the demo at 64 px (anchors halved with the objects), evaluated once.
    options = [
        f"data_root={data}",
        f"num_classes={NUM_CLASSES}",
        f"img_size={SIZE}",
        f"input_size=[{SIZE},{SIZE}]",
        "model.rpn_head.anchor_sizes=[8,16,32,64]",
        f"train_cfg.max_iters={ITERS}",
        f"train_cfg.val_interval={ITERS}",
        "param_scheduler.0.end=20",
        "param_scheduler.1.begin=20",
        f"param_scheduler.1.end={ITERS}",
        f"default_hooks.checkpoint.interval={ITERS}",
        *in_process_loaders,
    ]
    launch.train(CONFIG, work_dir=work, cfg_options=options)
    with open(os.path.join(work, "last_checkpoint")) as f:
        checkpoint = f.read().strip()
    dump = str(tmp_path / "results.json")
    metrics = launch.test(CONFIG, checkpoint, work_dir=str(tmp_path / "test"), dump=dump, cfg_options=options)

    names = [f"coco/{kind}_mAP{suffix}" for kind in ("bbox", "segm") for suffix in ("", "_50", "_75", "_s", "_m", "_l")]
    assert set(names) <= set(metrics)
    with open(tmp_path / "test" / "metrics.json") as f:
        assert json.load(f) == metrics

    # Chance: random boxes of the training set's sizes (mean over 3 draws), scored the same way.
    annotations = os.path.join(data, "annotations", "instances_val2017.json")
    chance = {}
    for seed in range(3):
        random_box_results(data, str(tmp_path / f"random{seed}.json"), seed=seed)
        scored, _ = evaluate_results_file(str(tmp_path / f"random{seed}.json"), annotations)
        for name in ("coco/bbox_mAP_50", "coco/segm_mAP_50"):
            chance[name] = chance.get(name, 0.0) + scored[name] / 3
    # 150 iterations from scratch only start to learn. Measured with the demo's recipe of session
    # 11 (randomness.seed 0 / 1 / 2 / 3): box mAP_50 0.208 / 0.153 / 0.215 / 0.244, mask mAP_50
    # 0.136 / 0.101 / 0.163 / 0.177, against chance 0.009 and 0.005 (bars 0.059 and 0.055). With
    # 120 iterations two seeds scored masks of 0.058 and 0.057, too near the bar for a test that
    # must pass on every CPU. The runs are seeded, so on one machine the margins are exact
    # repeats; the spread between seeds stands for the rounding of another CPU. The full demo
    # schedule is what reaches the demo's numbers.
    for name in ("coco/bbox_mAP_50", "coco/segm_mAP_50"):
        assert metrics[name] > max(3 * chance[name], chance[name] + 0.05), (name, metrics, chance)

    # pycocotools alone, on the dumped file, gives the reported numbers.
    rescored, _ = evaluate_results_file(dump, annotations)
    for name in names:
        assert rescored[name] == pytest.approx(metrics[name], abs=1e-12), name
