"""CocoMetric and CocoResultsDumper against pycocotools run directly; tools/eval_coco.py and its
bad-input errors."""

import copy
import json
import os
import runpy
import sys

import numpy as np
import pytest
import torch
import yaml
from mmengine.evaluator import Evaluator
from mmengine.model import BaseModel
from mmengine.structures import InstanceData
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

import vitasks.data  # noqa: F401  (registers datasets and transforms)
import vitasks.evaluation  # noqa: F401  (registers the metrics)
import vitasks.models.data_preprocessors.det  # noqa: F401  (registers DetDataPreprocessor)
from vitasks.data.synthetic.det import make_det_dataset
from vitasks.engine import launch
from vitasks.errors import ConfigError, DataError
from vitasks.cli import main as cli_main
from vitasks.evaluation.coco import CocoMetric, CocoResultsDumper, evaluate_results_file


def main(argv):
    """tools/eval_coco.py."""
    return cli_main(["eval-coco", *argv])

from vitasks.registry import METRICS, MODELS
from vitasks.structures import DataSample

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Category ids in file order 10, 3, 7: labels are the sorted ids' positions.
CAT_IDS = (3, 7, 10)
LABEL_OF = {3: 0, 7: 1, 10: 2}
IMAGES = {1: (160, 200), 2: (64, 64), 3: (48, 40)}  # id -> (H, W); image 3 has no object


def rect_mask(shape, box):
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    m = np.zeros(shape, bool)
    m[y1:y2, x1:x2] = True
    return m


def ground_truth(path):
    """Large, medium and small objects of three categories, one crowd region; boxes xywh."""
    objects = [  # (image, category, box xywh, crowd)
        (1, 10, [20, 20, 120, 100], 0),   # large (12000 px)
        (1, 3, [150, 10, 40, 40], 0),     # medium
        (1, 7, [150, 120, 10, 10], 0),    # small
        (1, 7, [10, 130, 60, 25], 1),     # crowd region
        (2, 3, [5, 5, 20, 20], 0),
        (2, 10, [30, 30, 25, 30], 0),
    ]
    annotations = []
    for i, (img, cat, (x, y, w, h), crowd) in enumerate(objects):
        mask = rect_mask(IMAGES[img], (x, y, x + w, y + h))
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        segmentation = ({"size": list(IMAGES[img]), "counts": rle["counts"].decode()} if crowd
                        else [[x, y, x + w, y, x + w, y + h, x, y + h]])
        annotations.append({"id": 100 + i, "image_id": img, "category_id": cat, "bbox": [x, y, w, h],
                            "area": float(mask.sum()), "iscrowd": crowd, "segmentation": segmentation})
    data = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "height": h, "width": w} for i, (h, w) in IMAGES.items()],
        "annotations": annotations,
        "categories": [{"id": 10, "name": "ten"}, {"id": 3, "name": "three"}, {"id": 7, "name": "seven"}],
    }
    with open(path, "w") as f:
        json.dump(data, f)
    return path


# Hand-made predictions per image: (box xyxy, score, category id, mask box xyxy). Hits, a
# shifted hit, a wrong class, a false positive, a detection on the crowd region, one on image 3.
PREDICTIONS = {
    1: [((22, 18, 138, 122), 0.9, 10, (24, 20, 136, 118)),
        ((150, 12, 188, 50), 0.8, 3, (152, 10, 190, 52)),
        ((149, 119, 161, 131), 0.3, 7, (150, 120, 158, 128)),
        ((12, 131, 68, 154), 0.7, 7, (12, 131, 68, 154)),     # on the crowd region: ignored
        ((100, 100, 140, 140), 0.99, 3, (110, 110, 130, 130)),  # false positive: medium box, small mask
        ((20, 20, 140, 120), 0.4, 3, (20, 20, 140, 120))],     # right place, wrong class
    2: [((6, 4, 24, 26), 0.95, 3, (5, 5, 25, 25)),
        ((40, 35, 56, 60), 0.5, 10, (38, 34, 55, 60))],
    3: [((1, 1, 20, 20), 0.2, 7, (1, 1, 20, 20))],
}


def samples(img_ids=IMAGES, with_masks=True, rle=False):
    out = []
    for img_id in img_ids:
        preds = PREDICTIONS[img_id]
        inst = InstanceData()
        inst.bboxes = torch.tensor([p[0] for p in preds], dtype=torch.float32)
        inst.scores = torch.tensor([p[1] for p in preds])
        inst.labels = torch.tensor([LABEL_OF[p[2]] for p in preds])
        if with_masks:
            masks = np.stack([rect_mask(IMAGES[img_id], p[3]) for p in preds])
            inst.masks = torch.from_numpy(masks)
            if rle:
                inst.masks = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
        sample = DataSample(metainfo=dict(img_id=img_id, img_path=f"{img_id}.jpg", ori_shape=IMAGES[img_id]))
        sample.pred_instances = inst
        out.append(sample)
    return out


def reference_results(img_ids=IMAGES):
    """The same predictions written as COCO results by hand (no vitasks code)."""
    bbox, segm = [], []
    for img_id in img_ids:
        for (x1, y1, x2, y2), score, cat, mask_box in PREDICTIONS[img_id]:
            bbox.append({"image_id": img_id, "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "score": score})
            rle = mask_utils.encode(np.asfortranarray(rect_mask(IMAGES[img_id], mask_box).astype(np.uint8)))
            segm.append({"image_id": img_id, "category_id": cat, "segmentation": rle, "score": score})
    return bbox, segm


def pycocotools_stats(ann_file, results, iou_type, img_ids=None):
    gt = COCO(ann_file)
    ev = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), iou_type)
    if img_ids is not None:
        ev.params.imgIds = sorted(img_ids)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats


NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")


@pytest.fixture
def ann_file(tmp_path):
    return ground_truth(str(tmp_path / "instances_val.json"))


def dataset_meta(ann_file):
    return {"classes": ("three", "seven", "ten"), "cat_ids": CAT_IDS, "ann_file": ann_file}


def run_metric(ann_file, metric_cfg=None, **sample_kwargs):
    evaluator = Evaluator([METRICS.build(dict(type="CocoMetric", **(metric_cfg or {})))])
    evaluator.dataset_meta = dataset_meta(ann_file)
    batch = samples(**sample_kwargs)
    evaluator.process(data_samples=batch)
    return evaluator.evaluate(len(batch))


def test_metric_equals_pycocotools_on_a_hand_made_case(ann_file, monkeypatch):
    logged = []
    monkeypatch.setattr("vitasks.evaluation.coco.print_log", lambda msg, **kw: logged.append(msg))
    metrics = run_metric(ann_file)
    bbox, segm = reference_results()
    expected = {}
    for iou_type, results in (("bbox", bbox), ("segm", segm)):
        stats = pycocotools_stats(ann_file, results, iou_type)
        expected.update({f"coco/{iou_type}_{n}": float(stats[i]) for i, n in enumerate(NAMES)})
    assert metrics == expected
    # a real case: not all perfect, not all zero, all size ranges populated
    assert 0 < metrics["coco/bbox_mAP"] < 1 and 0 < metrics["coco/segm_mAP"] < 1
    assert metrics["coco/bbox_mAP_s"] != -1 and metrics["coco/bbox_mAP_l"] != -1
    text = "\n".join(logged)
    assert text.count("Average Precision") == 2 * 6 and text.count("Average Recall") == 2 * 6


def test_metric_takes_rle_masks_and_the_classwise_table(ann_file, monkeypatch):
    logged = []
    monkeypatch.setattr("vitasks.evaluation.coco.print_log", lambda msg, **kw: logged.append(msg))
    assert run_metric(ann_file, dict(classwise=True), rle=True) == run_metric(ann_file)
    table = logged[0][logged[0].index("bbox AP per category"):].splitlines()
    assert [line.split()[0] for line in table[2:5]] == ["three", "seven", "ten"]


def test_box_only_metric_and_a_subset_of_images(ann_file):
    metrics = run_metric(ann_file, dict(metric="bbox"), img_ids=[1, 3], with_masks=False)
    assert set(metrics) == {f"coco/bbox_{n}" for n in NAMES}
    bbox, _ = reference_results(img_ids=[1, 3])
    stats = pycocotools_stats(ann_file, bbox, "bbox", img_ids=[1, 3])  # only the images evaluated
    assert metrics == {f"coco/bbox_{n}": float(stats[i]) for i, n in enumerate(NAMES)}


def test_no_detections_scores_zero(ann_file):
    empty = samples()
    for s in empty:
        s.pred_instances = s.pred_instances[torch.zeros(0, dtype=torch.long)]
    evaluator = Evaluator([CocoMetric()])
    evaluator.dataset_meta = dataset_meta(ann_file)
    evaluator.process(data_samples=empty)
    metrics = evaluator.evaluate(len(empty))
    assert metrics["coco/bbox_mAP"] == 0.0 and metrics["coco/segm_mAP_50"] == 0.0


def test_metric_input_errors(ann_file):
    metric = CocoMetric()
    metric.dataset_meta = dataset_meta(ann_file)
    wrong_size = samples(img_ids=[2])
    wrong_size[0].pred_instances.masks = torch.zeros(2, 10, 10, dtype=torch.bool)
    with pytest.raises(DataError, match="pasted at the original size"):
        metric.process(None, wrong_size)
    no_masks = samples(img_ids=[2], with_masks=False)
    with pytest.raises(DataError, match="no masks.*metric: \\[bbox\\]"):
        metric.process(None, no_masks)
    bad_label = samples(img_ids=[2])
    bad_label[0].pred_instances.labels = torch.tensor([0, 3])
    with pytest.raises(DataError, match="label 3 is outside 0..2"):
        metric.process(None, bad_label)
    with pytest.raises(ConfigError, match="subset of"):
        CocoMetric(metric=["bbox", "keypoints"])
    no_file = CocoMetric()
    no_file.dataset_meta = {"cat_ids": CAT_IDS}
    with pytest.raises(ConfigError, match="no annotation file"):
        no_file.compute_metrics([(1, [])])
    foreign = CocoMetric()
    foreign.dataset_meta = dataset_meta(ann_file)
    with pytest.raises(DataError, match="not in"):
        foreign.compute_metrics([(42, [])])


def test_dump_round_trips_through_eval_coco_and_plain_pycocotools(ann_file, tmp_path, capsys):
    metrics = run_metric(ann_file)
    out = str(tmp_path / "dump" / "results.json")
    dumper = CocoResultsDumper(out_path=out)
    dumper.dataset_meta = dataset_meta(ann_file)
    batch = samples()
    dumper.process(None, batch)
    assert dumper.evaluate(len(batch)) == {}
    with open(out) as f:
        dumped = json.load(f)
    # labels mapped back to the file's category ids (label 2 -> id 10 ...), boxes as xywh
    bbox, _ = reference_results()
    ids = [(r["image_id"], r["category_id"]) for r in bbox]
    assert [(d["image_id"], d["category_id"]) for d in dumped] == ids
    np.testing.assert_allclose([d["bbox"] for d in dumped], [r["bbox"] for r in bbox])
    assert all(isinstance(d["segmentation"]["counts"], str) for d in dumped)
    # tools/eval_coco.py's logic gives the metric's numbers exactly
    scored, text = evaluate_results_file(out, ann_file)
    assert scored == metrics
    assert text.count("Average Precision") == 12
    # plain pycocotools on the files gives them too (boxes: results.json; masks: results.segm.json)
    box_stats = pycocotools_stats(ann_file, dumped, "bbox")
    with open(str(tmp_path / "dump" / "results.segm.json")) as f:
        segm_stats = pycocotools_stats(ann_file, json.load(f), "segm")
    assert [metrics[f"coco/bbox_{n}"] for n in NAMES] == [float(v) for v in box_stats[:6]]
    assert [metrics[f"coco/segm_{n}"] for n in NAMES] == [float(v) for v in segm_stats[:6]]
    # the command writes the same numbers
    metrics_path = str(tmp_path / "metrics.json")
    capsys.readouterr()
    assert main([out, ann_file, "--out", metrics_path]) == 0
    printed = capsys.readouterr().out
    assert "coco/segm_mAP_75" in printed and printed.count("Average Precision") == 12
    with open(metrics_path) as f:
        assert json.load(f) == metrics


def test_box_only_results_file_scores_boxes_only(ann_file, tmp_path):
    bbox, _ = reference_results()
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(bbox))
    scored, _ = evaluate_results_file(str(path), ann_file)
    stats = pycocotools_stats(ann_file, bbox, "bbox")
    assert scored == {f"coco/bbox_{n}": float(stats[i]) for i, n in enumerate(NAMES)}


@pytest.mark.parametrize("content, message", [
    ([], "holds no detections"),
    ({"annotations": []}, "is a JSON list of detections"),
    ([{"image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 1.0},
      {"image_id": 77, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 1.0},
      {"image_id": 78, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 1.0}],
     "2 image id\\(s\\) are not in the annotations: 77, 78"),
    ([{"image_id": 1, "category_id": 2, "bbox": [0, 0, 5, 5], "score": 1.0}], "category id\\(s\\) 2 are not"),
    ([{"image_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0}], "detection 0 lacks category_id"),
    ([{"image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 1.0,
       "segmentation": {"size": [160, 200], "counts": "PPYo1"}},
      {"image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 1.0}],
     "1 of 2 detections have a `segmentation`"),
])
def test_bad_results_files(ann_file, tmp_path, capsys, content, message):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DataError, match=message) as err:
        evaluate_results_file(str(path), ann_file)
    assert str(path) in str(err.value)
    assert main([str(path), ann_file]) == 2
    assert "vitasks: error:" in capsys.readouterr().err


def test_missing_and_unreadable_files(ann_file, tmp_path):
    with pytest.raises(DataError, match="results file not found"):
        evaluate_results_file(str(tmp_path / "none.json"), ann_file)
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(DataError, match="broken.json"):
        evaluate_results_file(str(broken), ann_file)
    with pytest.raises(DataError, match="annotation file not found"):
        evaluate_results_file(str(broken), str(tmp_path / "no_annotations.json"))


def test_tools_eval_coco_script(ann_file, tmp_path, monkeypatch, capsys):
    path = tmp_path / "empty.json"
    path.write_text("[]")
    monkeypatch.setattr(sys, "argv", ["eval_coco.py", str(path), ann_file])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(os.path.join(REPO, "tools", "eval_coco.py"), run_name="__main__")
    assert exit_.value.code == 2 and "holds no detections" in capsys.readouterr().err


@MODELS.register_module(force=True)
class CocoOracleForTest(BaseModel):
    """Predicts each image's ground truth, mapped back to the original image's pixels."""

    def __init__(self, data_preprocessor=None):
        super().__init__(data_preprocessor=data_preprocessor)
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, inputs, data_samples=None, mode="tensor"):
        assert mode == "predict" and inputs.shape[-2:] == (64, 64)  # padded by DetDataPreprocessor
        for sample in data_samples:
            gt = sample.gt_instances
            sx, sy = sample.metainfo.get("scale_factor", (1.0, 1.0))
            sample.pred_instances = InstanceData(
                bboxes=gt.bboxes / torch.tensor([sx, sy, sx, sy]), labels=gt.labels,
                scores=torch.linspace(1.0, 0.5, len(gt)), masks=gt.masks)
        return data_samples


def test_test_command_with_coco_data_metric_and_dump(tmp_path):
    """tools/test.py's path: CocoDataset -> PackDetInputs -> DetDataPreprocessor -> model ->
    CocoMetric and --dump; an oracle scores 1.0 and the dump scores what the metric reports."""
    root = str(tmp_path / "det")
    make_det_dataset(root, seed=3, num_train=0, num_val=4, img_size=48, num_classes=4)
    dataset = dict(type="CocoDataset", data_root=root, ann_file="annotations/instances_val2017.json",
                   img_dir="val2017", num_classes=4, test_mode=True,
                   pipeline=[{"type": "LoadImage"}, {"type": "LoadDetAnnotations"}, {"type": "PackDetInputs"}])
    cfg = dict(
        default_scope="vitasks",
        model=dict(type="CocoOracleForTest", data_preprocessor=dict(type="DetDataPreprocessor", size=[64, 64])),
        test_dataloader=dict(batch_size=3, num_workers=0, sampler=dict(type="DefaultSampler", shuffle=False),
                             dataset=dataset),
        test_cfg={}, test_evaluator=dict(type="CocoMetric"), test_dump=dict(type="CocoResultsDumper"),
        log_level="WARNING",
    )
    config = tmp_path / "oracle.yaml"
    config.write_text(yaml.safe_dump(cfg))
    ckpt = tmp_path / "oracle.pth"
    torch.save({"state_dict": CocoOracleForTest().state_dict()}, ckpt)
    dump = tmp_path / "results.json"
    metrics = launch.test(str(config), str(ckpt), work_dir=str(tmp_path / "wd"), dump=str(dump))
    assert metrics["coco/bbox_mAP"] == 1.0 and metrics["coco/segm_mAP"] == 1.0
    assert set(metrics) == {f"coco/{t}_{n}" for t in ("bbox", "segm") for n in NAMES}
    scored, _ = evaluate_results_file(str(dump), os.path.join(root, "annotations/instances_val2017.json"))
    assert scored == metrics
