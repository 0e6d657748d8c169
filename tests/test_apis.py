"""init_model / inference_model / run_inference on a tiny classifier config."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitasks.apis import inference_model, init_model, run_inference
from vitasks.errors import CheckpointError, ConfigError, DataError, VitasksError
from vitasks.models.data_preprocessors import IMAGENET_MEAN, IMAGENET_STD
from vitasks.registry import VISUALIZERS
from vitasks.visualization import PredictionDrawer, select_drawers

IMG = 16
CLASSES = ["red", "green", "blue"]


@pytest.fixture
def config(tiny_cls_config):
    return tiny_cls_config(img_size=IMG)


@pytest.fixture
def checkpoint(tmp_path, config):
    """A vitasks-style checkpoint with a non-zero head, so the classes get distinct scores."""
    model = init_model(str(config))
    with torch.no_grad():
        model.head.fc.weight.normal_(0, 1.0)
        model.head.fc.bias.normal_(0, 1.0)
    path = tmp_path / "tiny.pth"
    torch.save({"meta": {"dataset_meta": {"classes": ["c0", "c1", "c2"]}}, "state_dict": model.state_dict()}, path)
    return path


def write_png(path, size=(IMG, IMG), seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def normalise(arr):
    x = torch.from_numpy(arr).permute(2, 0, 1).float()
    return ((x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None])[None]


def test_init_model_tensor_mode(config):
    model = init_model(str(config))
    assert not model.training
    assert model.dataset_meta["classes"] == CLASSES
    logits = model(torch.randn(2, 3, IMG, IMG), mode="tensor")
    assert logits.shape == (2, 3)


def test_init_model_from_config_object_with_options(config):
    from vitasks.config import load_config

    cfg = load_config(str(config))
    model = init_model(cfg, cfg_options={"model.head.num_classes": 5})
    assert model(torch.randn(1, 3, IMG, IMG), mode="tensor").shape == (1, 5)
    assert cfg.model.head.num_classes == 3  # the caller's config is left alone
    model = init_model(str(config), cfg_options=["num_classes=4"])
    assert model(torch.randn(1, 3, IMG, IMG), mode="tensor").shape == (1, 4)


def test_checkpoint_weights_are_loaded(config, checkpoint):
    model = init_model(str(config), str(checkpoint))
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    torch.testing.assert_close(model.head.fc.weight, saved["head.fc.weight"])
    # The config's class_names win over the checkpoint's meta ...
    assert model.dataset_meta["classes"] == CLASSES


def test_class_names_from_checkpoint_meta(tmp_path, checkpoint, tiny_cls_config):
    model = init_model(str(tiny_cls_config(img_size=IMG, class_names=False)), str(checkpoint))
    assert model.dataset_meta["classes"] == ["c0", "c1", "c2"]


def test_checkpoint_missing_weights(tmp_path, config, checkpoint):
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    del state["head.fc.weight"]
    bad = tmp_path / "partial.pth"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match="head.fc.weight"):
        init_model(str(config), str(bad))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_code_running_checkpoint_is_refused(tmp_path, config):
    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    with pytest.raises(CheckpointError, match="evil.pth"):
        init_model(str(config), str(bad))


def test_inference_model_on_png(tmp_path, config, checkpoint):
    model = init_model(str(config), str(checkpoint))
    arr = write_png(tmp_path / "a.png")
    sample = inference_model(model, str(tmp_path / "a.png"))
    assert sample.img_path == str(tmp_path / "a.png")
    assert sample.pred_score.shape == (3,)
    # Independent: normalise the (already img_size) image by hand and softmax the logits.
    with torch.no_grad():
        expected = model(normalise(arr), mode="tensor").softmax(-1)[0]
    torch.testing.assert_close(sample.pred_score, expected, rtol=1e-5, atol=1e-6)
    assert int(sample.pred_label) == int(expected.argmax())


def test_inference_model_on_arrays_and_lists(tmp_path, config, checkpoint):
    model = init_model(str(config), str(checkpoint))
    arr = write_png(tmp_path / "a.png", size=(24, 20))  # resized + cropped by the pipeline
    from_file = inference_model(model, str(tmp_path / "a.png"))
    samples = inference_model(model, [arr, str(tmp_path / "a.png")], batch_size=2)
    assert isinstance(samples, list) and len(samples) == 2
    torch.testing.assert_close(samples[0].pred_score, from_file.pred_score)
    torch.testing.assert_close(samples[1].pred_score, from_file.pred_score)
    assert samples[0].ori_shape == (24, 20) and samples[0].img_shape == (IMG, IMG)


def test_inference_errors(tmp_path, config):
    model = init_model(str(config))
    with pytest.raises(DataError, match="not found"):
        inference_model(model, str(tmp_path / "missing.png"))
    with pytest.raises(DataError, match="uint8"):
        inference_model(model, np.zeros((8, 8, 3), dtype=np.float32))
    from vitasks.config import load_config

    cfg = load_config(str(config)).to_dict()
    del cfg["test_dataloader"]  # a dict config works too
    with pytest.raises(ConfigError, match="test pipeline"):
        inference_model(init_model(cfg), np.zeros((8, 8, 3), dtype=np.uint8))


def test_run_inference_writes_json_and_png(tmp_path, config, checkpoint):
    images = tmp_path / "images"
    images.mkdir()
    write_png(images / "x.png", seed=1)
    write_png(images / "y.png", seed=2)
    other = tmp_path / "other"
    other.mkdir()
    write_png(other / "x.png", seed=3)
    out = tmp_path / "out"
    records = run_inference(str(config), str(checkpoint), [str(images), str(other / "x.png")], str(out), topk=2)
    assert [r["png"] for r in records] == [str(out / "x.png"), str(out / "y.png"), str(out / "x_1.png")]
    model = init_model(str(config), str(checkpoint))
    for record in records:
        data = json.loads(open(record["json"]).read())
        preds = data["predictions"]
        assert data["file"] == record["file"]
        assert len(preds) == 2
        assert preds[0]["score"] >= preds[1]["score"]
        expected = inference_model(model, record["file"]).pred_score
        for p in preds:
            assert p["class_name"] == CLASSES[p["label"]]
            assert p["score"] == pytest.approx(float(expected[p["label"]]), rel=1e-5)
        assert preds[0]["label"] == int(expected.argmax())
        with Image.open(record["png"]) as im:
            drawn = np.asarray(im.convert("RGB"))
        # Upscaled for legibility (16 px -> 256 px), labels drawn in the top-left corner.
        assert drawn.shape == (256, 256, 3)
        plain = np.repeat(np.repeat(np.asarray(Image.open(record["file"]).convert("RGB")), 16, 0), 16, 1)
        assert (drawn[:40, :120] != plain[:40, :120]).any()
        np.testing.assert_array_equal(drawn[-60:, -60:], plain[-60:, -60:])


def test_run_inference_via_cli(tmp_path, config, checkpoint):
    from vitasks.cli import main

    write_png(tmp_path / "a.png")
    out = tmp_path / "cli_out"
    assert main(["infer", str(config), str(checkpoint), str(tmp_path / "a.png"), "--out-dir", str(out),
                 "--topk", "10"]) == 0
    preds = json.loads((out / "a.json").read_text())["predictions"]
    assert len(preds) == 3  # topk is capped at the number of classes
    assert sum(p["score"] for p in preds) == pytest.approx(1.0, abs=1e-5)
    assert (out / "a.png").is_file()
    assert main(["infer", str(config), str(checkpoint), str(tmp_path / "nope.png"), "--out-dir", str(out)]) == 2


def test_drawers_are_chosen_per_task_model():
    class ToyModel(torch.nn.Module):
        pass

    @VISUALIZERS.register_module(name="ToyDrawerForTest", force=True)
    class ToyDrawer(PredictionDrawer):
        task_models = ("ToyModel",)

    try:
        from mmengine.structures import BaseDataElement

        sample = BaseDataElement(pred_score=torch.ones(2) / 2)
        drawers = select_drawers(ToyModel(), sample)
        assert [type(d) for d in drawers] == [ToyDrawer]
        # An unknown model falls back to the prediction fields (pred_score: classification).
        assert [type(d).__name__ for d in select_drawers(torch.nn.Identity(), sample)] == ["ClsPredictionDrawer"]
        with pytest.raises(VitasksError, match="no prediction drawer"):
            select_drawers(torch.nn.Identity(), BaseDataElement(something=1))
    finally:
        VISUALIZERS.module_dict.pop("ToyDrawerForTest", None)


def test_ade_configs_name_their_classes_without_checkpoint_meta():
    from vitasks.apis import _class_names
    from vitasks.config import load_config
    from vitasks.data.ade import ADE20K_CLASSES

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "seg_ade20k.yaml"))
    names = _class_names(cfg, meta={})
    assert names == list(ADE20K_CLASSES) and len(names) == 150


def test_an_image_model_reads_images_only(tmp_path):
    from vitasks.apis import expand_inputs

    folder = tmp_path / "inputs"
    folder.mkdir()
    for name in ("b.jpg", "a.PNG", "clip.mp4", "notes.txt"):
        (folder / name).write_bytes(b"x")
    assert expand_inputs([str(folder)]) == [str(folder / "a.PNG"), str(folder / "b.jpg")]
    with pytest.raises(DataError, match=r"clip\.mp4 is a video; inference reads images only"):
        expand_inputs([str(folder / "clip.mp4")])
    videos_only = tmp_path / "videos"
    videos_only.mkdir()
    (videos_only / "clip.mp4").write_bytes(b"x")
    with pytest.raises(DataError, match="has no image files"):
        expand_inputs([str(videos_only)])
