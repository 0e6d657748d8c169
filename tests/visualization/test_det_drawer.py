"""DetPredictionDrawer: boxes, labels, scores and masks drawn and listed; `vitasks infer` on a tiny
detector built from the detection demo config."""

import json
import os

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from mmengine.structures import InstanceData
from PIL import Image

from vitasks.apis import inference_model, init_model, run_inference
from vitasks.errors import DataError
from vitasks.structures import DataSample
from vitasks.visualization import DetPredictionDrawer, seg_palette, select_drawers
from vitasks.visualization.drawers import MIN_DRAW_SIDE

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo", "det_synthetic.yaml")
CLASSES = ["disc", "ring", "star"]
# The demo detector made smaller; the dataset is never built.
TINY = [
    "num_classes=3",
    "model.backbone.embed_dim=32",
    "model.backbone.depth=1",
    "model.backbone.num_heads=2",
    "model.backbone.stem.channels=[8,8,16,16,32,32,32,32]",
    "model.neck.in_channels=32",
    "model.neck.out_channels=16",
    "model.rpn_head.in_channels=16",
    "model.roi_head.in_channels=16",
    "model.roi_head.box_head.fc_channels=32",
    "model.roi_head.mask_head.conv_channels=16",
]


def _sample(h: int = 32, w: int = 40) -> DataSample:
    """Three detections on an (h, w) image: a disc (0.9), a star (0.6) and a ring under the
    drawer's threshold (0.1), each with a rectangular mask inside its box."""
    boxes = torch.tensor([[2.0, 3.0, 18.0, 20.0], [20.0, 8.0, 38.0, 30.0], [0.0, 0.0, 10.0, 10.0]])
    masks = torch.zeros(3, h, w, dtype=torch.bool)
    masks[0, 5:18, 4:16] = True
    masks[1, 10:28, 22:36] = True
    masks[2, 1:9, 1:9] = True
    found = InstanceData()
    found.bboxes = boxes
    found.scores = torch.tensor([0.6, 0.9, 0.1])
    found.labels = torch.tensor([2, 0, 1])
    found.masks = masks
    sample = DataSample(metainfo=dict(ori_shape=(h, w), img_shape=(h, w)))
    sample.pred_instances = found
    return sample


def test_summary_lists_detections_above_threshold_best_first_with_rle_masks():
    sample = _sample()
    summary = DetPredictionDrawer(score_threshold=0.3).summarize(sample, CLASSES, topk=1)
    assert summary["num_detections"] == 3
    dets = summary["detections"]
    assert [d["class_name"] for d in dets] == ["disc", "star"]  # by score; the 0.1 ring left out
    assert [d["score"] for d in dets] == pytest.approx([0.9, 0.6])
    assert dets[0]["bbox"] == [20.0, 8.0, 38.0, 30.0]
    json.dumps(summary)  # JSON-able as written
    for det, index in zip(dets, (1, 0)):
        expected = sample.pred_instances.masks[index].numpy()
        rle = dict(det["segmentation"], counts=det["segmentation"]["counts"].encode("ascii"))
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), expected)
        assert det["area"] == int(expected.sum())
    lower = DetPredictionDrawer(score_threshold=0.05).summarize(sample, CLASSES, topk=1)
    assert [d["class_name"] for d in lower["detections"]] == ["disc", "star", "ring"]


def test_drawing_blends_masks_and_outlines_boxes_in_class_colours():
    h, w = 32, 40
    sample = _sample(h, w)
    image = np.full((h, w, 3), 100, np.uint8)
    drawn = DetPredictionDrawer(score_threshold=0.3, alpha=0.5).draw(image, sample, CLASSES, topk=1)
    scale = int(np.ceil(MIN_DRAW_SIDE / min(h, w)))  # enlarged for legible captions
    assert drawn.shape == (h * scale, w * scale, 3)
    palette = seg_palette(len(CLASSES))
    # Deep inside each mask (away from captions and outlines): (1 - a) * image + a * colour.
    for label, (y, x) in ((0, (26, 33)), (2, (16, 14))):
        expected = np.rint(0.5 * 100 + 0.5 * palette[label].astype(np.float64)).astype(np.uint8)
        np.testing.assert_array_equal(drawn[y * scale + scale // 2, x * scale + scale // 2], expected)
    # The disc's box's right edge (x2 = 38 -> last pixel column 38 * scale - 1) in its colour.
    np.testing.assert_array_equal(drawn[25 * scale, 38 * scale - 1], palette[0])
    # Outside every kept detection (the ring under the threshold is not drawn): the image.
    np.testing.assert_array_equal(drawn[31 * scale + 1, 1 * scale + 1], [100, 100, 100])
    np.testing.assert_array_equal(drawn[1 * scale + scale // 2, 1 * scale + scale // 2], [100, 100, 100])


def test_a_box_thinner_than_a_pixel_is_drawn_one_pixel_wide():
    # A detector can predict a degenerate box (x1 == x2, or y2 just above y1); Pillow raised
    # "x1 must be greater than or equal to x0" on it and the whole inference run stopped.
    found = InstanceData()
    found.bboxes = torch.tensor([[5.0, 4.0, 5.0, 20.0], [2.0, 10.0, 30.0, 10.2]])
    found.scores = torch.tensor([0.9, 0.8])
    found.labels = torch.tensor([0, 2])
    sample = DataSample(metainfo=dict(ori_shape=(32, 40), img_shape=(32, 40)))
    sample.pred_instances = found
    image = np.full((32, 40, 3), 100, np.uint8)
    drawn = DetPredictionDrawer(score_threshold=0.3).draw(image, sample, CLASSES, topk=1)
    scale = int(np.ceil(MIN_DRAW_SIDE / 32))
    palette = seg_palette(len(CLASSES))
    # Each outline is where its box is, in its class colour (below the captions).
    np.testing.assert_array_equal(drawn[15 * scale, 5 * scale], palette[0])
    np.testing.assert_array_equal(drawn[10 * scale, 25 * scale], palette[2])


def test_mask_at_another_size_is_a_clear_error():
    with pytest.raises(DataError, match="original image's size"):
        DetPredictionDrawer().draw(np.zeros((16, 16, 3), np.uint8), _sample(), CLASSES, topk=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Weights whose classifier is sure of class 1 ("ring") so that detections pass 0.3."""
    torch.manual_seed(0)
    model = init_model(CONFIG, cfg_options=TINY)
    with torch.no_grad():
        model.roi_head.box_head.cls_score.bias[1] = 8.0
    path = tmp_path_factory.mktemp("ckpt") / "tiny_det.pth"
    torch.save({"meta": {"dataset_meta": {"classes": CLASSES}}, "state_dict": model.state_dict()}, path)
    return str(path)


def test_run_inference_draws_and_lists_the_detectors_predictions(tmp_path, checkpoint):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    arr[10:30, 12:40] = (250, 30, 30)  # something object-like
    path = tmp_path / "scene.png"
    Image.fromarray(arr).save(path)
    model = init_model(CONFIG, checkpoint, cfg_options=TINY)
    sample = inference_model(model, str(path))
    (drawer,) = select_drawers(model, sample)
    assert isinstance(drawer, DetPredictionDrawer)
    (record,) = run_inference(CONFIG, checkpoint, [str(path)], str(tmp_path / "out"), cfg_options=TINY)
    data = json.loads(open(record["json"]).read())
    found = sample.pred_instances
    kept = (found.scores >= drawer.score_threshold).nonzero().flatten().tolist()
    assert len(kept) > 0
    assert data["num_detections"] == len(found.scores)
    assert len(data["detections"]) == len(kept)
    best = int(found.scores.argmax())
    assert data["detections"][0]["class_name"] == CLASSES[int(found.labels[best])] == "ring"
    assert data["detections"][0]["score"] == pytest.approx(float(found.scores[best]), abs=1e-5)
    np.testing.assert_allclose(data["detections"][0]["bbox"], found.bboxes[best].tolist(), atol=1e-4)
    png = np.asarray(Image.open(record["png"]))
    assert png.shape[0] >= MIN_DRAW_SIDE and png.shape[1] / png.shape[0] == pytest.approx(64 / 48)
