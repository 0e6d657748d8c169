"""The generated datasets: classes that only shape tells apart, balanced, deterministic files in
the standard layouts."""

import hashlib
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from vitasks.data.synthetic import drawing
from vitasks.data.synthetic.cls import class_names, make_cls_dataset
from vitasks.data.synthetic.seg import make_seg_dataset, seg_class_names
from vitasks.errors import DataError


def digest(folder) -> str:
    """SHA-256 over every file's relative path and bytes."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(folder)):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, folder).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def read_split(root, split):
    """(images (N, H, W, 3) uint8, labels (N,)) of an ImageNet-layout split; classes sorted."""
    classes = sorted(os.listdir(os.path.join(root, split)))
    images, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(root, split, name))):
            images.append(np.asarray(Image.open(os.path.join(root, split, name, f)).convert("RGB")))
            labels.append(label)
    return np.stack(images), np.asarray(labels)


def colour_histograms(images: np.ndarray, bins: int = 4) -> np.ndarray:
    """Per-image joint RGB histogram (bins^3 cells), normalised to sum 1."""
    q = (images.astype(np.int64) * bins) // 256
    cells = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    hist = np.stack([np.bincount(c.reshape(-1), minlength=bins ** 3) for c in cells]).astype(np.float64)
    return hist / hist.sum(axis=1, keepdims=True)


def nearest_centroid_accuracy(train_x, train_y, test_x, test_y) -> float:
    """Accuracy of the nearest class mean (Euclidean) classifier, in numpy."""
    classes = np.unique(train_y)
    centroids = np.stack([train_x[train_y == c].mean(axis=0) for c in classes])
    dist = ((test_x[:, None, :] - centroids[None]) ** 2).sum(axis=-1)
    return float((classes[dist.argmin(axis=1)] == test_y).mean())


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic") / "cls")
    out, names = make_cls_dataset(root, num_classes=10, train_per_class=30, val_per_class=20, size=32, seed=3)
    return out, names


def test_cls_layout_balance_and_marker(cls_data):
    root, names = cls_data
    assert names == sorted(drawing.SHAPE_NAMES[:10]) == class_names(10)
    for split, per_class in (("train", 30), ("val", 20)):
        assert sorted(os.listdir(os.path.join(root, split))) == names
        for name in names:
            files = os.listdir(os.path.join(root, split, name))
            assert len(files) == per_class and all(f.endswith(".png") for f in files)
    images, _ = read_split(root, "val")
    assert images.shape[1:] == (32, 32, 3)
    with open(os.path.join(root, "synthetic.json")) as f:
        assert json.load(f)["classes"] == names


def test_colour_statistics_alone_are_near_chance(cls_data):
    """A classifier on per-image colour histograms cannot tell the classes apart (they differ in
    shape only), although the same classifier does learn when colour does carry the class."""
    root, names = cls_data
    train_x, train_y = read_split(root, "train")
    val_x, val_y = read_split(root, "val")
    chance = 1.0 / len(names)
    acc = nearest_centroid_accuracy(colour_histograms(train_x), train_y, colour_histograms(val_x), val_y)
    assert acc < 2.0 * chance, acc  # 10 classes: 10 % chance; measured about 11 %
    # Sorted histograms (the share of the most common colours, whichever they are) hold the
    # shapes' areas, the strongest colour-statistics cue left: still far below a shape model.
    sorted_train = -np.sort(-colour_histograms(train_x), axis=1)
    sorted_val = -np.sort(-colour_histograms(val_x), axis=1)
    assert nearest_centroid_accuracy(sorted_train, train_y, sorted_val, val_y) < 2.5 * chance  # measured about 12 %

    # Control: the same images tinted by class (a colour cue) are separated by the same probe.
    tints = np.random.default_rng(0).uniform(-150, 150, (len(names), 3))

    def tinted(images, labels):
        return np.clip(images + tints[labels][:, None, None, :], 0, 255).astype(np.uint8)

    control = nearest_centroid_accuracy(
        colour_histograms(tinted(train_x, train_y)), train_y, colour_histograms(tinted(val_x, val_y)), val_y
    )
    assert control > 0.5, control  # measured 75 %


def test_cls_files_are_deterministic_and_folders_protected(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    kwargs = dict(num_classes=3, train_per_class=2, val_per_class=1, size=24)
    make_cls_dataset(a, seed=5, **kwargs)
    make_cls_dataset(b, seed=5, **kwargs)
    make_cls_dataset(c, seed=6, **kwargs)
    assert digest(a) == digest(b) != digest(c)
    # Rewriting its own folder is fine (and gives the same bytes); a foreign folder is refused.
    make_cls_dataset(a, seed=5, **kwargs)
    assert digest(a) == digest(b)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "mine.txt").write_text("keep")
    with pytest.raises(DataError, match="not empty"):
        make_cls_dataset(str(tmp_path / "foreign"), **kwargs)
    with pytest.raises(ValueError, match="num_classes"):
        class_names(len(drawing.SHAPE_NAMES) + 1)


def test_seg_layout_labels_and_determinism(tmp_path):
    root = make_seg_dataset(str(tmp_path / "a"), num_train=12, num_val=4, img_size=48, num_classes=6, seed=1)
    assert digest(make_seg_dataset(str(tmp_path / "b"), num_train=12, num_val=4, img_size=48, num_classes=6,
                                   seed=1)) == digest(root)
    with open(os.path.join(root, "classes.txt")) as f:
        assert f.read().split() == seg_class_names(6) == ["background", *drawing.SHAPE_NAMES[:5]]
    counts = np.zeros(7, np.int64)
    for split, n in (("training", 12), ("validation", 4)):
        images = sorted(os.listdir(os.path.join(root, "images", split)))
        assert len(images) == n and all(f.endswith(".jpg") for f in images)
        for f in images:
            label = np.asarray(Image.open(os.path.join(root, "annotations", split, f[:-4] + ".png")))
            assert label.shape == (48, 48) and label.dtype == np.uint8
            counts += np.bincount(label.reshape(-1), minlength=7)
    assert counts.size == 7  # no value above K = 6
    share = counts / counts.sum()
    assert share[1] > 0.4  # background is the largest class
    assert share[0] < 0.1  # 0 ("other") only on anti-aliased edges
    assert (counts[2:] > 0).all()  # every shape class occurs


def test_shape_areas_match_geometry():
    """The rendered coverage integrates to the area of the described figure."""
    size, r = (200, 200), 60.0
    centre = (100.0, 100.0)
    area = lambda shape, angle=0.0: drawing.shape_alpha(shape, size, centre, r, angle).sum()
    assert area("disc") == pytest.approx(math.pi * r * r, rel=0.01)
    assert area("ring") == pytest.approx(math.pi * r * r * (1 - 0.55 ** 2), rel=0.02)
    # A square with circumradius 0.85 r: side 0.85 r sqrt(2); the area does not change with rotation.
    assert area("square") == pytest.approx(2 * (0.85 * r) ** 2, rel=0.01)
    assert area("square", 30.0) == pytest.approx(area("square"), rel=0.01)
    # Equilateral triangle with circumradius r.
    assert area("triangle") == pytest.approx(3 * math.sqrt(3) / 4 * r * r, rel=0.01)
    # Two crossing bars of 2 r x 0.6 r overlap in a 0.6 r square.
    assert area("cross") == pytest.approx(2 * (2 * r * 0.6 * r) - (0.6 * r) ** 2, rel=0.02)
    # Not mirror-symmetric: the mirrored arrow differs from the arrow at any drawn rotation.
    arrow = drawing.shape_alpha("arrow", size, centre, r, 0.0)
    mirrored = arrow[:, ::-1]
    for angle in range(-35, 36, 5):
        assert np.abs(drawing.shape_alpha("arrow", size, centre, r, float(angle)) - mirrored).mean() > 0.05


def test_plain_style_is_the_shape_in_white_on_black(tmp_path):
    root, names = make_cls_dataset(str(tmp_path / "plain"), num_classes=2, train_per_class=2, val_per_class=1,
                                   size=32, seed=0, style="plain")
    images, _ = read_split(root, "train")
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 0] == images[..., 2]).all()
    # Coverage of the white shape: between the smallest and largest drawn disc/ring area.
    white = images[..., 0].astype(np.float64).sum(axis=(1, 2)) / 255
    assert ((white > 0.5 * math.pi * (0.25 * 32) ** 2 * (1 - 0.55 ** 2)) & (white < math.pi * (0.42 * 32 * 1.2) ** 2)).all()
    with pytest.raises(ValueError, match="style"):
        make_cls_dataset(str(tmp_path / "bad"), style="neon")



def test_photo_style_draws_light_or_dark_shapes_over_the_photograph(tmp_path):
    photo = drawing.photographs()[0]
    assert photo.ndim == 3 and photo.shape[2] == 3 and min(photo.shape[:2]) >= 256
    rng = np.random.default_rng(0)
    # Backgrounds: crops of the photograph, channels in any order; their sorted-channel mean levels
    # (what a channel permutation keeps) match the photograph's, and they are textured, not flat.
    crops = np.stack([drawing.photo_background(rng, (32, 32)) for _ in range(200)])
    levels = np.sort(crops.reshape(-1, 3), axis=1).mean(axis=0)
    photo_levels = np.sort(photo.reshape(-1, 3), axis=1).mean(axis=0)
    assert np.abs(levels - photo_levels).max() < 15, (levels, photo_levels)
    assert np.median(crops.std(axis=(1, 2, 3))) > 10
    # Shapes: light or dark, about half each, whatever is underneath.
    alpha = np.zeros((16, 16), np.float32)
    alpha[4:12, 4:12] = 1.0
    grey = np.full((16, 16, 3), 128.0, np.float32)
    inside = np.array([drawing.paint_light_or_dark(rng, grey, alpha)[6:10, 6:10].mean() for _ in range(200)])
    assert ((inside > 150) | (inside < 105)).all()
    assert 70 < (inside > 150).sum() < 130

    root, _ = make_cls_dataset(str(tmp_path / "a"), num_classes=3, train_per_class=3, val_per_class=1, size=32,
                               seed=1, style="photo")
    again, _ = make_cls_dataset(str(tmp_path / "b"), num_classes=3, train_per_class=3, val_per_class=1, size=32,
                                seed=1, style="photo")
    assert digest(os.path.join(root, "train")) == digest(os.path.join(again, "train"))
    assert json.load(open(os.path.join(root, "synthetic.json")))["style"] == "photo"
    seg_root = make_seg_dataset(str(tmp_path / "seg"), num_train=2, num_val=1, img_size=32, style="photo")
    assert json.load(open(os.path.join(seg_root, "synthetic.json")))["style"] == "photo"
