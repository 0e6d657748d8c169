"""IoUMetric against a brute-force confusion matrix, and the PNG prediction dumper."""

import math

import cv2
import numpy as np
import pytest
import torch
from mmengine.evaluator import Evaluator

import vitasks.evaluation  # noqa: F401  (registers the metrics)
from vitasks.errors import ConfigError, DataError
from vitasks.evaluation.iou import IoUMetric, SegPredictionDumper
from vitasks.structures import DataSample, PixelData


def make_sample(pred, label, img_path="img.jpg", **meta):
    s = DataSample(metainfo=dict(img_path=img_path, **meta))
    s.pred_sem_seg = PixelData(data=torch.as_tensor(pred)[None])
    if label is not None:
        s.gt_sem_seg = PixelData(data=torch.as_tensor(label)[None])
    return s


def brute_force(pairs, num_classes, ignore_index=255):
    """Confusion matrix by a loop over pixels, then mmseg's formulas (independent of iou.py)."""
    conf = np.zeros((num_classes, num_classes), np.int64)  # rows: label, cols: prediction
    for pred, label in pairs:
        for p, t in zip(np.asarray(pred).ravel(), np.asarray(label).ravel()):
            if t == ignore_index:
                continue
            conf[t, p] += 1
    tp = np.diag(conf).astype(float)
    per_label = conf.sum(1).astype(float)
    per_pred = conf.sum(0).astype(float)
    iou, acc = [], []
    for k in range(num_classes):
        union = per_label[k] + per_pred[k] - tp[k]
        iou.append(tp[k] / union if union > 0 else math.nan)
        acc.append(tp[k] / per_label[k] if per_label[k] > 0 else math.nan)
    iou, acc = np.array(iou), np.array(acc)
    return dict(
        aAcc=round(tp.sum() / per_label.sum() * 100, 2),
        mIoU=round(np.nanmean(iou) * 100, 2),
        mAcc=round(np.nanmean(acc) * 100, 2),
    )


def run_metric(metric, pairs, classes=None):
    metric.dataset_meta = dict(classes=classes) if classes else None
    for pred, label in pairs:
        metric.process({}, [make_sample(pred, label).to_dict()])
    return metric.compute_metrics(metric.results)


def test_matches_brute_force_with_ignore_and_absent_classes():
    rng = np.random.default_rng(0)
    K = 7
    pairs = []
    for i in range(4):
        h, w = rng.integers(5, 12, size=2)
        # Classes 5 and 6 never occur in labels or predictions (NaN, skipped); class 4 is only
        # predicted (IoU 0, Acc NaN).
        label = rng.integers(0, 4, size=(h, w))
        label[rng.random((h, w)) < 0.2] = 255
        pred = np.where(rng.random((h, w)) < 0.6, label, rng.integers(0, 5, size=(h, w)))
        pred[label == 255] = rng.integers(0, 5, size=(label == 255).sum())
        pairs.append((pred, label))
    got = run_metric(IoUMetric(num_classes=K), pairs)
    want = brute_force(pairs, K)
    assert set(got) == {"aAcc", "mIoU", "mAcc"}
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


def test_hand_computed_example():
    # label [[0, 0], [1, 255]], pred [[0, 1], [1, 0]]:
    # class 0: inter 1, union 2 (label 2 + pred 1 - 1) -> IoU 0.5, Acc 0.5
    # class 1: inter 1, union 2 (label 1 + pred 1 - 1) -> IoU 0.5, Acc 1.0
    # the ignored pixel's prediction (0) does not count; aAcc = 2 / 3.
    got = run_metric(IoUMetric(num_classes=3), [([[0, 1], [1, 0]], [[0, 0], [1, 255]])])
    assert got == {"aAcc": 66.67, "mIoU": 50.0, "mAcc": 75.0}


def test_areas_are_summed_over_the_dataset_before_dividing():
    # Image 1: class 0 perfect on 1 pixel; image 2: class 0 wrong on 3 pixels.
    # Per-image mean would give IoU (1 + 0) / 2 = 0.5; dataset-level gives 1 / 4.
    pairs = [([[0]], [[0]]), ([[1, 1, 1]], [[0, 0, 0]])]
    got = run_metric(IoUMetric(num_classes=2), pairs)
    # class 0: inter 1, union 4 -> 0.25; class 1: inter 0, union 3 -> 0 ; mIoU 12.5
    assert got["mIoU"] == 12.5
    assert got["aAcc"] == 25.0


def test_classes_from_dataset_meta_and_table_is_logged(monkeypatch):
    logged = []
    monkeypatch.setattr("vitasks.evaluation.iou.print_log", lambda msg, **kw: logged.append(msg))
    got = run_metric(IoUMetric(), [([[0, 1, 1]], [[0, 1, 0]])], classes=("sky", "road", "tree"))
    # sky: inter 1, union 2, label 2; road: inter 1, union 2, label 1; tree absent (nan).
    assert got == {"aAcc": 66.67, "mIoU": 50.0, "mAcc": 75.0}
    table = logged[-1].splitlines()
    assert any(line.split() == ["|", "sky", "|", "50.00", "|", "50.00", "|"] for line in table)
    assert any(line.split() == ["|", "road", "|", "50.00", "|", "100.00", "|"] for line in table)
    assert any(line.split() == ["|", "tree", "|", "nan", "|", "nan", "|"] for line in table)


def test_evaluator_gives_unprefixed_keys():
    evaluator = Evaluator(IoUMetric(num_classes=2))
    evaluator.dataset_meta = dict(classes=("a", "b"))
    evaluator.process([make_sample([[0, 1]], [[0, 0]])], data_batch={})
    metrics = evaluator.evaluate(1)
    assert set(metrics) == {"aAcc", "mIoU", "mAcc"}


def test_errors():
    with pytest.raises(DataError, match="has size"):
        run_metric(IoUMetric(num_classes=2), [([[0, 1]], [[0], [1]])])
    with pytest.raises(DataError, match="label value 7"):
        run_metric(IoUMetric(num_classes=2), [([[0, 1]], [[0, 7]])])
    with pytest.raises(DataError, match="gt_sem_seg"):
        IoUMetric(num_classes=2).process({}, [make_sample([[0]], None)])
    metric = IoUMetric(num_classes=3)
    metric.dataset_meta = dict(classes=("a", "b"))
    with pytest.raises(ConfigError, match="num_classes=3"):
        metric.process({}, [make_sample([[0]], [[0]])])
    with pytest.raises(ConfigError, match="num_classes"):
        IoUMetric().process({}, [make_sample([[0]], [[0]])])


def test_dumper_writes_label_values(tmp_path):
    dumper = SegPredictionDumper(out_path=str(tmp_path / "preds"))
    dumper.dataset_meta = dict(classes=("a", "b", "c"), reduce_zero_label=True)
    pred = np.array([[0, 2], [1, 1]])
    dumper.process({}, [make_sample(pred, None, img_path="/data/images/validation/ADE_val_1.jpg").to_dict()])
    assert dumper.compute_metrics(dumper.results) == {}
    written = cv2.imread(str(tmp_path / "preds" / "ADE_val_1.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(written, pred + 1)  # ADE: classes 1..150

    plain = SegPredictionDumper(out_path=str(tmp_path / "plain"), reduce_zero_label=False)
    plain.process({}, [make_sample(pred, None, img_path="x/b.png")])
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "plain" / "b.png"), cv2.IMREAD_UNCHANGED), pred)


def test_dumper_names_by_path_relative_to_the_image_folder(tmp_path):
    # Two images of the same file name in different sub-folders of a folder dataset.
    dumper = SegPredictionDumper(out_path=str(tmp_path / "preds"))
    dumper.dataset_meta = dict(classes=("a", "b", "c"), reduce_zero_label=False, img_root=str(tmp_path / "images"))
    first, second = np.array([[0, 1]]), np.array([[2, 2]])
    dumper.process({}, [make_sample(first, None, img_path=str(tmp_path / "images" / "a" / "x.jpg")),
                        make_sample(second, None, img_path=str(tmp_path / "images" / "b" / "x.jpg"))])
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "preds" / "a" / "x.png"), cv2.IMREAD_UNCHANGED), first)
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "preds" / "b" / "x.png"), cv2.IMREAD_UNCHANGED), second)
    assert sorted(p.relative_to(tmp_path / "preds").as_posix() for p in (tmp_path / "preds").rglob("*.png")) == [
        "a/x.png", "b/x.png"]
    # An explicit img_root wins over the dataset's.
    explicit = SegPredictionDumper(out_path=str(tmp_path / "explicit"), img_root=str(tmp_path))
    explicit.process({}, [make_sample(first, None, img_path=str(tmp_path / "images" / "a" / "x.jpg"))])
    assert (tmp_path / "explicit" / "images" / "a" / "x.png").is_file()


def test_dumper_refuses_to_overwrite_a_prediction_of_the_same_name(tmp_path):
    dumper = SegPredictionDumper(out_path=str(tmp_path / "preds"), reduce_zero_label=False)  # no image folder known
    dumper.process({}, [make_sample(np.array([[1]]), None, img_path="/data/a/x.jpg")])
    with pytest.raises(DataError, match=r"/data/b/x.jpg and /data/a/x.jpg .*img_root"):
        dumper.process({}, [make_sample(np.array([[2]]), None, img_path="/data/b/x.jpg")])
    assert cv2.imread(str(tmp_path / "preds" / "x.png"), cv2.IMREAD_UNCHANGED)[0, 0] == 1
    # A new evaluation (results emptied, as evaluate() does) may write the same names again.
    dumper.results.clear()
    dumper.process({}, [make_sample(np.array([[2]]), None, img_path="/data/b/x.jpg")])
    assert cv2.imread(str(tmp_path / "preds" / "x.png"), cv2.IMREAD_UNCHANGED)[0, 0] == 2


def test_dumper_reports_a_file_it_cannot_write(tmp_path):
    dumper = SegPredictionDumper(out_path=str(tmp_path / "preds"), reduce_zero_label=False)
    (tmp_path / "preds" / "x.png").mkdir()  # cv2.imwrite cannot write over a folder
    with pytest.raises(DataError, match=r"could not write the prediction of img/x.jpg to .*x\.png"):
        dumper.process({}, [make_sample(np.array([[1]]), None, img_path="img/x.jpg")])


def test_dumper_sample_flag_wins_over_the_configured_one(tmp_path):
    # The sample says how its dataset read labels; the configured value is the fallback.
    dumper = SegPredictionDumper(out_path=str(tmp_path), reduce_zero_label=False)
    pred = np.array([[0, 3]])
    dumper.process({}, [make_sample(pred, None, img_path="r.jpg", reduce_zero_label=True),
                        make_sample(pred, None, img_path="p.jpg")])
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "r.png"), cv2.IMREAD_UNCHANGED), pred + 1)
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "p.png"), cv2.IMREAD_UNCHANGED), pred)
