"""tools/browse_dataset.py: the training stream drawn, on tiny hand-written datasets."""

import numpy as np
import pytest
import torch
import yaml
from mmengine.registry import DefaultScope
from mmengine.structures import InstanceData
from PIL import Image

from vitasks.config import load_config
from vitasks.cli import main as cli_main
from vitasks.errors import ConfigError, DataError
from vitasks.structures import DataSample
from vitasks.visualization.browse import (
    DrawContext,
    GtLabelDrawer,
    GtSemSegDrawer,
    browse_dataset,
    draw_sample,
    iter_training_samples,
)
from vitasks.visualization.seg_drawer import seg_palette


def main(argv):
    """tools/browse_dataset.py."""
    return cli_main(["browse-dataset", *argv])

CLASSES = ["ant", "bee", "cat"]
IGNORE = 255


def _upscaled(hwc: np.ndarray, scale: int) -> np.ndarray:
    return np.repeat(np.repeat(hwc, scale, axis=0), scale, axis=1)


def _region(drawing, frame: int, height: int, width: int) -> np.ndarray:
    y, x = drawing.frame_origins[frame]
    return drawing.image[y:y + height * drawing.scale, x:x + width * drawing.scale]


@pytest.fixture
def cls_config(tmp_path):
    """ImageNet folders, 3 classes x 2 noise images of 20 x 24 px; a random crop, flip and colour
    jitter, as the demos train."""
    rng = np.random.default_rng(0)
    for name in CLASSES:
        folder = tmp_path / "cls" / "train" / name
        folder.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{name}{i}.png")
    cfg = {
        "default_scope": "vitasks",
        "randomness": {"seed": 7},
        "train_dataloader": {
            "batch_size": 2,
            "num_workers": 0,
            "sampler": {"type": "DefaultSampler", "shuffle": True},
            "dataset": {
                "type": "ImageNetFolder",
                "data_root": str(tmp_path / "cls"),
                "split": "train",
                "num_classes": 3,
                "pipeline": [
                    {"type": "LoadImage"},
                    {"type": "Albu", "transforms": [
                        {"type": "RandomResizedCrop", "size": [16, 16], "scale": [0.3, 1.0]},
                        {"type": "HorizontalFlip", "p": 0.5},
                        {"type": "ColorJitter", "brightness": 0.3, "contrast": 0.3, "p": 1.0},
                    ]},
                    {"type": "PackInputs"},
                ],
            },
        },
    }
    path = tmp_path / "cls.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def seg_config(tmp_path):
    """Image + label folders: 2 images of 24 x 28 px, classes 0..2 in bands, an ignored block."""
    rng = np.random.default_rng(1)
    (tmp_path / "seg" / "images").mkdir(parents=True)
    (tmp_path / "seg" / "labels").mkdir(parents=True)
    for i in range(2):
        pixels = rng.integers(0, 256, (24, 28, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "seg" / "images" / f"s{i}.png")
        label = np.zeros((24, 28), np.uint8)
        label[8:16] = 1
        label[16:] = 2
        label[:6, :10] = IGNORE
        Image.fromarray(label).save(tmp_path / "seg" / "labels" / f"s{i}.png")
    cfg = {
        "default_scope": "vitasks",
        "randomness": {"seed": 3},
        "train_dataloader": {
            "sampler": {"type": "InfiniteSampler", "shuffle": True},
            "dataset": {
                "type": "SegFolderDataset",
                "data_root": str(tmp_path / "seg"),
                "img_dir": "images",
                "ann_dir": "labels",
                "img_suffix": ".png",
                "classes": CLASSES,
                "pipeline": [
                    {"type": "LoadImage"},
                    {"type": "LoadSegAnnotations"},
                    {"type": "SegRandomCrop", "crop_size": [20, 20]},
                    {"type": "Albu", "transforms": [{"type": "HorizontalFlip", "p": 0.5}]},
                    {"type": "PackInputs"},
                ],
            },
        },
    }
    path = tmp_path / "seg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _pngs(folder):
    return sorted(p.name for p in folder.iterdir())


def test_writes_n_pngs_repeatably(cls_config, tmp_path):
    first = browse_dataset(cls_config, tmp_path / "a", num=4)
    assert len(first) == 4 and _pngs(tmp_path / "a") == sorted(p.rsplit("/", 1)[-1] for p in first)
    assert [p.rsplit("/", 1)[-1][:5] for p in first] == ["0000_", "0001_", "0002_", "0003_"]
    browse_dataset(cls_config, tmp_path / "b", num=4)
    assert _pngs(tmp_path / "a") == _pngs(tmp_path / "b")
    for name in _pngs(tmp_path / "a"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # Another seed: another order or other augmentations.
    browse_dataset(cls_config, tmp_path / "c", num=4, cfg_options=["randomness.seed=8"])
    seed7 = [(tmp_path / "a" / name).read_bytes() for name in _pngs(tmp_path / "a")]
    seed8 = [(tmp_path / "c" / name).read_bytes() for name in _pngs(tmp_path / "c")]
    assert len(seed8) == 4 and seed7 != seed8


def test_samples_are_what_training_loads(cls_config):
    """The browsed samples are the training dataloader's (the Runner's seeded sampler, epoch 0
    then epoch 1), pixel for pixel: order, labels and augmentations."""
    from vitasks.engine.runner import VitasksRunner

    cfg = load_config(cls_config)
    browsed = list(iter_training_samples(cfg, num=8))  # 6 images: epoch 0 and 2 of epoch 1
    loader_cfg = dict(cfg.train_dataloader.to_dict(), persistent_workers=False)
    with DefaultScope.overwrite_default_scope("vitasks"):
        loader = VitasksRunner.build_dataloader(loader_cfg, seed=7)
    trained = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            trained += list(zip(batch["inputs"], batch["data_samples"]))
    assert sorted(b.index for b in browsed[:6]) == list(range(6))
    for item, (inputs, sample) in zip(browsed, trained):
        assert torch.equal(item.packed["inputs"], inputs)
        assert item.packed["data_samples"].img_path == sample.img_path
        assert torch.equal(item.packed["data_samples"].gt_label, sample.gt_label)


def test_classification_drawing_shows_the_pipeline_output(cls_config):
    cfg = load_config(cls_config)
    for item in iter_training_samples(cfg, num=3):
        inputs = item.packed["inputs"]
        sample = item.packed["data_samples"]
        assert inputs.dtype == torch.uint8 and inputs.shape == (3, 16, 16)
        drawing = draw_sample(item.packed, CLASSES)
        assert drawing.scale == 16  # 16 px enlarged to the 256 px display minimum
        hwc = inputs.permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(_region(drawing, 0, 16, 16), _upscaled(hwc, 16))
        # The caption names the class of the image's folder.
        folder = sample.img_path.replace("\\", "/").split("/")[-2]
        context = DrawContext(CLASSES, IGNORE, drawing.scale, seg_palette(3))
        assert GtLabelDrawer().caption(sample, context) == [f"label: {folder} ({CLASSES.index(folder)})"]
        assert drawing.frame_origins[0][0] > 0  # the caption lies above the picture, not over it


def test_segmentation_drawing_blends_labels_and_leaves_ignored_pixels(seg_config):
    cfg = load_config(seg_config)
    palette = seg_palette(len(CLASSES))
    items = list(iter_training_samples(cfg, num=2))
    for item in items:
        hwc = item.packed["inputs"].permute(1, 2, 0).numpy()
        labels = item.packed["data_samples"].gt_sem_seg.data[0].numpy()
        assert hwc.shape == (20, 20, 3) and (labels == IGNORE).any() and (labels == 2).any()
        drawing = draw_sample(item.packed, CLASSES, ignore_index=IGNORE)
        shown = _region(drawing, 0, 20, 20)[::drawing.scale, ::drawing.scale].astype(np.float64)
        ignored = labels == IGNORE
        np.testing.assert_array_equal(shown[ignored], hwc[ignored])
        expected = np.rint(0.5 * hwc + 0.5 * palette[np.where(ignored, 0, labels)])
        np.testing.assert_array_equal(shown[~ignored], expected[~ignored])
        entries = GtSemSegDrawer().legend(item.packed["data_samples"], DrawContext(CLASSES, IGNORE, 1, palette))
        counts = {c: int((labels == c).sum()) for c in (0, 1, 2) if (labels == c).any()}
        ordered = sorted(counts, key=lambda c: (-counts[c], c))
        assert [e.label for e in entries] == ordered + [IGNORE]
        assert entries[0].text == f"{CLASSES[ordered[0]]}  {100 * counts[ordered[0]] / 400:.1f}%"
        assert entries[-1].text == f"ignored (255)  {100 * ignored.sum() / 400:.1f}%"
    # Random crops: the two samples are cut from different places or images.
    assert not torch.equal(items[0].packed["inputs"], items[1].packed["inputs"])


def test_instances_boxes_and_masks():
    image = np.full((32, 32, 3), 40, np.uint8)
    sample = DataSample()
    instances = InstanceData()
    instances.bboxes = torch.tensor([[4.0, 4.0, 20.0, 28.0], [22.0, 22.0, 30.0, 30.0]])
    instances.labels = torch.tensor([1, 0])
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[1, 24:29, 24:29] = True
    instances.masks = masks
    sample.gt_instances = instances
    packed = {"inputs": torch.from_numpy(image.transpose(2, 0, 1).copy()), "data_samples": sample}
    drawing = draw_sample(packed, ["box", "blob"])
    k = drawing.scale
    assert k == 8
    picture = _region(drawing, 0, 32, 32)
    palette = seg_palette(2)
    # The first box's left and right edges, half-way down, in its class colour.
    assert tuple(picture[16 * k, 4 * k]) == tuple(palette[1])
    assert tuple(picture[16 * k, 20 * k - 1]) == tuple(palette[1])
    # Inside the box and outside every box and mask: the image.
    assert tuple(picture[16 * k, 12 * k]) == (40, 40, 40)
    assert tuple(picture[2 * k, 30 * k]) == (40, 40, 40)
    # Inside the mask: blended with its class colour.
    expected = np.rint(0.5 * 40 + 0.5 * palette[0].astype(np.float64))
    np.testing.assert_array_equal(picture[26 * k, 26 * k], expected)


def test_clip_is_a_strip_of_frames():
    clip = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)  # (C, T, H, W)
    sample = DataSample()
    sample.gt_label = torch.tensor([2])
    drawing = draw_sample({"inputs": clip, "data_samples": sample}, CLASSES)
    assert len(drawing.frame_origins) == 3 and len({x for _, x in drawing.frame_origins}) == 3
    for t in range(3):
        np.testing.assert_array_equal(_region(drawing, t, 16, 16), _upscaled(clip[:, t].permute(1, 2, 0).numpy(), 16))


def test_bad_configs_are_named(cls_config, tmp_path):
    cfg = yaml.safe_load(cls_config.read_text())
    cfg["train_dataloader"]["dataset"]["pipeline"][1]["type"] = "Albumentations"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"train_dataloader\.dataset\.pipeline\.1\.type: 'Albumentations'"):
        browse_dataset(bad, tmp_path / "out", num=1)
    del cfg["train_dataloader"]
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="train_dataloader.dataset"):
        browse_dataset(bad, tmp_path / "out", num=1)


def test_label_map_size_mismatch_is_an_error():
    sample = DataSample(metainfo={"img_path": "x.png"})
    from mmengine.structures import PixelData

    sample.gt_sem_seg = PixelData(data=torch.zeros(1, 8, 8, dtype=torch.long))
    with pytest.raises(DataError, match=r"x.png: gt_sem_seg is 8x8 but the image is 16x16"):
        draw_sample({"inputs": torch.zeros(3, 16, 16, dtype=torch.uint8), "data_samples": sample}, CLASSES)


def test_cli(seg_config, tmp_path, capsys):
    assert main([str(seg_config), "--out-dir", str(tmp_path / "out"), "--num", "3"]) == 0
    assert len(_pngs(tmp_path / "out")) == 3
    assert "wrote 3 images" in capsys.readouterr().out
    assert main([str(tmp_path / "missing.yaml"), "--out-dir", str(tmp_path / "o2")]) == 2
    assert "config file not found" in capsys.readouterr().err
