"""MultiTaskModel: one shared backbone, task models reused, one backbone pass for inference."""

import copy

import pytest
import torch

from vitasks.errors import ConfigError
from vitasks.registry import MODELS
from vitasks.structures import DataSample, PixelData

EMBED = 32
BACKBONE = dict(type="VisionTransformer", img_size=32, patch_size=8, embed_dim=EMBED, depth=4, num_heads=2,
                mlp_ratio=2.0, pool="mean", class_token=False, stem=dict(type="PatchEmbed"))
CLS_TASK = dict(type="ImageClassifier", head=dict(type="LinearClsHead", num_classes=5, in_channels=EMBED),
                data_preprocessor=dict(type="ClsDataPreprocessor", num_classes=5))
SEG_TASK = dict(type="EncoderDecoder",
                decode_head=dict(type="FCNHead", in_channels=EMBED, in_index=-1, channels=8, num_convs=1,
                                 num_classes=3, dropout_ratio=0.0),
                data_preprocessor=dict(type="SegDataPreprocessor"))


def build(**overrides):
    cfg = dict(type="MultiTaskModel", backbone=copy.deepcopy(BACKBONE),
               tasks=dict(cls=copy.deepcopy(CLS_TASK), seg=copy.deepcopy(SEG_TASK)), out_indices=dict(seg=[1, 3]))
    cfg.update(overrides)
    return MODELS.build(cfg)


def single_models():
    cls = MODELS.build(dict(CLS_TASK, backbone=copy.deepcopy(BACKBONE)))
    seg_cfg = dict(SEG_TASK, backbone=dict(BACKBONE, out_indices=[1, 3]))
    return cls, MODELS.build(seg_cfg)


def cls_batch(n=2):
    samples = [DataSample(metainfo=dict(img_shape=(32, 32))) for _ in range(n)]
    for i, s in enumerate(samples):
        s.gt_label = torch.tensor([i % 5])
    return dict(inputs=[torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8) for _ in range(n)], data_samples=samples)


def seg_batch(n=2):
    samples = []
    for _ in range(n):
        s = DataSample(metainfo=dict(img_shape=(32, 32), ori_shape=(32, 32)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, 3, (1, 32, 32)))
        samples.append(s)
    return dict(inputs=[torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8) for _ in range(n)], data_samples=samples)


def test_state_dict_has_the_backbone_once_and_tasks_prefixed():
    model = build()
    keys = list(model.state_dict())
    assert any(k.startswith("backbone.blocks.0.") for k in keys)
    assert not any(".backbone." in k for k in keys)  # the task views hold no weights
    assert any(k.startswith("tasks.cls.head.") for k in keys)
    assert any(k.startswith("tasks.seg.decode_head.") for k in keys)


def test_outputs_equal_the_single_task_models_with_the_same_weights():
    """The shared pass gives each task what its single-task model computes (independent code
    path: the ViT's own forward with out_indices / pooling)."""
    torch.manual_seed(0)
    model = build().eval()
    cls, seg = single_models()
    cls.eval(), seg.eval()
    cls.load_state_dict({k[len("tasks.cls."):] if k.startswith("tasks.cls.") else k: v
                         for k, v in model.state_dict().items() if not k.startswith("tasks.seg.")}, strict=False)
    seg.load_state_dict({k[len("tasks.seg."):] if k.startswith("tasks.seg.") else k: v
                         for k, v in model.state_dict().items() if not k.startswith("tasks.cls.")}, strict=False)
    x = torch.randn(2, 3, 32, 32)
    out = model(x, mode="tensor")
    torch.testing.assert_close(out["cls"], cls(x, mode="tensor"))
    torch.testing.assert_close(out["seg"], seg(x, mode="tensor"))


def test_single_pass_inference_runs_the_backbone_once():
    model = build().eval()
    calls = []
    model.backbone.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    data = dict(inputs=[torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)],
                data_samples=[DataSample(metainfo=dict(img_shape=(32, 32), ori_shape=(32, 32)))])
    preds = model.predict_all(data)
    assert len(calls) == 1 and model.backbone_calls == 1
    assert preds["cls"][0].pred_score.shape == (5,)
    assert preds["seg"][0].pred_sem_seg.data.shape == (1, 32, 32)


def test_gradients_from_every_task_reach_the_shared_backbone():
    model = build()
    for p in model.tasks.parameters():  # heads may start at zero (no gradient below them yet)
        torch.nn.init.normal_(p, std=0.1)
    for name, batch in (("cls", cls_batch()), ("seg", seg_batch())):
        model.zero_grad()
        loss, _ = model.parse_losses(model.task_loss(name, batch))
        loss.backward()
        grad = model.backbone.blocks[0].attn.qkv.weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
        other = "seg" if name == "cls" else "cls"
        assert all(p.grad is None for p in model.tasks[other].parameters())


def test_settings_for_unknown_tasks_are_named():
    with pytest.raises(ConfigError, match=r"model.loss_weights: \['det'\]"):
        build(loss_weights=dict(det=2.0))


def test_loss_weight_scales_the_task_losses():
    torch.manual_seed(0)
    model = build()
    batch = cls_batch()
    torch.manual_seed(1)
    plain = model.task_loss("cls", copy.deepcopy(batch))["cls/loss"]
    model.loss_weights["cls"] = 0.25
    torch.manual_seed(1)
    weighted = model.task_loss("cls", copy.deepcopy(batch))["cls/loss"]
    torch.testing.assert_close(weighted, plain * 0.25)


def test_single_task_checkpoint_loads_into_the_task_and_back():
    from vitasks.engine.checkpoint import load_model_weights

    cls, _ = single_models()
    model = build()
    result = load_model_weights(model, cls.state_dict(), "single-task checkpoint", skip_head_mismatch=False)
    assert not result["unexpected"]
    torch.testing.assert_close(model.tasks["cls"].head.fc.weight, cls.head.fc.weight)
    torch.testing.assert_close(model.backbone.blocks[2].mlp.fc1.weight, cls.backbone.blocks[2].mlp.fc1.weight)
    # ... and a multi-task checkpoint's cls task back into a classifier
    fresh, _ = single_models()
    result = load_model_weights(fresh, model.state_dict(), "multi-task checkpoint", skip_head_mismatch=False)
    assert not result["missing"]
    torch.testing.assert_close(fresh.head.fc.weight, cls.head.fc.weight)


def test_a_task_with_its_own_backbone_is_named():
    with pytest.raises(ConfigError, match="model.tasks.cls"):
        build(tasks=dict(cls=dict(CLS_TASK, backbone=BACKBONE)), out_indices={})


def test_a_dense_task_reading_the_pooled_feature_is_named():
    with pytest.raises(ConfigError, match="model.tasks.seg.*model.out_indices.seg"):
        build(tasks=dict(seg=SEG_TASK), out_indices={})


def test_a_task_whose_head_and_data_do_not_fit_is_named():
    model = build()
    with pytest.raises(ConfigError, match="task 'seg'.*train_dataloader.tasks.seg"):
        model.task_loss("seg", cls_batch())  # classification samples for a segmentor


def test_task_names_must_be_identifiers():
    with pytest.raises(ConfigError, match="'a/b'"):
        build(tasks={"a/b": CLS_TASK}, out_indices={})


def test_a_task_name_used_twice_in_a_config_file(tmp_path):
    from vitasks.config import load_config

    path = tmp_path / "twice.yaml"
    path.write_text("model:\n  type: MultiTaskModel\n  tasks:\n    cls: {type: ImageClassifier}\n"
                    "    cls: {type: EncoderDecoder}\n")
    with pytest.raises(ConfigError, match="duplicate key 'cls'"):
        load_config(str(path))


def test_infer_draws_every_task_of_one_image_from_one_backbone_pass(tmp_path):
    """apis.run_inference (tools/infer.py) on a multi-task model: one JSON with every task, one
    PNG, and the backbone counted once for the image."""
    import json

    import numpy as np
    from PIL import Image

    from vitasks import apis

    cfg = dict(default_scope="vitasks",
               model=dict(type="MultiTaskModel", backbone=copy.deepcopy(BACKBONE),
                          tasks=dict(cls=copy.deepcopy(CLS_TASK), seg=copy.deepcopy(SEG_TASK)),
                          out_indices=dict(seg=[1, 3])),
               test_pipeline=[dict(type="LoadImage"), dict(type="PackInputs")])
    path = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
    model = apis.init_model(cfg)
    samples = apis.inference_model(model, str(path))
    assert model.backbone_calls == 1
    assert set(samples) == {"cls", "seg"} and samples["seg"].pred_sem_seg.data.shape == (1, 40, 48)
    records = apis.run_inference(cfg, None, [str(path)], str(tmp_path / "out"))
    written = json.load(open(records[0]["json"]))
    assert set(written["tasks"]) == {"cls", "seg"}
    # a fresh model (zero-initialised head: uniform scores), so compare the score, not the label
    assert written["tasks"]["cls"]["predictions"][0]["score"] == pytest.approx(float(samples["cls"].pred_score.max()))
    assert "classes" in written["tasks"]["seg"]
    assert Image.open(records[0]["png"]).size[0] >= 48


def test_batchnorm_stem_with_tasks_normalised_differently_is_warned():
    """One BatchNorm for tasks whose inputs are normalised differently: a warning naming them;
    the same normalisation, or a stem without BatchNorm, says nothing."""
    import warnings

    conv_stem = dict(type="ConvStem", channels=[8, 16], strides=[4, 2])
    seg_per_image = copy.deepcopy(SEG_TASK)
    seg_per_image["data_preprocessor"]["per_image_norm"] = True

    def warnings_when(stem, seg_task):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build(backbone=dict(BACKBONE, stem=stem), tasks=dict(cls=copy.deepcopy(CLS_TASK), seg=seg_task))
        return [str(w.message) for w in caught if "BatchNorm" in str(w.message)]

    said = warnings_when(conv_stem, seg_per_image)
    assert len(said) == 1 and "cls: mean" in said[0] and "seg: standardised per image" in said[0]
    assert warnings_when(conv_stem, copy.deepcopy(SEG_TASK)) == []  # both mean/std alike
    assert warnings_when(dict(conv_stem, norm="LN"), seg_per_image) == []
    assert warnings_when(dict(type="PatchEmbed"), seg_per_image) == []

    # Built on the meta device (shapes only, as tools/benchmark.py and the config tests do), the
    # mean/std buffers hold no values: nothing to compare, and no error (reading them raised).
    from vitasks.benchmarks.throughput import init_on_meta

    seg_other_mean = copy.deepcopy(SEG_TASK)
    seg_other_mean["data_preprocessor"]["mean"] = [127.5, 127.5, 127.5]
    assert len(warnings_when(conv_stem, seg_other_mean)) == 1  # on the CPU: said
    with init_on_meta():
        assert warnings_when(conv_stem, seg_other_mean) == []
        assert warnings_when(conv_stem, copy.deepcopy(SEG_TASK)) == []
