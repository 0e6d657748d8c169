"""MultiTaskModel with every kind of task on one shared backbone: classification, segmentation,
ViTDet detection (windowed backbone), video (clips through the image backbone frame by frame),
the depth plugin; single-task checkpoints in and out (same outputs); layer-wise lr decay over
``tasks.<name>.*`` parameters."""

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from mmengine.structures import InstanceData

from vitasks.engine.checkpoint import load_model_weights
from vitasks.errors import ConfigError
from vitasks.registry import MODELS
from vitasks.structures import DataSample, PixelData

REPO = Path(__file__).resolve().parents[2]
EMBED = 32
# ViTDet's options: windows of 2 x 2 tokens in block 0, global attention in block 1, decomposed
# relative positions; no class token (pooled by the mean for the classifier).
BACKBONE = dict(type="VisionTransformer", img_size=64, patch_size=16, embed_dim=EMBED, depth=2, num_heads=2,
                mlp_ratio=2.0, class_token=False, pool="mean", window_size=2, global_indices=[1], use_rel_pos=True,
                stem=dict(type="PatchEmbed"))
CLS = dict(type="ImageClassifier", head=dict(type="LinearClsHead", num_classes=4, in_channels=EMBED),
           data_preprocessor=dict(type="ClsDataPreprocessor", num_classes=4))
SEG = dict(type="EncoderDecoder",
           decode_head=dict(type="FCNHead", in_channels=EMBED, in_index=-1, channels=8, num_convs=1, num_classes=3,
                            dropout_ratio=0.0),
           data_preprocessor=dict(type="SegDataPreprocessor"))
DET = dict(type="MaskRCNN", data_preprocessor=dict(type="DetDataPreprocessor"),
           neck=dict(type="SimpleFeaturePyramid", in_channels=EMBED, out_channels=16),
           rpn_head=dict(type="RPNHead", in_channels=16, anchor_sizes=[8, 16, 32, 64, 128], batch_size_per_image=64,
                         pre_nms_topk=[200, 100], post_nms_topk=[100, 50]),
           roi_head=dict(type="StandardRoIHead", num_classes=3, in_channels=16, batch_size_per_image=64,
                         box_head=dict(conv_channels=16, fc_channels=32, num_convs=1),
                         mask_head=dict(conv_channels=16, num_convs=1)))
VIDEO = dict(type="Recognizer", head=dict(type="VideoClsHead", num_classes=5, in_channels=EMBED),
             data_preprocessor=dict(type="VideoDataPreprocessor", num_classes=5))
READS = dict(seg=[0, 1], det=[-1])


def build(tasks=("cls", "seg", "det", "video"), backbone=BACKBONE):
    known = dict(cls=CLS, seg=SEG, det=DET, video=VIDEO)
    return MODELS.build(dict(type="MultiTaskModel", backbone=copy.deepcopy(backbone),
                             tasks={n: copy.deepcopy(known[n]) for n in tasks},
                             out_indices={n: READS[n] for n in tasks if n in READS}))


def single(task, backbone=BACKBONE):
    """The task's single-task model: its own backbone, reading what the task reads."""
    cfg = copy.deepcopy(dict(cls=CLS, seg=SEG, det=DET, video=VIDEO)[task])
    cfg["backbone"] = dict(copy.deepcopy(backbone), **({"out_indices": READS[task]} if task in READS else {}))
    return MODELS.build(cfg)


def task_weights(model, task):
    """A single-task state dict cut out of the multi-task model (independent of adapt_state_dict)."""
    start = f"tasks.{task}."
    return {(k[len(start):] if k.startswith(start) else k): v for k, v in model.state_dict().items()
            if k.startswith(start) or k.startswith("backbone.")}


def randomise(model):
    """Heads start at zero in places; random weights make every comparison meaningful."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


# ---------------------------------------------------------------------------- batches
def det_sample(size=64):
    masks = torch.zeros(2, size, size, dtype=torch.bool)
    masks[0, 10:30, 8:40] = True
    masks[1, 35:60, 30:55] = True
    sample = DataSample(metainfo=dict(img_shape=(size, size), ori_shape=(size, size), scale_factor=(1.0, 1.0),
                                      pad_shape=(size, size)))
    sample.gt_instances = InstanceData(bboxes=torch.tensor([[8.0, 10.0, 40.0, 30.0], [30.0, 35.0, 55.0, 60.0]]),
                                       labels=torch.tensor([0, 2]), masks=masks)
    return sample


def images(n, size=64):
    gen = torch.Generator().manual_seed(n)
    return [torch.randint(0, 255, (3, size, size), dtype=torch.uint8, generator=gen) for _ in range(n)]


def batch_for(task, n=2):
    if task == "cls":
        samples = [DataSample(metainfo=dict(img_shape=(64, 64))) for _ in range(n)]
        for i, s in enumerate(samples):
            s.gt_label = torch.tensor([i % 4])
        return dict(inputs=images(n), data_samples=samples)
    if task == "seg":
        samples = []
        for i in range(n):
            s = DataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64)))
            s.gt_sem_seg = PixelData(data=torch.randint(0, 3, (1, 64, 64), generator=torch.Generator().manual_seed(i)))
            samples.append(s)
        return dict(inputs=images(n), data_samples=samples)
    if task == "det":
        return dict(inputs=images(n), data_samples=[det_sample() for _ in range(n)])
    gen = torch.Generator().manual_seed(7)
    clips = [torch.randint(0, 255, (3, 3, 32, 32), dtype=torch.uint8, generator=gen) for _ in range(n)]
    samples = [DataSample(metainfo=dict(img_shape=(32, 32))) for _ in range(n)]
    for i, s in enumerate(samples):
        s.gt_label = torch.tensor([i % 5])
    return dict(inputs=clips, data_samples=samples)


def assert_nested_close(a, b, where="output"):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, msg=where)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_nested_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_nested_close(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# ---------------------------------------------------------------------------- detection
def test_detection_task_equals_the_single_task_detector_on_a_windowed_backbone():
    """The det task reads the last map of the windowed backbone for the simple feature pyramid:
    its raw outputs (RPN maps, proposals, RoI logits) and its losses are the single-task
    MaskRCNN's, computed by the ViT's own forward."""
    model = build(("cls", "det")).eval()
    randomise(model)
    detector = single("det").eval()
    load = detector.load_state_dict(task_weights(model, "det"), strict=False)
    assert not load.missing_keys
    x = torch.randn(1, 3, 64, 64)
    assert_nested_close(model(x, mode="tensor", tasks=["det"])["det"], detector(x, mode="tensor"))
    torch.manual_seed(0)
    ours = model(x, [det_sample()], mode="loss", tasks=["det"])["det"]
    torch.manual_seed(0)
    theirs = detector(x, [det_sample()], mode="loss")
    assert ours.keys() == {f"det/{k}" for k in theirs}
    for key, value in theirs.items():
        torch.testing.assert_close(ours[f"det/{key}"], value, msg=key)


def test_single_pass_inference_with_detection_runs_the_backbone_once():
    model = build(("cls", "seg", "det")).eval()
    randomise(model)
    calls = []
    model.backbone.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    data = dict(inputs=images(1), data_samples=[DataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64)))])
    predictions = model.predict_all(data)
    assert len(calls) == 1 and model.backbone_calls == 1
    assert set(predictions) == {"cls", "seg", "det"}
    det = predictions["det"][0].pred_instances
    assert det.bboxes.shape[1] == 4 and len(det.scores) == len(det.bboxes)
    # each task's answer is the one its own single-task model gives for the image
    detector = single("det").eval()
    detector.load_state_dict(task_weights(model, "det"), strict=False)
    normalised = model.data_preprocessor(copy.deepcopy(data), False)["inputs"]
    theirs = detector.predict(normalised, [DataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64)))])
    torch.testing.assert_close(det.bboxes, theirs[0].pred_instances.bboxes)
    torch.testing.assert_close(det.scores, theirs[0].pred_instances.scores)


# ---------------------------------------------------------------------------- every task
def test_gradients_from_every_task_reach_the_shared_backbone():
    model = build()
    randomise(model)
    for name in ("cls", "seg", "det", "video"):
        model.zero_grad(set_to_none=True)
        loss, _ = model.parse_losses(model.task_loss(name, batch_for(name)))
        assert torch.isfinite(loss), name
        loss.backward()
        for module in (model.backbone.stem, model.backbone.blocks[0], model.backbone.blocks[1]):
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            assert grads and sum(g.abs().sum() for g in grads) > 0, (name, type(module).__name__)
        for other in model.tasks:  # the other tasks' heads get nothing from this task's loss
            if other != name:
                assert all(p.grad is None for p in model.tasks[other].parameters()), (name, other)


def test_one_joint_step_with_every_task_sums_their_gradients():
    """train_step with all four batches (accumulate) = the sum of each task's own gradients."""
    from mmengine.optim import OptimWrapper

    model = build()
    randomise(model)
    batches = {n: batch_for(n) for n in model.tasks}
    expected = None
    for name, batch in batches.items():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the RPN/RoI samplers draw from torch's generator
        loss, _ = model.parse_losses(model.task_loss(name, copy.deepcopy(batch)))
        loss.backward()
        grad = model.backbone.blocks[0].attn.qkv.weight.grad.clone()
        expected = grad if expected is None else expected + grad
    model.zero_grad(set_to_none=True)
    captured = {}

    class Capture(OptimWrapper):
        def step(self, **kwargs):
            captured["grad"] = model.backbone.blocks[0].attn.qkv.weight.grad.clone()

    torch.manual_seed(1)
    # the det task draws from torch's generator; draw the same numbers for it as above
    model.train_step({n: copy.deepcopy(b) for n, b in batches.items() if n != "det"},
                     Capture(torch.optim.SGD(model.parameters(), lr=0.0)))
    partial = captured["grad"]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    model.train_step({"det": copy.deepcopy(batches["det"])}, Capture(torch.optim.SGD(model.parameters(), lr=0.0)))
    torch.testing.assert_close(partial + captured["grad"], expected, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- video
def test_a_video_task_reads_clips_frame_by_frame_through_the_image_backbone():
    model = build(("cls", "video")).eval()
    randomise(model)
    assert model.specs["video"].clips and model.clip_tasks == ["video"] and model.image_tasks == ["cls"]
    clips = torch.randn(2, 3, 3, 32, 32)
    logits = model(clips, mode="tensor")["video"]
    # independent: the image backbone's own forward on every frame, averaged over time
    image_model = single("cls").eval()
    image_model.load_state_dict(task_weights(model, "cls"), strict=False)
    pooled = torch.stack([image_model.backbone(clips[:, :, t])[0] for t in range(3)], dim=1).mean(dim=1)
    head = model.tasks["video"].head
    torch.testing.assert_close(logits, head.fc(pooled))
    # predict: scores per video (views averaged); images do not go to the video task
    batch = model.tasks["video"].data_preprocessor(batch_for("video"), False)
    predictions = model(batch["inputs"], batch["data_samples"], mode="predict")
    assert set(predictions) == {"video"} and predictions["video"][0].pred_score.shape == (5,)
    image_only = model.predict_all(dict(inputs=images(1), data_samples=[DataSample(metainfo=dict(img_shape=(64, 64)))]))
    assert set(image_only) == {"cls"}


def test_a_video_task_cannot_read_block_maps():
    with pytest.raises(ConfigError, match="model.out_indices.video"):
        MODELS.build(dict(type="MultiTaskModel", backbone=copy.deepcopy(BACKBONE),
                          tasks=dict(video=copy.deepcopy(VIDEO)), out_indices=dict(video=[1])))


# ---------------------------------------------------------------------------- depth plugin
def test_the_depth_plugin_is_a_task_of_the_multi_task_model():
    sys.path.insert(0, str(REPO / "plugins" / "depth"))
    import vitasks_depth  # noqa: F401  (registers DepthEstimator, DepthHead, SILogLoss)

    depth_task = dict(type="DepthEstimator", data_preprocessor=dict(type="SegDataPreprocessor"),
                      neck=dict(type="Feature2Pyramid", embed_dim=EMBED, rescales=[2, 1]),
                      decode_head=dict(type="DepthHead", in_channels=EMBED, in_index=0, channels=8, num_convs=1,
                                       loss_decode=dict(type="SILogLoss", lambd=0.5)),
                      test_cfg=dict(mode="whole"))
    model = MODELS.build(dict(type="MultiTaskModel", backbone=copy.deepcopy(BACKBONE),
                              tasks=dict(cls=copy.deepcopy(CLS), depth=depth_task), out_indices=dict(depth=[0, 1])))
    randomise(model)
    alone = MODELS.build(dict(copy.deepcopy(depth_task), backbone=dict(copy.deepcopy(BACKBONE), out_indices=[0, 1])))
    alone.load_state_dict(task_weights(model, "depth"), strict=False)
    model.eval(), alone.eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x, mode="tensor", tasks=["depth"])["depth"], alone(x, mode="tensor"))
    # trains: its SILog loss reaches the shared backbone; predicts pred_depth in one pass with cls
    samples = []
    for _ in range(2):
        s = DataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64)))
        s.gt_depth = PixelData(data=torch.rand(1, 64, 64) * 4 + 0.5)
        samples.append(s)
    model.train()
    loss, _ = model.parse_losses(model.task_loss("depth", dict(inputs=images(2), data_samples=samples)))
    loss.backward()
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    model.eval()
    predictions = model.predict_all(dict(inputs=images(1), data_samples=[DataSample(metainfo=dict(
        img_shape=(64, 64), ori_shape=(64, 64)))]))
    assert model.backbone_calls >= 1 and predictions["depth"][0].pred_depth.data.shape == (1, 64, 64)
    assert predictions["cls"][0].pred_score.shape == (4,)


# ---------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("task", ["cls", "det"])
def test_single_task_checkpoint_loads_into_its_task_and_back_with_the_same_outputs(task, tmp_path):
    """A single-task checkpoint (as the trainer saves it) loads into the matching task of a
    multi-task model (load_from's loader): that task then computes exactly what the single
    model computes; the multi-task checkpoint loads back into a fresh single-task model, with
    the same outputs again."""
    from vitasks.engine.checkpoint import get_state_dict, load_checkpoint_file

    torch.manual_seed(3)
    alone = single(task).eval()
    randomise(alone)
    path = tmp_path / f"{task}.pth"
    torch.save(dict(state_dict=alone.state_dict(), meta=dict()), path)
    multi = build(("cls", "det")).eval()
    # what the runner's load_from does: read the file safely, load non-strictly with the rules
    state = get_state_dict(load_checkpoint_file(str(path)), "load_from")
    result = load_model_weights(multi, state, "load_from", skip_head_mismatch=True)
    assert not result["unexpected"] and not result["skipped"]
    assert all(k.startswith("tasks.") and not k.startswith(f"tasks.{task}.") for k in result["missing"])
    x = torch.randn(1, 3, 64, 64)
    assert_nested_close(multi(x, mode="tensor", tasks=[task])[task], alone(x, mode="tensor"))
    # ... and back
    back = single(task).eval()
    result = load_model_weights(back, multi.state_dict(), "multi-task checkpoint", skip_head_mismatch=False)
    assert not result["missing"]
    assert_nested_close(back(x, mode="tensor"), alone(x, mode="tensor"))


# ---------------------------------------------------------------------------- layer decay
def test_layer_decay_puts_task_heads_at_the_top_and_the_backbone_by_block():
    from vitasks.engine.optimizers import LayerDecayOptimizerConstructor

    model = build(("cls", "seg", "det"))
    rate, depth, base_lr = 0.5, 2, 1.0
    constructor = LayerDecayOptimizerConstructor(dict(optimizer=dict(type="AdamW", lr=base_lr, weight_decay=0.05)),
                                                 dict(layer_decay_rate=rate))
    optimizer = constructor(model).optimizer
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    seen = set()
    for name, param in model.named_parameters():
        # the expected layer, written out from the names (independent of get_layer_id)
        if name.startswith("tasks."):
            layer = depth + 1
        elif name.startswith("backbone.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith("backbone.norm") or name.startswith("backbone.fc_norm"):
            layer = depth + 1
        else:  # stem, position embedding
            layer = 0
        assert math.isclose(lr_of[id(param)], base_lr * rate ** (depth + 1 - layer)), name
        seen.add(name.split(".")[1] if name.startswith("tasks.") else None)
    assert {"cls", "seg", "det"} <= seen


def test_infer_draws_classification_segmentation_and_detection_in_one_png(tmp_path):
    """tools/infer.py's function on a 3-task model: one JSON with every image task (detections
    listed), one PNG, the backbone run once for the image."""
    import json

    import numpy as np
    from PIL import Image

    from vitasks import apis

    cfg = dict(default_scope="vitasks",
               model=dict(type="MultiTaskModel", backbone=copy.deepcopy(BACKBONE),
                          tasks=dict(cls=copy.deepcopy(CLS), seg=copy.deepcopy(SEG), det=copy.deepcopy(DET)),
                          out_indices=dict(seg=READS["seg"], det=READS["det"])),
               test_pipeline=[dict(type="LoadImage"), dict(type="PackInputs")])
    path = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    model = apis.init_model(cfg)
    samples = apis.inference_model(model, str(path))
    assert model.backbone_calls == 1 and set(samples) == {"cls", "seg", "det"}
    records = apis.run_inference(cfg, None, [str(path)], str(tmp_path / "out"))
    written = json.load(open(records[0]["json"]))
    assert set(written["tasks"]) == {"cls", "seg", "det"}
    assert Image.open(records[0]["png"]).size[0] >= 64
