"""Inference with a multi-task model that has a video task: ``tools/infer.py`` / ``vitasks infer``
and ``inference_model`` route a video through the clip task's own test pipeline and ``test_step``,
an image through the top-level ``test_pipeline`` to the image tasks.

A tiny classification + video model (the video task reads clips frame by frame through the shared
image backbone) with random weights, on a generated H.264 clip. Expected scores are computed by
hand from the backbone's own forward and the heads' weights.
"""

import copy
import json
import os

import numpy as np
import pytest
import torch
from mmengine.dataset import Compose
from PIL import Image

pytest.importorskip("av")

from vitasks import apis  # noqa: E402
from vitasks.data.synthetic.video import DIRECTIONS, render_clip, write_mp4  # noqa: E402
from vitasks.errors import ConfigError, DataError  # noqa: E402
from vitasks.registry import TRANSFORMS  # noqa: E402
from vitasks.visualization.browse import FRAME_GAP  # noqa: E402

EMBED = 16
BACKBONE = dict(type="VisionTransformer", img_size=32, patch_size=8, embed_dim=EMBED, depth=1, num_heads=2,
                mlp_ratio=2.0, class_token=False, pool="mean")
# Each task normalises with its own statistics: a video normalised by the cls task's would score otherwise.
CLS_MEAN, CLS_STD = [120.0, 110.0, 100.0], [60.0, 55.0, 50.0]
VIDEO_MEAN, VIDEO_STD = [90.0, 100.0, 110.0], [40.0, 45.0, 70.0]
CLS = dict(type="ImageClassifier", head=dict(type="LinearClsHead", num_classes=3, in_channels=EMBED),
           data_preprocessor=dict(type="ClsDataPreprocessor", mean=CLS_MEAN, std=CLS_STD, num_classes=3))
VIDEO = dict(type="Recognizer", head=dict(type="VideoClsHead", num_classes=4, in_channels=EMBED),
             data_preprocessor=dict(type="VideoDataPreprocessor", mean=VIDEO_MEAN, std=VIDEO_STD, num_classes=4))
CLIP_LEN, VIEWS = 3, 2
# Two evenly spread test clips of 3 frames (every 2nd frame), resized and centre-cropped to 32 px.
VIDEO_PIPELINE = [
    dict(type="SampleFrames", clip_len=CLIP_LEN, frame_interval=2, num_clips=VIEWS, test_mode=True,
         out_of_bound_opt="repeat_last"),
    dict(type="DecodeFrames"),
    dict(type="VideoAlbu", transforms=[dict(type="SmallestMaxSize", max_size=32),
                                       dict(type="CenterCrop", height=32, width=32)]),
    dict(type="PackVideoInputs"),
]
IMAGE_PIPELINE = [dict(type="LoadImage"), dict(type="PackInputs")]
CLASS_NAMES = dict(cls=["a", "b", "c"], video=["left", "right", "up", "down"])


def config(tasks=("cls", "video"), loader="test_dataloader"):
    known = dict(cls=CLS, video=VIDEO)
    cfg = dict(default_scope="vitasks",
               model=dict(type="MultiTaskModel", backbone=copy.deepcopy(BACKBONE),
                          tasks={n: copy.deepcopy(known[n]) for n in tasks}),
               test_pipeline=copy.deepcopy(IMAGE_PIPELINE), class_names=copy.deepcopy(CLASS_NAMES))
    if "video" in tasks:
        cfg[loader] = dict(tasks=dict(video=dict(
            batch_size=1, dataset=dict(type="VideoListDataset", pipeline=copy.deepcopy(VIDEO_PIPELINE)))))
    return cfg


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Random weights for every parameter (the heads start at zero: all scores would be equal)."""
    model = apis.init_model(config())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    path = str(tmp_path_factory.mktemp("ckpt") / "weights.pth")
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 12-frame 40x48 clip (the pipeline resizes and crops it) and a 32x32 image."""
    folder = tmp_path_factory.mktemp("inputs")
    frames = render_clip(np.random.default_rng(0), DIRECTIONS["right"], 48, 12, (1, 2))[:, 4:44]
    clip = str(folder / "clip.mp4")
    write_mp4(clip, frames)
    image = str(folder / "still.png")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
    return dict(clip=clip, image=image)


def normalise(x, mean, std, channel_dim):
    shape = [1] * x.dim()
    shape[channel_dim] = 3
    return (x.float() - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


def video_scores_by_hand(model, views):
    """The recognizer's path, written out: each view (3, T, H, W) normalised with the video task's
    statistics, every frame through the backbone's own forward, pooled features averaged over
    time, the head's linear layer, softmax, probabilities averaged over the views."""
    x = normalise(views, VIDEO_MEAN, VIDEO_STD, channel_dim=1)  # (V, 3, T, H, W)
    v, _, t, h, w = x.shape
    frames = x.permute(0, 2, 1, 3, 4).reshape(v * t, 3, h, w)
    with torch.no_grad():
        pooled = model.backbone(frames)[-1].reshape(v, t, -1).mean(dim=1)
        logits = model.tasks["video"].head.fc(pooled)
    return logits.softmax(dim=-1).mean(dim=0)


def image_scores_by_hand(model, image):
    x = normalise(torch.from_numpy(image).permute(2, 0, 1)[None], CLS_MEAN, CLS_STD, channel_dim=1)
    with torch.no_grad():
        return model.tasks["cls"].head.fc(model.backbone(x)[-1]).softmax(dim=-1)[0]


def scores_of(summary):
    return {p["label"]: p["score"] for p in summary["predictions"]}


def test_infer_on_a_video_gives_the_clip_task_from_its_own_pipeline_and_test_step(tmp_path, checkpoint, files):
    clip = files["clip"]
    (record,) = apis.run_inference(config(), checkpoint, [clip], str(tmp_path), topk=4)
    written = json.loads((tmp_path / "clip.json").read_text())
    assert written["file"] == clip and set(written["tasks"]) == {"video"}
    assert {p["class_name"] for p in written["tasks"]["video"]["predictions"]} == set(CLASS_NAMES["video"])

    # The clip task's own pipeline, built here from the config: 2 views of 3 frames, 32 px.
    model = apis.init_model(config(), checkpoint)
    views = Compose([TRANSFORMS.build(copy.deepcopy(t)) for t in VIDEO_PIPELINE])({"filename": clip})["inputs"]
    assert views.shape == (VIEWS, 3, CLIP_LEN, 32, 32)
    packed = apis.prepare_data(model, clip)[0]
    assert set(packed) == {"video"}
    torch.testing.assert_close(packed["video"]["inputs"], views)

    expected = video_scores_by_hand(model, views)
    assert expected.max() - expected.min() > 0.05  # random weights: the classes score differently
    got = scores_of(written["tasks"]["video"])
    np.testing.assert_allclose([got[k] for k in range(4)], expected.numpy(), rtol=1e-4, atol=1e-6)
    sample = apis.inference_model(model, clip)
    assert set(sample) == {"video"} and sample["video"].metainfo["num_views"] == VIEWS
    torch.testing.assert_close(sample["video"].pred_score, expected, rtol=1e-4, atol=1e-6)

    # The PNG is the video drawer's strip of the 6 frames the model saw (32 px, enlarged 4x).
    png = np.asarray(Image.open(record["png"]).convert("RGB"))
    shown = 32 * 4
    assert png.shape[1] == VIEWS * CLIP_LEN * shown + (VIEWS * CLIP_LEN - 1) * FRAME_GAP
    strip = png[-shown:]
    for i, frame in enumerate(views.permute(0, 2, 3, 4, 1).reshape(-1, 32, 32, 3).numpy()):
        x = i * (shown + FRAME_GAP)
        np.testing.assert_array_equal(strip[::4, x:x + shown:4], frame)


def test_infer_on_an_image_still_gives_the_image_tasks(tmp_path, checkpoint, files):
    (record,) = apis.run_inference(config(), checkpoint, [files["image"]], str(tmp_path), topk=3)
    assert set(record["tasks"]) == {"cls"}
    model = apis.init_model(config(), checkpoint)
    image = np.array(Image.open(files["image"]).convert("RGB"))
    expected = image_scores_by_hand(model, image)
    got = scores_of(record["tasks"]["cls"])
    np.testing.assert_allclose([got[k] for k in range(3)], expected.numpy(), rtol=1e-4, atol=1e-6)
    # an array is an image too: the same prediction
    torch.testing.assert_close(apis.inference_model(model, image)["cls"].pred_score, expected, rtol=1e-4, atol=1e-6)
    assert Image.open(record["png"]).size == (256, 256)  # the image, drawn at the readable size


def test_a_mixed_folder_routes_each_file_and_batches_by_kind(tmp_path, checkpoint, files):
    folder = tmp_path / "in"
    folder.mkdir()
    os.symlink(files["clip"], folder / "b.mp4")
    os.symlink(files["image"], folder / "a.png")
    (folder / "notes.txt").write_text("neither")
    records = apis.run_inference(config(), checkpoint, [str(folder)], str(tmp_path / "out"))
    assert [(os.path.basename(r["file"]), set(r["tasks"])) for r in records] == [("a.png", {"cls"}),
                                                                                ("b.mp4", {"video"})]
    assert sorted(os.listdir(tmp_path / "out")) == ["a.json", "a.png", "b.json", "b.png"]
    # inference_model on a mixed list, batched: each input gets what it gets alone
    model = apis.init_model(config(), checkpoint)
    inputs = [files["image"], files["clip"], files["image"]]
    together = apis.inference_model(model, inputs, batch_size=2)
    assert [set(s) for s in together] == [{"cls"}, {"video"}, {"cls"}]
    for item, sample in zip(inputs, together):
        (task, alone), = apis.inference_model(model, item).items()
        torch.testing.assert_close(sample[task].pred_score, alone.pred_score)


def test_inputs_the_model_does_not_read_are_named_with_what_it_reads(tmp_path, files):
    image_only = config(tasks=("cls",))
    with pytest.raises(DataError, match=r"clip\.mp4 is a video; inference reads images only with this model "
                                        r"\(its image tasks cls read images; it has no clip task"):
        apis.run_inference(image_only, None, [files["clip"]], str(tmp_path))
    with pytest.raises(DataError, match=r"clip\.mp4 is a video.*it has no clip task"):
        apis.inference_model(apis.init_model(image_only), files["clip"])

    video_only = config(tasks=("video",))
    with pytest.raises(DataError, match=r"still\.png is an image; inference reads videos only with this model "
                                        r"\(it has no image task; its clip tasks video read videos"):
        apis.run_inference(video_only, None, [files["image"]], str(tmp_path))
    model = apis.init_model(video_only)
    with pytest.raises(DataError, match=r"inputs\[0\] \(an array\) is an image; .*it has no image task"):
        apis.inference_model(model, np.zeros((32, 32, 3), np.uint8))
    # a file named neither way, for a model reading both kinds
    odd = tmp_path / "capture.dat"
    odd.write_bytes(b"x")
    with pytest.raises(DataError, match=r"capture\.dat: cannot tell whether it is an image or a video"):
        apis.inference_model(apis.init_model(config()), str(odd))
    # a folder holding both kinds: only the videos, for a model with only a video task
    folder = tmp_path / "both"
    folder.mkdir()
    os.symlink(files["clip"], folder / "clip.mp4")
    os.symlink(files["image"], folder / "still.png")
    assert apis.expand_inputs([str(folder)], apis.model_inputs(model)) == [str(folder / "clip.mp4")]


def test_the_clip_task_pipeline_comes_from_the_test_loader_else_the_val_loader(files):
    from mmengine.config import Config

    from_val = Config(config(loader="val_dataloader"))
    assert apis.test_pipeline_cfg(from_val, "video") == VIDEO_PIPELINE
    assert apis.test_pipeline_cfg(from_val) == IMAGE_PIPELINE  # images: the top-level test_pipeline
    missing = Config({key: value for key, value in config().items() if key != "test_dataloader"})
    with pytest.raises(ConfigError, match=r"test_dataloader\.tasks\.video\.dataset\.pipeline"):
        apis.test_pipeline_cfg(missing, "video")
    # ...asked for only when a video comes: an image needs no clip task's pipeline
    model = apis.init_model(missing)
    assert set(apis.inference_model(model, files["image"])) == {"cls"}
    with pytest.raises(ConfigError, match=r"no test pipeline for task 'video'"):
        apis.inference_model(model, files["clip"])
    no_decoder = Config(config())
    no_decoder.test_dataloader.tasks.video.dataset.pipeline = copy.deepcopy(IMAGE_PIPELINE)
    with pytest.raises(ConfigError, match=r"clip task 'video' decodes no videos; .*add a DecodeFrames step"):
        apis.inference_model(apis.init_model(no_decoder), files["clip"])
