"""CocoDataset: layout, category-id mapping, crowd, empty images, dropped boxes, bad input; the
synthetic COCO generator."""

import json
import os

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import vitasks.data  # noqa: F401  (registers datasets and transforms)
from vitasks.data.coco import CocoDataset
from vitasks.data.synthetic.det import make_det_dataset
from vitasks.errors import ConfigError, DataError
from vitasks.registry import DATASETS

TEST_PIPELINE = [dict(type="LoadImage"), dict(type="LoadDetAnnotations"), dict(type="PackDetInputs")]


def ring_rle(height, width):
    """An RLE (compressed, str counts) square ring: a mask a polygon cannot hold."""
    m = np.zeros((height, width), np.uint8)
    m[4:20, 6:22] = 1
    m[8:16, 10:18] = 0
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def crowd_rle(height, width):
    """An uncompressed RLE (counts as a list), how COCO stores crowd regions."""
    m = np.zeros((height, width), np.uint8)
    m[20:28, 2:12] = 1
    runs, value, count = [], 0, 0
    for v in m.reshape(-1, order="F"):
        if v != value:
            runs.append(count)
            value, count = v, 0
        count += 1
    runs.append(count)
    return {"size": [height, width], "counts": runs}


def write_coco(root, annotations=None, categories=None, images=None, name="instances_val2017.json",
               img_dir="val2017", write_images=True):
    """A hand-made COCO file: categories 3, 10, 7 (file order unsorted); image 5 (30x40) with a
    polygon object, an RLE ring, a crowd region, a zero-width and a negative-height box; image 2
    (32x32) with one object; image 9 with none; image 11 with only a crowd region."""
    categories = categories or [
        {"id": 10, "name": "ten"}, {"id": 3, "name": "three"}, {"id": 7, "name": "seven"}]
    images = images or [
        {"id": 5, "file_name": "five.png", "height": 30, "width": 40},
        {"id": 2, "file_name": "sub/two.png", "height": 32, "width": 32},
        {"id": 9, "file_name": "nine.png", "height": 20, "width": 24},
        {"id": 11, "file_name": "eleven.png", "height": 30, "width": 40},
    ]
    if annotations is None:
        annotations = [
            {"id": 101, "image_id": 5, "category_id": 10, "bbox": [2, 3, 10, 8], "iscrowd": 0, "area": 80,
             "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]]},
            {"id": 102, "image_id": 5, "category_id": 3, "bbox": [6, 4, 16, 16], "iscrowd": 0, "area": 192,
             "segmentation": ring_rle(30, 40)},
            {"id": 103, "image_id": 5, "category_id": 7, "bbox": [2, 20, 10, 8], "iscrowd": 1, "area": 80,
             "segmentation": crowd_rle(30, 40)},
            {"id": 104, "image_id": 5, "category_id": 7, "bbox": [30, 5, 0, 6], "iscrowd": 0, "area": 0,
             "segmentation": [[30, 5, 30, 11, 30, 8]]},
            {"id": 105, "image_id": 5, "category_id": 7, "bbox": [30, 5, 4, -1], "iscrowd": 0, "area": 0,
             "segmentation": []},
            {"id": 201, "image_id": 2, "category_id": 7, "bbox": [1, 1, 20, 10], "iscrowd": 0, "area": 200,
             "segmentation": [[1, 1, 21, 1, 21, 11, 1, 11]]},
            {"id": 301, "image_id": 11, "category_id": 3, "bbox": [2, 20, 10, 8], "iscrowd": 1, "area": 80,
             "segmentation": crowd_rle(30, 40)},
        ]
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    path = os.path.join(root, "annotations", name)
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    if write_images:
        rng = np.random.default_rng(0)
        for image in images:
            file = os.path.join(root, img_dir, image["file_name"])
            os.makedirs(os.path.dirname(file), exist_ok=True)
            cv2.imwrite(file, rng.integers(0, 255, (image["height"], image["width"], 3), dtype=np.uint8))
    return path


@pytest.fixture
def coco_root(tmp_path):
    root = str(tmp_path / "coco")
    write_coco(root)
    return root


def val_dataset(root, **kwargs):
    args = dict(data_root=root, ann_file="annotations/instances_val2017.json", img_dir="val2017",
                pipeline=TEST_PIPELINE)
    args.update(kwargs)
    return CocoDataset(**args)


@pytest.fixture
def logged(monkeypatch):
    messages = []
    monkeypatch.setattr("vitasks.data.coco.print_log", lambda msg, **kw: messages.append(msg))
    return messages


def test_non_contiguous_category_ids_map_to_sorted_labels(coco_root):
    ds = val_dataset(coco_root, num_classes=3, test_mode=True)
    assert ds.metainfo["cat_ids"] == (3, 7, 10)
    assert ds.metainfo["classes"] == ("three", "seven", "ten")
    ann_file = os.path.join(coco_root, "annotations/instances_val2017.json")
    assert ds.metainfo["ann_file"] == os.path.abspath(ann_file)
    by_id = {ds.get_data_info(i)["img_id"]: ds.get_data_info(i) for i in range(len(ds))}
    labels = {inst["ann_id"]: inst["bbox_label"] for inst in by_id[5]["instances"]}
    # category 10 -> label 2, 3 -> 0, 7 -> 1; and back through cat_ids.
    assert labels == {101: 2, 102: 0, 103: 1}
    assert all(ds.metainfo["cat_ids"][label] == cat for label, cat in zip((2, 0, 1), (10, 3, 7)))
    assert by_id[2]["img_path"] == os.path.join(coco_root, "val2017", "sub/two.png")
    assert by_id[5]["instances"][0]["bbox"] == [2.0, 3.0, 12.0, 11.0]  # xywh -> xyxy


def test_registered_and_built_from_config(coco_root):
    ds = DATASETS.build(dict(type="CocoDataset", data_root=coco_root, img_dir="val2017", test_mode=True,
                             ann_file="annotations/instances_val2017.json"))
    assert isinstance(ds, CocoDataset) and len(ds) == 4


def test_empty_images_skipped_in_training_kept_in_testing(coco_root, logged):
    test = val_dataset(coco_root, test_mode=True)
    assert [test.get_data_info(i)["img_id"] for i in range(len(test))] == [2, 5, 9, 11]
    train = val_dataset(coco_root)
    # 9 has no annotation and 11 only a crowd region: nothing to learn.
    assert [train.get_data_info(i)["img_id"] for i in range(len(train))] == [2, 5]
    assert train.load_stats["images without objects (skipped in training)"] == 2
    assert any("2 of 4 images have no object" in m for m in logged)
    kept = val_dataset(coco_root, filter_empty_gt=False)
    assert len(kept) == 4


def test_zero_and_negative_size_boxes_dropped_and_counted(coco_root, logged):
    ds = val_dataset(coco_root, test_mode=True)
    info = next(ds.get_data_info(i) for i in range(len(ds)) if ds.get_data_info(i)["img_id"] == 5)
    assert sorted(inst["ann_id"] for inst in info["instances"]) == [101, 102, 103]
    assert ds.load_stats["boxes of zero or negative size"] == 2
    line = next(m for m in logged if "zero or negative size" in m)
    assert "dropped 2 annotation(s)" in line and "104" in line and "105" in line


def test_crowd_regions_are_ignored_not_targets(coco_root):
    ds = val_dataset(coco_root, test_mode=True)
    index = next(i for i in range(len(ds)) if ds.get_data_info(i)["img_id"] == 5)
    sample = ds[index]["data_samples"]
    assert sample.gt_instances.labels.tolist() == [2, 0]  # polygon (cat 10), ring (cat 3)
    assert sample.ignored_instances.labels.tolist() == [1]  # the crowd region (cat 7)
    np.testing.assert_allclose(sample.ignored_instances.bboxes.numpy(), [[2, 20, 12, 28]])
    assert sample.metainfo["img_id"] == 5 and sample.metainfo["ori_shape"] == (30, 40)


def test_masks_equal_pycocotools_decoding(coco_root):
    """Polygon, compressed RLE and uncompressed (crowd) RLE decode as pycocotools' annToMask."""
    ds = val_dataset(coco_root, test_mode=True)
    api = COCO(os.path.join(coco_root, "annotations/instances_val2017.json"))
    index = next(i for i in range(len(ds)) if ds.get_data_info(i)["img_id"] == 5)
    sample = ds[index]["data_samples"]
    masks = torch.cat([sample.gt_instances.masks, sample.ignored_instances.masks]).numpy()
    for mask, ann_id in zip(masks, (101, 102, 103)):
        np.testing.assert_array_equal(mask, api.annToMask(api.anns[ann_id]).astype(bool))


def test_unknown_category_names_annotation_and_file(tmp_path):
    root = str(tmp_path / "coco")
    path = write_coco(root, annotations=[
        {"id": 77, "image_id": 5, "category_id": 4, "bbox": [1, 1, 5, 5], "iscrowd": 0, "segmentation": []},
    ])
    with pytest.raises(DataError) as err:
        val_dataset(root)
    assert "annotation 77" in str(err.value) and os.path.abspath(path) in str(err.value)
    assert "category_id 4" in str(err.value)


def test_rle_of_the_wrong_size_names_annotation(tmp_path):
    root = str(tmp_path / "coco")
    write_coco(root, annotations=[
        {"id": 88, "image_id": 2, "category_id": 3, "bbox": [6, 4, 16, 16], "iscrowd": 0,
         "segmentation": ring_rle(30, 40)},  # image 2 is 32x32
    ])
    with pytest.raises(DataError, match="annotation 88.*RLE size"):
        val_dataset(root)


def test_missing_image_file_is_named(tmp_path):
    root = str(tmp_path / "coco")
    write_coco(root)
    os.remove(os.path.join(root, "val2017", "nine.png"))
    ds = val_dataset(root, test_mode=True)
    index = next(i for i in range(len(ds)) if ds.get_data_info(i)["img_id"] == 9)
    with pytest.raises(DataError, match="nine.png"):
        ds[index]
    # In training with skip_bad_samples, the sample is skipped and another drawn.
    os.remove(os.path.join(root, "val2017", "five.png"))
    train = val_dataset(root, skip_bad_samples=True)
    assert train[1]["data_samples"].metainfo["img_id"] == 2


def test_num_classes_mismatch_and_missing_paths(coco_root, tmp_path):
    with pytest.raises(ConfigError, match="num_classes is 80 but .* has 3 classes"):
        val_dataset(coco_root, num_classes=80)
    with pytest.raises(DataError, match="annotation file not found"):
        val_dataset(coco_root, ann_file="annotations/instances_train2017.json")
    with pytest.raises(DataError, match="image folder"):
        val_dataset(coco_root, img_dir="train2017")
    with pytest.raises(ConfigError, match="data_root"):
        CocoDataset(data_root=None)
    bad = tmp_path / "coco" / "annotations" / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        val_dataset(coco_root, ann_file="annotations/bad.json")


def test_image_size_differing_from_annotation_is_named(tmp_path):
    root = str(tmp_path / "coco")
    write_coco(root)
    cv2.imwrite(os.path.join(root, "val2017", "five.png"), np.zeros((40, 30, 3), np.uint8))  # rotated
    ds = val_dataset(root, test_mode=True)
    index = next(i for i in range(len(ds)) if ds.get_data_info(i)["img_id"] == 5)
    with pytest.raises(DataError, match="five.png is 40x30.*30x40"):
        ds[index]


def test_synthetic_det_dataset(tmp_path):
    root = str(tmp_path / "det")
    make_det_dataset(root, seed=1, num_train=8, num_val=3, img_size=64, num_classes=4, empty_prob=0.3)
    api = COCO(os.path.join(root, "annotations", "instances_train2017.json"))
    assert sorted(api.cats) == [1, 3, 5, 7]  # not contiguous
    assert [api.cats[c]["name"] for c in (1, 3, 5, 7)] == ["disc", "ring", "triangle", "square"]
    rings = [a for a in api.anns.values() if a["category_id"] == 3]
    assert all(isinstance(a["segmentation"], dict) for a in rings)  # a hole: RLE
    assert any(isinstance(a["segmentation"], list) for a in api.anns.values())
    for ann in api.anns.values():
        mask = api.annToMask(ann).astype(bool)
        # area is the rasterised mask's; the mask lies in the bbox and nearly fills it (a
        # polygon's sharp tip may hold less than a pixel)
        assert ann["area"] == mask.sum() > 0
        ys, xs = np.nonzero(mask)
        x, y, w, h = ann["bbox"]
        extent = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        box = np.array([x, y, x + w, y + h])
        assert (extent[:2] >= box[:2] - 0.5).all() and (extent[2:] <= box[2:] + 0.5).all()
        np.testing.assert_allclose(extent, box, atol=1.5)
        # the object is drawn where its mask is: its pixels differ from those just around it
        img = cv2.imread(os.path.join(root, "train2017", api.imgs[ann["image_id"]]["file_name"]))
        around = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool) & ~mask
        inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        if inner.sum() > 5:
            assert np.abs(img[inner].mean(0).astype(float) - img[around].mean(0)).max() > 20
    train = CocoDataset(data_root=root, num_classes=4, pipeline=TEST_PIPELINE)
    val = CocoDataset(data_root=root, ann_file="annotations/instances_val2017.json", img_dir="val2017",
                      num_classes=4, test_mode=True)
    with_objects = {a["image_id"] for a in api.anns.values()}
    assert len(val) == 3 and len(train) == len(with_objects) < 8  # empty images skipped in training
    # The same arguments write the same files.
    again = str(tmp_path / "again")
    make_det_dataset(again, seed=1, num_train=8, num_val=3, img_size=64, num_classes=4, empty_prob=0.3)
    for rel in ("annotations/instances_train2017.json", "val2017/000001000002.jpg"):
        with open(os.path.join(root, rel), "rb") as a, open(os.path.join(again, rel), "rb") as b:
            assert a.read() == b.read()


def test_synthetic_objects_are_drawn_where_annotated(monkeypatch):
    """The pixels an object is painted on (coverage >= 0.5) are its annotation's mask up to the
    outline: each lies within the other grown by one pixel."""
    import vitasks.data.synthetic.det as det

    seen = []
    annotate = det._annotation

    def spy(polygons, drawn, size):
        ann = annotate(polygons, drawn, size)
        seen.append((ann, drawn, size))
        return ann

    monkeypatch.setattr(det, "_annotation", spy)
    for i in range(12):
        det.draw_det_sample(np.random.default_rng([5, i]), 64, 10)
    assert any(isinstance(a["segmentation"], list) for a, _, _ in seen)
    kernel = np.ones((3, 3), np.uint8)
    for ann, drawn, size in seen:
        seg = ann["segmentation"]
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, size, size)) if isinstance(seg, list) else seg
        mask = mask_utils.decode(rle).astype(bool)
        assert not (drawn & ~cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)).any()
        assert not (mask & ~cv2.dilate(drawn.astype(np.uint8), kernel).astype(bool)).any()
        assert (mask & drawn).sum() / (mask | drawn).sum() > 0.85
