"""Inference on video files: ``vitasks infer`` / ``tools/infer.py`` with a video recognizer.

A tiny recognizer built from the video demo config (untrained: the test is about what is read,
predicted and drawn, not about accuracy) on generated H.264 clips.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("av")

from vitasks.apis import init_model, inference_model, prepare_data, run_inference  # noqa: E402
from vitasks.data.synthetic.video import DIRECTIONS, render_clip, write_mp4  # noqa: E402
from vitasks.data.video_io import read_video_frames  # noqa: E402
from vitasks.errors import DataError  # noqa: E402
from vitasks.visualization.browse import FRAME_GAP  # noqa: E402

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "demo" / "video_synthetic.yaml")
# A tiny model on 32 px frames (4 x 4 tokens, 4 time steps; the stem's 96 channels projected to 16).
TINY = [
    "img_size=32", "model.backbone.embed_dim=16", "model.backbone.depth=1", "model.backbone.num_heads=2",
    "model.backbone.stem.proj=true",
    "model.head.in_channels=16", "class_names=[left,right,up,down]", "test_num_clips=1",
]


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    """A 20-frame 40x48 clip (not square: the test pipeline resizes and centre-crops it)."""
    rng = np.random.default_rng(0)
    frames = render_clip(rng, DIRECTIONS["right"], 48, 20, (1, 2))[:, 4:44]  # (20, 40, 48, 3)
    path = str(tmp_path_factory.mktemp("videos") / "moving.mp4")
    write_mp4(path, frames)
    return path


def _strip_frames(png: np.ndarray, num_frames: int, side: int, scale: int) -> list:
    """The frames of the drawn strip (its bottom ``side * scale`` rows), shrunk back to input pixels."""
    shown = side * scale
    strip = png[-shown:]
    return [strip[::scale, i * (shown + FRAME_GAP):i * (shown + FRAME_GAP) + shown:scale] for i in range(num_frames)]


def test_infer_on_a_video_writes_topk_json_and_a_strip_of_the_sampled_frames(tmp_path, clip_path):
    # No checkpoint: both models below start from the same seed, so they hold the same weights.
    torch.manual_seed(0)
    records = run_inference(CONFIG, None, [clip_path], str(tmp_path), topk=3, cfg_options=TINY)
    assert len(records) == 1
    record = json.loads(Path(tmp_path / "moving.json").read_text())
    predictions = record["predictions"]
    assert record["file"] == clip_path and len(predictions) == 3
    scores = [p["score"] for p in predictions]
    assert all(0 <= s <= 1 for s in scores) and sum(scores) <= 1 + 1e-6
    assert scores == sorted(scores, reverse=True)
    assert {p["class_name"] for p in predictions} <= {"left", "right", "up", "down"}

    # The same prediction as the Python API on the same file.
    torch.manual_seed(0)
    model = init_model(CONFIG, None, cfg_options=TINY)
    sample = inference_model(model, clip_path)
    top = sample.pred_score.topk(3)
    assert [p["label"] for p in predictions] == top.indices.tolist()
    np.testing.assert_allclose(scores, top.values.numpy(), rtol=1e-5)

    # The PNG: clip_len frames of img_size, each enlarged by the same whole factor, side by side.
    png = np.asarray(Image.open(tmp_path / "moving.png").convert("RGB"))
    clip_len, side = 8, 32
    scale = int(np.ceil(128 / side))
    assert png.shape[1] == clip_len * side * scale + (clip_len - 1) * FRAME_GAP
    # ...and they are the test pipeline's frames: the middle 8 of 20, resized to 32 px high
    # (40 -> 32, 48 -> 38) and centre-cropped to 32 x 32, checked against a decode of the file.
    inds = sample.metainfo["frame_inds"]
    assert inds.tolist() == list(range(6, 14))
    packed = prepare_data(model, clip_path)[0]["inputs"].numpy()  # (3, T, H, W)
    decoded = read_video_frames(clip_path, inds)
    assert decoded.shape == (8, 40, 48, 3)
    for t, frame in enumerate(_strip_frames(png, clip_len, side, scale)):
        np.testing.assert_array_equal(frame, packed[:, t].transpose(1, 2, 0))
        resized = np.asarray(Image.fromarray(decoded[t]).resize((38, 32), Image.BILINEAR)).astype(float)
        assert np.abs(frame.astype(float) - resized[:, 3:35]).mean() < 12  # same picture, other resampler


def test_video_folder_and_multi_view_strip(tmp_path, clip_path):
    folder = tmp_path / "in"
    folder.mkdir()
    os.symlink(clip_path, folder / "a.mp4")
    (folder / "notes.txt").write_text("not a video")
    (folder / "still.png").write_bytes(b"x")  # images are skipped in a folder for a video model
    views = TINY + ["test_num_clips=2"]
    records = run_inference(CONFIG, None, [str(folder)], str(tmp_path / "out"), topk=2, cfg_options=views)
    assert [r["file"] for r in records] == [str(folder / "a.mp4")]
    png = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    frames = 2 * 8  # two clips of 8 frames, one after the other
    assert png.shape[1] == frames * 32 * 4 + (frames - 1) * FRAME_GAP
    assert sum(p["score"] for p in json.loads((tmp_path / "out" / "a.json").read_text())["predictions"]) <= 1 + 1e-6


def test_video_input_errors(tmp_path, clip_path):
    image = tmp_path / "frame.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    with pytest.raises(DataError, match=r"frame\.png is an image; inference reads videos only with this model"):
        run_inference(CONFIG, None, [str(image)], str(tmp_path / "out"), cfg_options=TINY)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(open(clip_path, "rb").read()[:300])
    with pytest.raises(DataError, match=r"corrupt\.mp4"):
        run_inference(CONFIG, None, [str(corrupt)], str(tmp_path / "out"), cfg_options=TINY)
    with pytest.raises(DataError, match=r"input not found: .*missing\.mp4"):
        run_inference(CONFIG, None, [str(tmp_path / "missing.mp4")], str(tmp_path / "out"), cfg_options=TINY)
    model = init_model(CONFIG, None, cfg_options=TINY)
    with pytest.raises(DataError, match="decodes video files"):
        inference_model(model, np.zeros((32, 32, 3), np.uint8))
    # The model's raw output on the packed clip is what the sample's scores come from.
    data = model.data_preprocessor({"inputs": [prepare_data(model, clip_path)[0]["inputs"]]}, False)
    with torch.no_grad():
        logits = model(data["inputs"], mode="tensor")
    np.testing.assert_allclose(logits.softmax(-1)[0].numpy(), inference_model(model, clip_path).pred_score.numpy(),
                               rtol=1e-5, atol=1e-7)
