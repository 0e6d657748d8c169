"""ImageNetFolder listing and errors; the synthetic classification generator."""

import hashlib
import os

import numpy as np
import pytest
from PIL import Image

import vitasks.data  # noqa: F401
from vitasks.data.imagenet import ImageNetFolder
from vitasks.data.synthetic.cls import make_cls_dataset
from vitasks.errors import ConfigError, DataError
from vitasks.registry import DATASETS

PIPELINE = [dict(type="LoadImage"), dict(type="PackInputs")]


def write_image(path, size=(6, 5), fmt=None, value=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path, format=fmt)


@pytest.fixture
def root(tmp_path):
    # Class folders deliberately created out of order; suffixes in mixed case.
    write_image(str(tmp_path / "train" / "zebra" / "b.JPEG"), fmt="JPEG")
    write_image(str(tmp_path / "train" / "zebra" / "a.png"))
    write_image(str(tmp_path / "train" / "ant" / "x.Jpg"), fmt="JPEG")
    write_image(str(tmp_path / "train" / "ant" / "sub" / "y.PNG"), fmt="PNG")
    write_image(str(tmp_path / "train" / "moth" / "m.jpeg"), fmt="JPEG")
    (tmp_path / "train" / "moth" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "README").write_text("a file, not a class")
    write_image(str(tmp_path / "val" / "ant" / "v.png"))
    write_image(str(tmp_path / "val" / "moth" / "v.png"))
    write_image(str(tmp_path / "val" / "zebra" / "v.png"))
    return str(tmp_path)


def test_listing_sorted_classes_and_suffixes(root):
    ds = ImageNetFolder(data_root=root, split="train", pipeline=PIPELINE)
    assert ds.metainfo["classes"] == ("ant", "moth", "zebra")
    rel = [(os.path.relpath(d["img_path"], root), d["gt_label"]) for d in (ds.get_data_info(i) for i in range(len(ds)))]
    assert rel == [
        (os.path.join("train", "ant", "sub", "y.PNG"), 0),
        (os.path.join("train", "ant", "x.Jpg"), 0),
        (os.path.join("train", "moth", "m.jpeg"), 1),
        (os.path.join("train", "zebra", "a.png"), 2),
        (os.path.join("train", "zebra", "b.JPEG"), 2),
    ]
    item = ds[3]
    assert item["inputs"].shape == (3, 5, 6)
    assert int(item["data_samples"].gt_label) == 2


def test_given_classes_fix_order_and_subset(root):
    ds = DATASETS.build(dict(type="ImageNetFolder", data_root=root, split="train", classes=["zebra", "ant"]))
    assert ds.metainfo["classes"] == ("zebra", "ant")
    assert [d["gt_label"] for d in ds.load_data_list()] == [0, 0, 1, 1]
    with pytest.raises(DataError, match="no folder"):
        ImageNetFolder(data_root=root, classes=["ant", "wasp"])


def test_split_dir_is_configurable(root):
    os.rename(os.path.join(root, "val"), os.path.join(root, "validation"))
    ds = ImageNetFolder(data_root=root, split="val", split_dir="validation")
    assert len(ds) == 3
    with pytest.raises(DataError, match="val"):
        ImageNetFolder(data_root=root, split="val")


def test_missing_or_nonexistent_data_root(tmp_path):
    with pytest.raises(ConfigError, match="data_root"):
        ImageNetFolder(data_root=None)
    with pytest.raises(ConfigError, match="data_root"):
        ImageNetFolder(data_root="")
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match="nowhere"):
        ImageNetFolder(data_root=missing)
    with pytest.raises(ConfigError, match="split"):
        ImageNetFolder(data_root=str(tmp_path), split="training")


def test_split_without_images(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        ImageNetFolder(data_root=str(tmp_path))
    (tmp_path / "train" / "cat").mkdir()
    (tmp_path / "train" / "cat" / "a.gif").write_bytes(b"GIF89a")
    with pytest.raises(DataError, match=r"no images .*train"):
        ImageNetFolder(data_root=str(tmp_path))


def test_num_classes_mismatch(root):
    with pytest.raises(ConfigError, match=r"num_classes is 1000 .* 3 classes"):
        ImageNetFolder(data_root=root, num_classes=1000)
    assert len(ImageNetFolder(data_root=root, num_classes=3)) == 5


@pytest.fixture
def bad_root(root):
    good = os.path.join(root, "train", "ant", "x.Jpg")
    data = open(good, "rb").read()
    with open(os.path.join(root, "train", "ant", "x.Jpg"), "wb") as f:
        f.write(data[: len(data) // 2])  # truncated JPEG
    with open(os.path.join(root, "val", "moth", "v.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n garbage")
    return root


def test_bad_image_raises_naming_file(bad_root):
    ds = ImageNetFolder(data_root=bad_root, split="train", pipeline=PIPELINE)
    with pytest.raises(DataError, match=r"x\.Jpg.*skip_bad_samples"):
        ds[1]
    val = ImageNetFolder(data_root=bad_root, split="val", pipeline=PIPELINE, test_mode=True)
    with pytest.raises(DataError, match=r"v\.png"):
        val[1]


def test_bad_image_skipped_in_training(bad_root, caplog):
    ds = ImageNetFolder(data_root=bad_root, split="train", pipeline=PIPELINE, skip_bad_samples=True)
    item = ds[1]  # the truncated file: another sample comes back
    assert os.path.basename(item["data_samples"].img_path) != "x.Jpg"
    # In evaluation a bad sample is never skipped (it would change the metric).
    val = ImageNetFolder(data_root=bad_root, split="val", pipeline=PIPELINE, test_mode=True, skip_bad_samples=True)
    with pytest.raises(DataError, match=r"v\.png.*training only"):
        val[1]


def _digest(folder):
    h = hashlib.sha256()
    for dirpath, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for f in sorted(files):
            path = os.path.join(dirpath, f)
            h.update(os.path.relpath(path, folder).encode())
            h.update(open(path, "rb").read())
    return h.hexdigest()


def test_synthetic_generator_layout_and_determinism(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    out, names = make_cls_dataset(a, num_classes=4, train_per_class=3, val_per_class=2, size=16, seed=1)
    assert out == a and len(names) == 4 and names == sorted(names)
    make_cls_dataset(b, num_classes=4, train_per_class=3, val_per_class=2, size=16, seed=1)
    make_cls_dataset(c, num_classes=4, train_per_class=3, val_per_class=2, size=16, seed=2)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    train = ImageNetFolder(data_root=a, split="train", num_classes=4, pipeline=PIPELINE)
    val = ImageNetFolder(data_root=a, split="val", num_classes=4, pipeline=PIPELINE)
    assert len(train) == 12 and len(val) == 8
    assert train.metainfo["classes"] == tuple(names)
    assert train[0]["inputs"].shape == (3, 16, 16)
    # Regenerating into its own folder is allowed; a foreign non-empty folder is refused.
    make_cls_dataset(a, num_classes=2, train_per_class=1, val_per_class=1, size=16)
    assert len(os.listdir(os.path.join(a, "train"))) == 2
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        make_cls_dataset(str(foreign))
