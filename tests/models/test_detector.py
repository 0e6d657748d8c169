"""The two-stage detector end to end on a tiny ViTDet (64 x 64 images, 3 classes): losses,
overfitting one image, gradients into the backbone, predictions mapped back to the original
image, the tensor mode and the cascade."""

import pytest
import torch
from mmengine.structures import InstanceData

from vitasks.errors import ConfigError
from vitasks.models.heads.roi_heads import Detections
from vitasks.registry import MODELS
from vitasks.structures import DataSample

NUM_CLASSES = 3


def tiny_detector(detector="MaskRCNN", roi_head="StandardRoIHead", mask=True):
    roi = dict(type=roi_head, num_classes=NUM_CLASSES, in_channels=16, batch_size_per_image=64,
               box_head=dict(conv_channels=16, fc_channels=32, num_convs=2),
               mask_head=dict(conv_channels=16, num_convs=2) if mask else None)
    cfg = dict(
        type=detector,
        data_preprocessor=dict(type="BaseDataPreprocessor"),
        backbone=dict(type="VisionTransformer", img_size=64, patch_size=16, embed_dim=32, depth=2,
                      num_heads=2, class_token=False, pool="none", final_norm=False, out_indices=[-1],
                      window_size=2, global_indices=[1], use_rel_pos=True),
        neck=dict(type="SimpleFeaturePyramid", in_channels=32, out_channels=16),
        rpn_head=dict(type="RPNHead", in_channels=16, anchor_sizes=[8, 16, 32, 64, 128],
                      batch_size_per_image=64, pre_nms_topk=[200, 100], post_nms_topk=[100, 50]),
        roi_head=roi,
    )
    return MODELS.build(cfg)


def sample(with_masks=True, ori_shape=(128, 128), scale_factor=(0.5, 0.5)):
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 10:30, 8:40] = True
    masks[1, 35:60, 30:55] = True
    data = DataSample(metainfo=dict(img_shape=(64, 64), ori_shape=ori_shape, scale_factor=scale_factor))
    instances = InstanceData(bboxes=torch.tensor([[8.0, 10.0, 40.0, 30.0], [30.0, 35.0, 55.0, 60.0]]),
                             labels=torch.tensor([0, 2]))
    if with_masks:
        instances.masks = masks
    data.gt_instances = instances
    return data


def image():
    torch.manual_seed(1)
    img = torch.randn(1, 3, 64, 64) * 0.1
    img[0, 0, 10:30, 8:40] += 1.0
    img[0, 2, 35:60, 30:55] += 1.0
    return img


def test_losses_are_finite_and_reach_the_backbone():
    model = tiny_detector()
    losses = model(image(), [sample()], mode="loss")
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.neck.levels[0].parameters().__next__().grad is not None
    # The parsed total is what the runner optimises.
    total, _ = model.parse_losses(losses)
    assert total.item() == pytest.approx(sum(v.item() for v in losses.values()), rel=1e-6)


def test_a_few_sgd_steps_overfit_one_image():
    model = tiny_detector()
    img, data = image(), [sample()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    history = []
    for _ in range(15):
        losses = model(img, data, mode="loss")
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append({k: v.item() for k, v in losses.items()})
    first, last = history[0], history[-1]
    assert sum(last.values()) < 0.7 * sum(first.values())
    for key in ("loss_rpn_cls", "loss_cls", "loss_mask"):
        assert last[key] < first[key], key


@pytest.mark.parametrize("detector,roi_head", [("MaskRCNN", "StandardRoIHead"), ("CascadeMaskRCNN", "CascadeRoIHead")])
def test_an_image_without_objects_trains_on_background(detector, roi_head):
    model = tiny_detector(detector, roi_head)
    empty = sample()
    empty.gt_instances = InstanceData(bboxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long),
                                      masks=torch.zeros(0, 64, 64, dtype=torch.bool))
    losses = model(image().repeat(2, 1, 1, 1), [empty, sample()], mode="loss")
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    only_empty = model(image(), [empty], mode="loss")
    box_losses = [v for k, v in only_empty.items() if k.endswith("bbox")]
    assert all(v.item() == 0 for v in box_losses) and only_empty["loss_mask"].item() == 0
    assert only_empty["loss_rpn_cls"].item() > 0


def test_bf16_autocast_keeps_losses_and_boxes_in_float32():
    model = tiny_detector("CascadeMaskRCNN", "CascadeRoIHead")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(image(), [sample()], mode="loss")
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    model.roi_head.score_threshold = 0.0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        (result,) = model(image(), [sample()], mode="predict")
    assert result.pred_instances.bboxes.dtype == torch.float32 and len(result.pred_instances) > 0


def test_predict_maps_detections_back_to_the_original_image():
    model = tiny_detector().eval()
    found = Detections(
        boxes=torch.tensor([[8.0, 10.0, 40.0, 30.0], [60.0, 0.0, 64.0, 64.0], [50.0, 50.0, 50.0, 60.0]]),
        scores=torch.tensor([0.9, 0.8, 0.7]),
        labels=torch.tensor([0, 1, 2]),
        mask_probs=torch.ones(3, 28, 28),
    )
    data = DataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(100, 120), scale_factor=(0.5, 0.8)))
    result = model.to_original(found, data, (64, 64))
    # x / 0.5, y / 0.8, clipped to 120 x 100; the empty third box is dropped.
    assert torch.allclose(result.bboxes, torch.tensor([[16.0, 12.5, 80.0, 37.5], [120.0, 0.0, 120.0, 80.0]])[:1])
    assert result.labels.tolist() == [0] and result.scores.tolist() == [pytest.approx(0.9)]
    assert result.masks.shape == (1, 100, 120) and result.masks.dtype == torch.bool
    # A mask of ones inside its box covers the pixels whose centres lie in the box or on its edge
    # (there the interpolation with the zeros outside gives exactly 0.5).
    rows, cols = result.masks[0].nonzero(as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (12, 37, 16, 79)
    # Without scale_factor: the ratio of img_shape to ori_shape.
    data = DataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(128, 256)))
    result = model.to_original(found._replace(mask_probs=None), data, (64, 64))
    assert torch.allclose(result.bboxes[0], torch.tensor([32.0, 20.0, 160.0, 60.0]))
    assert "masks" not in result


def test_predict_end_to_end():
    model = tiny_detector().eval()
    model.roi_head.score_threshold = 0.0  # an untrained model: keep what it finds
    with torch.no_grad():
        (result,) = model(image(), [sample(ori_shape=(96, 128), scale_factor=(0.5, 2 / 3))], mode="predict")
    pred = result.pred_instances
    assert 0 < len(pred.bboxes) <= 100
    assert pred.masks.shape == (len(pred.bboxes), 96, 128)
    assert pred.bboxes[:, 0::2].max() <= 128 and pred.bboxes[:, 1::2].max() <= 96
    assert pred.labels.max() < NUM_CLASSES and (pred.scores[:-1] >= pred.scores[1:]).all()


def test_tensor_mode_gives_the_raw_head_outputs():
    model = tiny_detector().eval()
    with torch.no_grad():
        outputs = model(image(), mode="tensor")
    assert [o.shape for o in outputs["rpn_objectness"]] == [(1, 3, s, s) for s in (16, 8, 4, 2, 1)]
    assert [d.shape for d in outputs["rpn_deltas"]] == [(1, 12, s, s) for s in (16, 8, 4, 2, 1)]
    num_rois = len(outputs["proposals"][0])
    assert outputs["cls_logits"].shape == (num_rois, NUM_CLASSES + 1)
    assert outputs["bbox_deltas"].shape == (num_rois, 4 * NUM_CLASSES)


def test_cascade_detector_trains_and_predicts():
    model = tiny_detector("CascadeMaskRCNN", "CascadeRoIHead")
    losses = model(image(), [sample()], mode="loss")
    assert {"s0.loss_cls", "s2.loss_bbox", "loss_mask", "loss_rpn_cls"} <= set(losses)
    sum(losses.values()).backward()
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    model.eval()
    model.roi_head.score_threshold = 0.0
    with torch.no_grad():
        (result,) = model(image(), [sample()], mode="predict")
        outputs = model(image(), mode="tensor")
    assert result.pred_instances.masks.shape[1:] == (128, 128)
    assert len(outputs["cls_logits"]) == 3 and outputs["bbox_deltas"][0].shape[1] == 4


def test_compact_polygon_masks_train_like_their_bitmaps():
    """PackDetInputs(mask_format="compact") hands the model polygons; the loss is the one of
    the same masks rasterised beforehand."""
    import numpy as np

    from vitasks.data.det_transforms import InstanceMasks

    polygons = [[np.array([8, 10, 40, 10, 40, 30, 8, 30], np.float64)],
                [np.array([30, 35, 55, 35, 42, 60], np.float64)]]
    compact = InstanceMasks(polygons, (64, 64))
    model = tiny_detector()
    losses = []
    for masks in (compact, compact.to_tensor()):
        data = sample()
        data.gt_instances.masks = masks
        torch.manual_seed(3)
        losses.append(model(image(), [data], mode="loss")["loss_mask"])
    assert losses[0].item() == losses[1].item()
    assert compact.to_tensor()[1].sum() > 0


def test_box_only_detector_and_clear_errors():
    model = tiny_detector("TwoStageDetector", mask=False)
    losses = model(image(), [sample(with_masks=False)], mode="loss")
    assert "loss_mask" not in losses
    with pytest.raises(ValueError, match="needs gt_instances.masks"):
        tiny_detector()(image(), [sample(with_masks=False)], mode="loss")
    with pytest.raises(ConfigError, match="model.neck"):
        MODELS.build(dict(type="MaskRCNN", backbone=dict(type="VisionTransformer"), neck=None,
                          rpn_head={}, roi_head={}, data_preprocessor=dict(type="BaseDataPreprocessor")))


# The recipe configs, shrunk to a tiny model by --cfg-options: they build, train a step and give
# the ViTDet learning rates.
TINY_OPTIONS = {
    "img_size": 64, "input_size": [64, 64],
    "model.backbone.embed_dim": 32, "model.backbone.depth": 2, "model.backbone.num_heads": 2,
    "model.backbone.window_size": 2, "model.backbone.global_indices": [1], "model.backbone.out_indices": [1],
    "model.backbone.with_cp": False,
    "model.neck.in_channels": 32, "model.neck.out_channels": 16,
    "model.rpn_head.in_channels": 16, "model.rpn_head.anchor_sizes": [8, 16, 32, 64, 128],
    "model.rpn_head.pre_nms_topk": [100, 50], "model.rpn_head.post_nms_topk": [50, 50],
    "model.roi_head.in_channels": 16, "model.roi_head.batch_size_per_image": 32,
    "model.roi_head.box_head.conv_channels": 16, "model.roi_head.box_head.fc_channels": 32,
    "model.roi_head.mask_head.conv_channels": 16,
    "num_classes": NUM_CLASSES, "data_root": "/nonexistent/coco",
}


@pytest.mark.parametrize("config,stages", [("configs/det_coco.yaml", 0), ("configs/det_coco_cascade.yaml", 3)])
def test_recipe_configs_build_and_train(config, stages):
    from vitasks.config import load_config, validate_config
    from vitasks.engine.optimizers import LayerDecayOptimizerConstructor

    validate_config(load_config(config))  # every key is an argument of its component
    cfg = load_config(config, cfg_options=TINY_OPTIONS)
    model = MODELS.build(cfg.model)
    assert model.roi_head.num_classes == NUM_CLASSES
    assert len(getattr(model.roi_head, "box_heads", ())) == stages
    inputs = (image() * 58 + 120).clamp(0, 255).to(torch.uint8)
    batch = model.data_preprocessor({"inputs": [inputs[0]], "data_samples": [sample()]}, training=True)
    assert batch["inputs"].shape == (1, 3, 64, 64)
    losses = model(batch["inputs"], batch["data_samples"], mode="loss")
    assert all(torch.isfinite(v) for v in losses.values())

    wrapper_cfg = cfg.optim_wrapper.to_dict()
    assert wrapper_cfg.pop("constructor") == "LayerDecayOptimizerConstructor"
    paramwise_cfg = wrapper_cfg.pop("paramwise_cfg")
    wrapper_cfg.pop("dtype")
    wrapper = LayerDecayOptimizerConstructor(wrapper_cfg, paramwise_cfg)(model)
    lr_of = {id(p): g["lr"] for g in wrapper.optimizer.param_groups for p in g["params"]}
    wd_of = {id(p): g.get("weight_decay", 0.1) for g in wrapper.optimizer.param_groups for p in g["params"]}
    depth = 2
    # Block i (layer i + 1) gets lr * 0.7^(depth + 1 - (i + 1)); neck and heads the full lr.
    assert lr_of[id(model.backbone.blocks[0].attn.qkv.weight)] == pytest.approx(1e-4 * 0.7 ** depth)
    assert lr_of[id(model.backbone.pos_embed)] == pytest.approx(1e-4 * 0.7 ** (depth + 1))
    assert lr_of[id(model.rpn_head.objectness.weight)] == pytest.approx(1e-4)
    assert wd_of[id(model.backbone.pos_embed)] == 0.0
    assert wd_of[id(model.backbone.blocks[0].norm1.weight)] == 0.0
    assert wd_of[id(model.backbone.blocks[0].attn.qkv.weight)] == pytest.approx(0.1)
    schedule = {s["type"]: s for s in cfg.param_scheduler}
    assert schedule["LinearLR"]["end"] == 250 and schedule["MultiStepLR"]["milestones"] == [163889, 177546]
    assert cfg.train_cfg.max_iters == 184375
