"""ADE20K / image-label folder datasets, segmentation transforms and their error paths."""

import os

import cv2
import numpy as np
import pytest
import torch

import vitasks.data  # noqa: F401  (registers datasets and transforms)
import vitasks.models  # noqa: F401
from vitasks.data.ade import ADE20K_CLASSES, ADE20KDataset, SegFolderDataset
from vitasks.data.seg_transforms import (
    LoadSegAnnotations,
    SegRandomCrop,
    SegRandomResize,
    SegResize,
    rescaled_size,
)
from vitasks.data.synthetic.seg import make_seg_dataset
from vitasks.data.transforms import Albu, LoadImage, PackInputs
from vitasks.errors import ConfigError, DataError
from vitasks.models.data_preprocessors import SegDataPreprocessor
from vitasks.registry import DATASETS


def write_pair(root, split, name, label, img=None, img_suffix=".jpg"):
    img_dir = os.path.join(root, "images", split)
    ann_dir = os.path.join(root, "annotations", split)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    label = np.asarray(label, np.uint8)
    if img is None:
        img = np.full(label.shape + (3,), 128, np.uint8)
    cv2.imwrite(os.path.join(img_dir, name + img_suffix), img)
    cv2.imwrite(os.path.join(ann_dir, name + ".png"), label)


@pytest.fixture
def ade_root(tmp_path):
    root = str(tmp_path / "ADEChallengeData2016")
    rng = np.random.default_rng(0)
    for i in range(3):
        write_pair(root, "training", f"ADE_train_{i}", rng.integers(0, 151, size=(12, 16)))
    write_pair(root, "validation", "ADE_val_0", rng.integers(0, 151, size=(10, 14)))
    return root


def load_label(dataset, index):
    info = dataset.get_data_info(index)
    results = LoadImage()(dict(info))
    return LoadSegAnnotations()(results)["gt_seg_map"]


def test_ade20k_layout_and_reduce_zero_label(ade_root):
    ds = ADE20KDataset(data_root=ade_root, split="training", num_classes=150)
    assert len(ds) == 3
    assert ds.metainfo["classes"] == ADE20K_CLASSES and len(ADE20K_CLASSES) == 150
    assert ds.metainfo["reduce_zero_label"] is True
    info = ds.get_data_info(0)
    assert info["img_path"].endswith(os.path.join("images", "training", "ADE_train_0.jpg"))
    assert info["seg_map_path"].endswith(os.path.join("annotations", "training", "ADE_train_0.png"))
    raw = cv2.imread(info["seg_map_path"], cv2.IMREAD_UNCHANGED).astype(np.int64)
    label = load_label(ds, 0).astype(np.int64)
    np.testing.assert_array_equal(label[raw == 0], 255)
    np.testing.assert_array_equal(label[raw > 0], raw[raw > 0] - 1)
    assert len(ADE20KDataset(data_root=ade_root, split="validation")) == 1


def test_folder_dataset_suffixes_classes_and_no_reduce(tmp_path):
    root = str(tmp_path)
    write_pair(root, "train", "a", [[0, 1], [2, 255]], img_suffix=".png")
    write_pair(root, "train", "b", [[1, 1], [0, 0]], img_suffix=".png")
    write_pair(root, "train", "c", [[1, 1], [0, 0]], img_suffix=".jpg")  # other suffix: not listed
    ds = SegFolderDataset(
        data_root=root, img_dir="images/train", ann_dir="annotations/train", img_suffix=".png",
        classes=["x", "y", "z"], num_classes=3,
    )
    assert [os.path.basename(d["img_path"]) for d in ds.load_data_list()] == ["a.png", "b.png"]
    np.testing.assert_array_equal(load_label(ds, 0), [[0, 1], [2, 255]])
    # Built from a config through the registry; names from num_classes.
    ds2 = DATASETS.build(dict(type="SegFolderDataset", data_root=root, img_dir="images/train",
                              ann_dir="annotations/train", img_suffix=[".png", ".jpg"], num_classes=3))
    assert len(ds2) == 3 and ds2.metainfo["classes"] == ("class_0", "class_1", "class_2")


def test_dump_of_a_folder_dataset_keeps_sub_folders(tmp_path):
    # Two images called x.jpg in different sub-folders: their predictions must not collide.
    from vitasks.evaluation.iou import SegPredictionDumper
    from vitasks.structures import DataSample, PixelData

    root = str(tmp_path)
    for kind in ("images", "annotations"):
        for sub in ("a", "b"):
            os.makedirs(os.path.join(root, kind, "val", sub))
    write_pair(root, "val", os.path.join("a", "x"), [[1, 2]])
    write_pair(root, "val", os.path.join("b", "x"), [[2, 1]])
    ds = SegFolderDataset(data_root=root, img_dir="images/val", ann_dir="annotations/val", num_classes=3)
    assert ds.metainfo["img_root"] == os.path.abspath(os.path.join(root, "images", "val"))
    dumper = SegPredictionDumper(out_path=str(tmp_path / "dump"))
    dumper.dataset_meta = ds.metainfo  # as the Runner sets it
    samples = []
    for i in range(len(ds)):
        info = ds.get_data_info(i)
        sample = DataSample(metainfo=dict(img_path=info["img_path"], reduce_zero_label=False))
        sample.pred_sem_seg = PixelData(data=torch.as_tensor(load_label(ds, i)).long()[None])
        samples.append(sample)
    dumper.process({}, samples)
    for sub in ("a", "b"):
        written = cv2.imread(str(tmp_path / "dump" / sub / "x.png"), cv2.IMREAD_UNCHANGED)
        label = cv2.imread(os.path.join(root, "annotations", "val", sub, "x.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(written, label)


def test_synthetic_dataset_reads_as_ade(tmp_path):
    root = make_seg_dataset(str(tmp_path / "seg"), num_train=4, num_val=2, img_size=32, num_classes=4)
    ds = ADE20KDataset(data_root=root, split="training", num_classes=4)  # names from classes.txt
    assert len(ds) == 4 and len(ds.metainfo["classes"]) == 4
    label = load_label(ds, 0)
    assert set(np.unique(label)) <= {0, 1, 2, 3, 255}
    with pytest.raises(ConfigError, match="num_classes is 5"):
        ADE20KDataset(data_root=root, split="validation", num_classes=5)


LOAD = [dict(type="LoadImage"), dict(type="LoadSegAnnotations")]


def test_ade_layout_retargets_without_classes_txt(tmp_path):
    """DESIGN.md: `data_root=DIR num_classes=K` works on the ADE layout with no classes.txt
    (classes named class_0...); a classes.txt names them and must agree with K."""
    root = str(tmp_path)
    write_pair(root, "training", "a", [[0, 1], [2, 11]])
    ds = ADE20KDataset(data_root=root, num_classes=11, pipeline=LOAD)
    assert ds.metainfo["classes"] == tuple(f"class_{i}" for i in range(11))
    np.testing.assert_array_equal(ds[0]["gt_seg_map"], [[255, 0], [1, 10]])
    assert ADE20KDataset(data_root=root).metainfo["classes"][0] == "wall"  # K = 150: ADE's names
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(f"thing{i}" for i in range(11)))
    assert ADE20KDataset(data_root=root, num_classes=11).metainfo["classes"][10] == "thing10"
    with pytest.raises(ConfigError, match=r"num_classes is 12 .*classes\.txt"):
        ADE20KDataset(data_root=root, num_classes=12)




def test_bad_label_value_names_file_and_value(tmp_path):
    root = str(tmp_path)
    write_pair(root, "training", "bad", [[1, 2], [151, 0]])
    ds = ADE20KDataset(data_root=root, pipeline=LOAD)
    with pytest.raises(DataError, match=r"bad\.png has value\(s\) 151"):
        ds[0]
    write_pair(root, "other", "bad2", [[1, 7]])
    ds = SegFolderDataset(data_root=root, img_dir="images/other", ann_dir="annotations/other", num_classes=3,
                          pipeline=LOAD)
    with pytest.raises(DataError, match=r"bad2\.png has value\(s\) 7"):
        ds[0]


def test_size_mismatch_missing_label_empty_split_num_classes(tmp_path):
    root = str(tmp_path)
    write_pair(root, "training", "a", np.ones((6, 8)), img=np.zeros((6, 9, 3), np.uint8))
    with pytest.raises(DataError, match=r"a\.png has size 6x8 .* has size 6x9"):
        ADE20KDataset(data_root=root, pipeline=LOAD)[0]

    os.makedirs(os.path.join(root, "images", "validation"))
    os.makedirs(os.path.join(root, "annotations", "validation"))
    with pytest.raises(DataError, match="split is empty"):
        ADE20KDataset(data_root=root, split="validation")
    cv2.imwrite(os.path.join(root, "images", "validation", "lonely.jpg"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataError, match=r"lonely\.jpg has no label file"):
        ADE20KDataset(data_root=root, split="validation")

    with pytest.raises(ConfigError, match="num_classes is 4 .* 3 classes"):
        SegFolderDataset(data_root=root, classes=["a", "b", "c"], num_classes=4)
    with pytest.raises(ConfigError, match="split must be one of"):
        ADE20KDataset(data_root=root, split="train")
    with pytest.raises(DataError, match="does not exist"):
        ADE20KDataset(data_root=str(tmp_path / "nowhere"))


def test_keep_ratio_resize_matches_mmseg_numbers():
    # 480x640 into (2048, 512): factor min(2048/640, 512/480) -> 512x683 (mmcv rounding).
    assert rescaled_size(480, 640, (2048, 512)) == (512, 683)
    # A very wide image is bounded by the long side: 100x4000 -> factor 2048/4000.
    assert rescaled_size(100, 4000, (2048, 512)) == (51, 2048)
    img = np.zeros((480, 640, 3), np.uint8)
    out = SegResize(scale=(2048, 512))(dict(img=img))
    assert out["img"].shape == (512, 683, 3) and out["img_shape"] == (512, 683)


def test_random_resize_ratio_range():
    np.random.seed(0)  # the transforms draw from a generator seeded from numpy's global state
    transform = SegRandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0))
    sizes = []
    for _ in range(20):
        out = transform(dict(img=np.zeros((100, 200, 3), np.uint8), gt_seg_map=np.zeros((100, 200), np.uint8)))
        h, w = out["img"].shape[:2]
        assert out["gt_seg_map"].shape == (h, w)
        assert abs(w / h - 2.0) < 0.05  # ratio kept
        sizes.append(h)
    # short side 512 * r with r in [0.5, 2]
    assert 256 <= min(sizes) and max(sizes) <= 1024 and max(sizes) - min(sizes) > 200


def test_random_crop_cat_max_ratio():
    # Left half class 0, right half class 1: a 50-wide crop has both classes under 75% only for
    # x0 in (12.5, 37.5).
    label = np.zeros((50, 100), np.uint8)
    label[:, 50:] = 1
    for seed in range(20):  # each sample's own generator, as a seeded loader gives it (so no flakes)
        out = SegRandomCrop(crop_size=(50, 50), cat_max_ratio=0.75)(
            dict(img=np.zeros((50, 100, 3), np.uint8), gt_seg_map=label.copy(), rng=np.random.default_rng(seed))
        )
        counts = np.bincount(out["gt_seg_map"].ravel(), minlength=2)
        assert counts.max() / counts.sum() < 0.75
        assert out["img"].shape == (50, 50, 3) and out["img_shape"] == (50, 50)
    # Ignored pixels do not count. Columns 0-9 are class 0, 10-19 class 1, 20-29 ignored; a
    # 10-wide crop starting at x0 is accepted only when both classes are present with less than
    # 75% of the *labelled* pixels each: x0 in 3..7 (by hand: 10 - x0 and x0 columns, both < 7.5).
    # Were the ignored columns counted as a class, crops at x0 = 13..17 (class 1 and ignored,
    # both under 7.5 columns) would pass too.
    label = np.full((10, 30), 255, np.uint8)
    label[:, :10] = 0
    label[:, 10:20] = 1
    img = np.zeros((10, 30, 3), np.uint8)
    img[..., 0] = np.arange(30)[None, :]  # the column index, to read x0 back
    crop = SegRandomCrop(crop_size=(10, 10), cat_max_ratio=0.75, max_tries=1000)
    starts = set()
    for seed in range(60):
        out = crop(dict(img=img.copy(), gt_seg_map=label.copy(), rng=np.random.default_rng(seed)))
        x0 = int(out["img"][0, 0, 0])
        np.testing.assert_array_equal(out["gt_seg_map"], label[:, x0:x0 + 10])
        starts.add(x0)
    assert starts <= {3, 4, 5, 6, 7} and len(starts) >= 3
    # Smaller images are kept whole along the short side.
    out = SegRandomCrop(crop_size=(64, 64))(dict(img=np.zeros((20, 100, 3), np.uint8)))
    assert out["img"].shape == (20, 64, 3)


def test_train_pipeline_keeps_image_and_label_aligned(tmp_path):
    """The image encodes its label in its pixel values; after random resize, crop, flip,
    photometric distortion (on other channels), packing and padding they still agree."""
    rng = np.random.default_rng(0)
    label = rng.integers(0, 5, size=(24, 32)).repeat(3, 0).repeat(3, 1).astype(np.uint8)  # 72x96 blocks
    label[:6, :6] = 255
    img = np.zeros(label.shape + (3,), np.uint8)
    img[..., 0] = np.where(label == 255, 250, label * 40)
    img[:, :, 1] = np.arange(label.shape[1])[None, :] % 256  # columns, to see flips
    results = dict(img=img.copy(), gt_seg_map=label.copy(), img_shape=label.shape)
    np.random.seed(3)
    pipeline = [
        SegRandomResize(scale=(96, 64), ratio_range=(0.5, 2.0), interpolation="nearest"),
        SegRandomCrop(crop_size=(48, 48), cat_max_ratio=0.75),
        Albu([dict(type="HorizontalFlip", p=1.0)]),
        PackInputs(),
    ]
    for t in pipeline:
        results = t(results)
    packed = results
    pre = SegDataPreprocessor(mean=None, std=None, size=(64, 64))
    batch = pre(dict(inputs=[packed["inputs"]], data_samples=[packed["data_samples"]]), training=True)
    image = batch["inputs"][0]
    seg = batch["data_samples"][0].gt_sem_seg.data[0]
    assert image.shape[-2:] == seg.shape == (64, 64)
    h, w = packed["inputs"].shape[-2:]
    assert (seg[h:] == 255).all() and (seg[:, w:] == 255).all()  # label padding is ignored
    assert (image[:, h:] == 0).all() and (image[:, :, w:] == 0).all()  # image padding is 0
    inside = seg[:h, :w]
    red = image[0, :h, :w]
    expected = torch.where(red == 250, torch.tensor(255.0), red / 40)
    assert torch.equal(inside.float(), expected)
    # The flip happened: columns now decrease.
    cols = image[1, 0, :w]
    assert bool((cols[1:] <= cols[:-1]).all())


def test_test_pipeline_keeps_labels_at_original_size(tmp_path):
    root = str(tmp_path)
    write_pair(root, "validation", "v", np.ones((30, 40)))
    ds = ADE20KDataset(
        data_root=root, split="validation", test_mode=True,
        pipeline=[dict(type="LoadImage"), dict(type="SegResize", scale=[2048, 512], keep_ratio=True),
                  dict(type="LoadSegAnnotations"), dict(type="PackInputs")],
    )
    item = ds[0]
    assert tuple(item["inputs"].shape[-2:]) == (512, 683)
    sample = item["data_samples"]
    assert tuple(sample.gt_sem_seg.data.shape[-2:]) == (30, 40)
    assert tuple(sample.ori_shape) == (30, 40) and sample.reduce_zero_label is True
