"""SegPredictionDrawer: `vitasks infer` on a tiny segmentor built from the demo config."""

import json
import os

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config
from PIL import Image

from vitasks.apis import inference_model, init_model, run_inference
from vitasks.errors import DataError
from vitasks.structures import DataSample, PixelData
from vitasks.visualization import SegPredictionDrawer, legend_layout, seg_palette, select_drawers
from vitasks.visualization.drawers import MIN_DRAW_SIDE
from vitasks.visualization.seg_drawer import label_areas, legend_entries

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo", "seg_synthetic.yaml")
CLASSES = ["sky", "road", "car", "tree", "person"]
H, W = 40, 56  # not a multiple of the patch size, not the config's test scale
# The demo model made smaller (16 channels everywhere); the dataset is never built.
TINY = [
    "model.backbone.embed_dim=16",
    "model.backbone.num_heads=2",
    "num_classes=5",
    "model.neck.embed_dim=16",
    "model.decode_head.in_channels=16",
    "model.decode_head.channels=8",
    # A small stem of its own, so that the random model's map varies whatever the demo's stem.
    "model.backbone.stem.channels=[8,16,16]",
    "model.backbone.stem.strides=[2,2,2]",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Weights with a strong, random classifier so that several classes show up."""
    torch.manual_seed(0)
    model = init_model(CONFIG, cfg_options=TINY)
    with torch.no_grad():
        model.decode_head.conv_seg.weight.normal_(0, 3.0)
        model.decode_head.conv_seg.bias.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_seg.pth"
    torch.save({"meta": {"dataset_meta": {"classes": CLASSES}}, "state_dict": model.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    arr[:, : W // 2] //= 4  # a dark half and a bright half give the features some structure
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(arr).save(path)
    return str(path), arr


def test_palette_is_fixed_and_distinct():
    palette = seg_palette(150)
    assert palette.shape == (150, 3) and palette.dtype == np.uint8
    assert len({tuple(c) for c in palette}) == 150
    assert not (palette == 0).all(axis=1).any()  # no black
    np.testing.assert_array_equal(seg_palette(5), palette[:5])  # a class's colour never depends on K


def test_inference_model_predicts_at_original_size(checkpoint, image):
    path, arr = image
    model = init_model(CONFIG, checkpoint, cfg_options=TINY)
    assert model.dataset_meta["classes"] == CLASSES
    for sample in (inference_model(model, path), inference_model(model, arr)):
        assert tuple(sample.ori_shape) == (H, W)
        assert tuple(sample.pred_sem_seg.data.shape) == (1, H, W)
        assert tuple(sample.seg_logits.data.shape) == (len(CLASSES), H, W)
        torch.testing.assert_close(sample.pred_sem_seg.data[0], sample.seg_logits.data.argmax(0))


def test_run_inference_writes_overlay_legend_json_and_label_map(tmp_path, checkpoint, image):
    path, arr = image
    out = tmp_path / "out"
    (record,) = run_inference(CONFIG, checkpoint, [path], str(out), cfg_options=TINY)
    data = json.loads(open(record["json"]).read())
    assert data["file"] == path
    assert data["label_map"] == str(out / "scene_labels.png") == record["label_map"]

    # Raw label map: the image's size, ADE-style values (the demo reads with reduce_zero_label).
    raw = cv2.imread(data["label_map"], cv2.IMREAD_UNCHANGED)
    assert raw.shape == (H, W) and raw.dtype == np.uint8
    assert raw.min() >= 1 and raw.max() <= len(CLASSES)
    model = init_model(CONFIG, checkpoint, cfg_options=TINY)
    pred = inference_model(model, path).pred_sem_seg.data[0].numpy()
    np.testing.assert_array_equal(raw, pred + 1)

    # JSON fractions against an independent count over the PNG.
    values, counts = np.unique(raw, return_counts=True)
    assert len(values) >= 2, "the test needs a prediction with several classes"
    expected = {int(v): int(c) for v, c in zip(values, counts)}
    assert {c["value"]: c["pixels"] for c in data["classes"]} == expected
    for c in data["classes"]:
        assert c["label"] == c["value"] - 1
        assert c["class_name"] == CLASSES[c["label"]]
        assert c["fraction"] == pytest.approx(expected[c["value"]] / (H * W))
    assert sum(c["fraction"] for c in data["classes"]) == pytest.approx(1.0)
    pixels = [c["pixels"] for c in data["classes"]]
    assert pixels == sorted(pixels, reverse=True)

    # Overlay: the image upscaled (nearest) and mixed half and half with the class colours.
    scale = -(-MIN_DRAW_SIDE // min(H, W))
    drawn = np.asarray(Image.open(record["png"]).convert("RGB"))
    assert drawn.shape[0] == H * scale and drawn.shape[1] > W * scale  # legend panel on the right
    big = np.repeat(np.repeat(arr, scale, 0), scale, 1).astype(np.float64)
    big_labels = np.repeat(np.repeat(raw.astype(np.int64) - 1, scale, 0), scale, 1)
    colours = seg_palette(len(CLASSES))[big_labels].astype(np.float64)
    overlay = drawn[:, : W * scale].astype(np.float64)
    assert np.abs(overlay - (big + colours) / 2).max() <= 1.0
    assert (drawn[:, : W * scale] != big.astype(np.uint8)).any()

    # Legend: one swatch in each present class's colour, where the layout puts it.
    panel = drawn[:, W * scale:]
    entries = legend_entries(label_areas(raw.astype(np.int64) - 1), CLASSES, seg_palette(len(CLASSES)))
    layout = legend_layout(entries, panel.shape[0], max(12, H * scale // 18))  # font as drawn
    assert panel.shape[1] == layout.size[0]
    assert len(layout.swatches) == len(data["classes"])
    for entry, (x0, y0, x1, y1), c in zip(entries, layout.swatches, data["classes"]):
        assert entry.label == c["label"] and entry.text.startswith(c["class_name"])
        np.testing.assert_array_equal(panel[(y0 + y1) // 2, (x0 + x1) // 2], seg_palette(len(CLASSES))[c["label"]])
    # Text was drawn right of the swatches (dark pixels on the white panel).
    x_text = layout.text_origins[0][0]
    assert (panel[: layout.swatches[0][3], x_text:] < 100).any()


def test_without_reduce_zero_label_values_are_class_ids(tmp_path, checkpoint, image):
    path, _ = image
    options = TINY + ["test_dataloader.dataset.reduce_zero_label=false"]
    (record,) = run_inference(CONFIG, checkpoint, [path], str(tmp_path), cfg_options=options)
    raw = cv2.imread(record["label_map"], cv2.IMREAD_UNCHANGED)
    assert raw.min() >= 0 and raw.max() < len(CLASSES)
    assert {c["value"]: c["pixels"] for c in record["classes"]} == {
        int(v): int(n) for v, n in zip(*np.unique(raw, return_counts=True))
    }
    assert all(c["value"] == c["label"] for c in record["classes"])


def test_legend_layout_one_entry_per_class_in_columns():
    palette = seg_palette(40)
    labels = np.repeat(np.arange(30), 3).reshape(9, 10)  # 30 classes, 3 pixels each
    entries = legend_entries(label_areas(labels), None, palette)
    assert [e.label for e in entries] == list(range(30))
    assert entries[7].text == "#7  3.3%" and entries[7].color == tuple(palette[7])
    layout = legend_layout(entries, height=100, font_size=12)
    assert len(layout.swatches) == len(layout.text_origins) == 30
    width, height = layout.size
    assert height == 100
    boxes = layout.swatches
    for (x0, y0, x1, y1), (tx, ty) in zip(boxes, layout.text_origins):
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert tx >= x1 and ty == y0
    # No two swatches overlap; 100 px hold 6 rows of 12 px + gap, so 30 entries need 5 columns.
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
    assert len({b[0] for b in boxes}) == 5
    # Named classes: the names are shown.
    named = legend_entries([(1, 5), (0, 5)], ["wall", "floor"], palette)
    assert [e.text for e in named] == ["floor  50.0%", "wall  50.0%"]
    assert legend_layout(named, 100, 12).size[0] < layout.size[0]


def test_drawer_selection_and_errors():
    seg = torch.tensor([[[0, 2], [2, 2]]])
    sample = DataSample(pred_sem_seg=PixelData(data=seg))
    (drawer,) = select_drawers(torch.nn.Identity(), sample)  # chosen by the prediction field
    assert isinstance(drawer, SegPredictionDrawer) and not drawer.reduce_zero_label
    summary = drawer.summarize(sample, None, topk=1)["classes"]  # topk does not cut classes
    assert [(c["label"], c["pixels"], c["class_name"]) for c in summary] == [(2, 3, None), (0, 1, None)]
    with pytest.raises(DataError, match="pred_sem_seg"):
        drawer.summarize(DataSample(), None, 5)
    # reduce_zero_label from the test dataset: its config value, else the dataset class's default.
    stub = torch.nn.Identity()
    stub.cfg = Config({"test_dataloader": {"dataset": {"type": "ADE20KDataset", "pipeline": []}}})
    assert SegPredictionDrawer.for_model(stub).reduce_zero_label
    stub.cfg = Config({"test_dataloader": {"dataset": {"type": "SegFolderDataset", "pipeline": []}}})
    assert not SegPredictionDrawer.for_model(stub).reduce_zero_label

