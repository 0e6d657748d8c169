"""The choice of kernels (torchvision's or plain torch) and that both give the same results.

The selection tests run everywhere (torchvision's presence is simulated where it matters). The
comparisons need torchvision with working ops: they skip in CI's first leg (CPU torch, no
torchvision) and run in the second (.ci/run: torch 2.14.1 + torchvision 0.29.1), where they also
check that torchvision's kernels really run.
"""

import importlib

import pytest
import torch

from ops_references import brute_nms
from vitasks.errors import ConfigError
from vitasks.models import ops
from vitasks.models.ops import RoIPooler, batched_nms, kernels, nms, roi_align

pytestmark = pytest.mark.torch_leg

selection = importlib.import_module("vitasks.models.ops.selection")
nms_module = importlib.import_module("vitasks.models.ops.nms")
roi_align_module = importlib.import_module("vitasks.models.ops.roi_align")

MISSING = (None, "ModuleNotFoundError: No module named 'torchvision'")


@pytest.fixture
def fresh_choice(monkeypatch):
    """No choice made yet and no VITASKS_KERNELS; the process's own choice comes back after."""
    saved = selection._choice, selection._chosen_by, selection._probe_result
    monkeypatch.delenv(selection.ENV_VAR, raising=False)
    messages = []
    monkeypatch.setattr(selection, "_log", messages.append)
    selection._reset()
    yield messages
    selection._choice, selection._chosen_by, selection._probe_result = saved


def use(choice):
    """Run the ops on ``choice``'s kernels (the fixture above restores the process's choice)."""
    selection._reset()
    selection._choose(choice, "test")
    assert kernels() == choice


# ------------------------------------------------------------------------------ the choice


def test_choice_is_made_once_and_logged_once(fresh_choice, monkeypatch):
    monkeypatch.setattr(selection, "_probe_result", MISSING)
    assert kernels() == "torch"
    assert kernels() == "torch"
    nms(torch.zeros(1, 4), torch.ones(1), 0.5)
    assert len(fresh_choice) == 1
    assert "plain-torch" in fresh_choice[0] and "No module named 'torchvision'" in fresh_choice[0]


def test_auto_takes_torchvision_when_its_ops_work(fresh_choice, monkeypatch):
    monkeypatch.setattr(selection, "_probe_result", (object(), "torchvision 0.29.1"))
    assert kernels() == "torchvision"
    assert "torchvision's kernels" in fresh_choice[0] and "auto" in fresh_choice[0]


@pytest.mark.parametrize("value", ["torch", "TORCH", " torch "])
def test_environment_forces_plain_torch(fresh_choice, monkeypatch, value):
    monkeypatch.setattr(selection, "_probe_result", (object(), "torchvision 0.29.1"))
    monkeypatch.setenv("VITASKS_KERNELS", value)
    assert kernels() == "torch"
    assert "VITASKS_KERNELS=torch" in fresh_choice[0]


def test_environment_asking_for_a_missing_torchvision_is_an_error(fresh_choice, monkeypatch):
    monkeypatch.setattr(selection, "_probe_result", MISSING)
    monkeypatch.setenv("VITASKS_KERNELS", "torchvision")
    with pytest.raises(ConfigError, match=r"VITASKS_KERNELS=torchvision: .*No module named 'torchvision'"):
        kernels()
    monkeypatch.setenv("VITASKS_KERNELS", "cuda")
    with pytest.raises(ConfigError, match="VITASKS_KERNELS: expected one of auto, torchvision, torch, got 'cuda'"):
        kernels()


def test_config_key_chooses_and_is_checked(fresh_choice, monkeypatch):
    monkeypatch.setattr(selection, "_probe_result", (object(), "torchvision 0.29.1"))
    with pytest.raises(ConfigError, match=r"x.yaml: kernels: expected one of auto, torchvision, torch, got 'mmcv'"):
        selection.select_kernels("mmcv", "x.yaml: kernels")
    assert selection.select_kernels("auto", "x.yaml: kernels") == "torchvision"  # auto decides
    selection._reset()
    assert selection.select_kernels("torch", "x.yaml: kernels") == "torch"
    assert "x.yaml: kernels: torch" in fresh_choice[-1]
    # Once per process: the same again is fine, auto accepts it, the other one is refused.
    assert selection.select_kernels("torch", "y.yaml: kernels") == "torch"
    assert selection.select_kernels(None, "y.yaml: kernels") == "torch"
    with pytest.raises(ConfigError, match="y.yaml: kernels: torchvision asked for, but this process already runs"):
        selection.select_kernels("torchvision", "y.yaml: kernels")


def test_config_asking_for_a_missing_torchvision_is_an_error(fresh_choice, monkeypatch):
    monkeypatch.setattr(selection, "_probe_result", MISSING)
    with pytest.raises(ConfigError, match=r"x.yaml: kernels: torchvision: torchvision's kernels asked for"):
        selection.select_kernels("torchvision", "x.yaml: kernels")
    assert selection._choice is None  # nothing chosen: the error stops the run


def test_environment_wins_over_the_config(fresh_choice, monkeypatch):
    monkeypatch.setattr(selection, "_probe_result", (object(), "torchvision 0.29.1"))
    monkeypatch.setenv("VITASKS_KERNELS", "torch")
    assert selection.select_kernels("torchvision", "x.yaml: kernels") == "torch"
    assert "overrides x.yaml: kernels: torchvision" in fresh_choice[0]


def test_plain_torch_choice_runs_no_torchvision(fresh_choice, monkeypatch):
    def refuse():
        raise AssertionError("torchvision's ops called although plain torch was chosen")

    monkeypatch.setattr(nms_module, "torchvision_ops", refuse)
    monkeypatch.setattr(roi_align_module, "torchvision_ops", refuse)
    use("torch")
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 4.5]])
    assert nms(boxes, torch.tensor([0.2, 0.9]), 0.5).tolist() == [1]
    assert batched_nms(boxes, torch.tensor([0.2, 0.9]), torch.tensor([0, 1]), 0.5).tolist() == [1, 0]
    assert roi_align(torch.ones(1, 1, 4, 4), [boxes], 2, 1.0, 0, True).shape == (2, 1, 2, 2)


def test_the_config_key_is_checked_and_applied_when_the_runner_is_built(fresh_choice, monkeypatch, tmp_path):
    from vitasks.config import load_config
    from vitasks.engine import launch
    from vitasks.engine.runner import VitasksRunner

    monkeypatch.setattr(VitasksRunner, "from_cfg", classmethod(lambda cls, cfg: "runner"))
    monkeypatch.setattr(selection, "_probe_result", (object(), "torchvision 0.29.1"))
    (tmp_path / "x.yaml").write_text("kernels: cuda\n")
    with pytest.raises(ConfigError, match="x.yaml: kernels: expected one of auto, torchvision, torch, got 'cuda'"):
        launch.build_runner(load_config(str(tmp_path / "x.yaml")))
    assert selection._choice is None
    (tmp_path / "x.yaml").write_text("kernels: torch\n")
    assert launch.build_runner(load_config(str(tmp_path / "x.yaml"))) == "runner"
    assert kernels() == "torch"
    assert "x.yaml: kernels: torch" in fresh_choice[0]


# ------------------------------------------------------------------------------ equal results


@pytest.fixture
def tv_ops():
    """torchvision.ops with working compiled ops, else skip (CI's first leg)."""
    pytest.importorskip("torchvision")
    ops_module, reason = selection._probe()
    assert ops_module is not None, f"torchvision imports but its ops do not run: {reason}"
    return ops_module


@pytest.fixture
def counted(tv_ops, monkeypatch):
    """Calls of torchvision's nms and roi_align, to show which kernels really ran."""
    calls = {"nms": 0, "roi_align": 0}
    for name in calls:
        original = getattr(tv_ops, name)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(tv_ops, name, wrapper)
    return calls


def test_auto_runs_torchvision_where_it_works(tv_ops, fresh_choice, counted):
    assert kernels() == "torchvision"
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 4.5], [9.0, 9.0, 12.0, 12.0]])
    scores = torch.tensor([0.2, 0.9, 0.5])
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 1]), 0.5).tolist() == [1, 2, 0]
    roi_align(torch.ones(1, 1, 4, 4), [boxes], 2, 1.0, 0, True)
    RoIPooler(2, (4, 8), 0, True)([torch.ones(1, 1, 8, 8), torch.ones(1, 1, 4, 4)], [boxes * 4])
    assert counted["nms"] == 1 + 2  # batched: one call per group
    assert counted["roi_align"] >= 2
    assert kernels() == "torchvision"


def clustered_boxes(n, generator, dtype):
    """Overlapping clusters with empty, duplicated and inverted boxes."""
    centres = torch.rand(5, 2, generator=generator, dtype=torch.float64) * 200
    centre = centres[torch.randint(0, 5, (n,), generator=generator)]
    centre = centre + torch.randn(n, 2, generator=generator, dtype=torch.float64) * 10
    half = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 20 + 0.5
    boxes = torch.cat((centre - half, centre + half), dim=1)
    boxes[::13, 2] = boxes[::13, 0]  # zero width
    boxes[7::29] = boxes[6::29][: len(boxes[7::29])]  # duplicates
    boxes[11::31, 2:] = boxes[11::31, :2] - 1  # inverted
    return boxes.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7, 0.95])
def test_nms_same_boxes_same_order(tv_ops, dtype, threshold):
    g = torch.Generator().manual_seed(int(threshold * 100))
    for n in (1, 2, 57, 600):
        boxes = clustered_boxes(n, g, dtype)
        scores = torch.rand(n, generator=g, dtype=dtype)
        scores[1::3] = scores[::3][: len(scores[1::3])]  # tied scores
        scores[::10] = 0.5
        expected = nms_module.nms_torch(boxes, scores, threshold)
        assert torch.equal(nms_module.nms_torchvision(boxes, scores, threshold), expected)
        # Without ties, torchvision's own NMS keeps exactly these, in this order.
        distinct = torch.randperm(n, generator=g).to(dtype) / n
        assert torch.equal(tv_ops.nms(boxes, distinct, threshold), nms_module.nms_torch(boxes, distinct, threshold))
    # A small case against the definition, ties included.
    boxes = clustered_boxes(80, g, dtype)
    scores = (torch.arange(80) % 4).to(dtype)
    assert nms_module.nms_torchvision(boxes, scores, threshold).tolist() == brute_nms(boxes, scores, threshold)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_batched_nms_same_boxes_same_order(tv_ops, threshold):
    g = torch.Generator().manual_seed(7)
    for n, num_groups in ((1, 1), (300, 1), (300, 4), (900, 80)):
        boxes = clustered_boxes(n, g, torch.float32) + 3000  # float32 offsets would round these
        scores = (torch.rand(n, generator=g) * 8).round() / 8  # many ties
        groups = torch.randint(0, num_groups, (n,), generator=g)
        expected = nms_module.batched_nms_torch(boxes, scores, groups, threshold)
        assert torch.equal(nms_module.batched_nms_torchvision(boxes, scores, groups, threshold), expected)
    small = slice(0, 120)
    assert nms_module.batched_nms_torchvision(boxes[small], scores[small], groups[small], threshold).tolist() == \
        brute_nms(boxes[small], scores[small], threshold, groups[small].tolist())


def test_batched_nms_is_exactly_per_group_where_offsets_would_round(tv_ops):
    # IoU of the first two boxes: 10 / 10.003 = 0.99970, under the threshold: both stay.
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10.003], [990, 990, 1000, 1000]])
    scores, groups = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([100, 100, 0])
    assert brute_nms(boxes, scores, 0.9998, groups.tolist()) == [0, 1, 2]
    assert nms_module.batched_nms_torch(boxes, scores, groups, 0.9998).tolist() == [0, 1, 2]
    assert nms_module.batched_nms_torchvision(boxes, scores, groups, 0.9998).tolist() == [0, 1, 2]
    # torchvision's own batched_nms shifts group 100 by 100 * 1001 in float32, which rounds
    # 10.003 to 10 (a step of 1/128 there): it drops the second box. vitasks does not use it.
    assert tv_ops.batched_nms(boxes, scores, groups, 0.9998).tolist() == [0, 2]


def test_nms_same_inputs_and_results_on_both_kernels(tv_ops):
    # Half-precision and float64 scores with float32 boxes: both compute in float32 and sort the
    # scores as given (float64 scores that tie in float32 keep their order).
    boxes = clustered_boxes(200, torch.Generator().manual_seed(3), torch.float32)
    scores = torch.linspace(0.5, 0.5 + 1e-9, 200, dtype=torch.float64)
    assert torch.equal(nms_module.nms_torchvision(boxes, scores, 0.5), nms_module.nms_torch(boxes, scores, 0.5))
    half = boxes.half()
    assert torch.equal(nms_module.nms_torchvision(half, scores.half(), 0.5), nms_module.nms_torch(half, scores.half(), 0.5))
    empty = nms_module.nms_torchvision(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert empty.dtype == torch.long and empty.shape == (0,)


def random_rois(n, num_images, image_size, generator):
    boxes = clustered_boxes(n, generator, torch.float32) * (image_size / 200)
    boxes[3::17] *= 3  # large, partly far outside the map
    boxes[4::19, 2:] = boxes[4::19, :2] + 0.3  # tiny
    batch = torch.randint(0, num_images, (n, 1), generator=generator).float()
    return torch.cat((batch, boxes), dim=1)


def forward_backward(fn, features, projection_seed=0):
    leaf = features.clone().requires_grad_(True)
    out = fn(leaf)
    projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(projection_seed), dtype=out.dtype)
    (out * projection).sum().backward()
    return out.detach(), leaf.grad


def assert_within(actual, expected, tolerance):
    """Largest difference relative to the largest magnitude (at least 1): RoIs add their
    gradients into the same cells, so sums in another order differ in the last bits."""
    scale = expected.abs().max().clamp(min=1.0) if expected.numel() else 1.0
    worst = (actual - expected).abs().max() / scale if expected.numel() else 0.0
    assert worst <= tolerance, f"relative difference {float(worst):.3g} > {tolerance}"


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2])
def test_roi_align_forward_and_backward_equal(tv_ops, aligned, sampling_ratio):
    g = torch.Generator().manual_seed(sampling_ratio + 10 * aligned)
    for stride, output_size in ((4, (7, 7)), (16, (3, 5))):
        features = torch.randn(2, 6, 64 // stride + 1, 64 // stride + 4, generator=g)
        rois = random_rois(150, 2, 64.0, g)
        args = (rois, output_size, 1.0 / stride, sampling_ratio, aligned)
        out_tv, grad_tv = forward_backward(lambda f: roi_align_module.roi_align_torchvision(f, *args), features)
        out_pt, grad_pt = forward_backward(lambda f: roi_align_module.roi_align_torch(f, *args), features)
        assert out_tv.shape == out_pt.shape == (150, 6, *output_size)
        assert_within(out_pt, out_tv, 1e-6)
        assert_within(grad_pt, grad_tv, 1e-6)
        # And torchvision's kernel itself, called directly, is what the torchvision path gives.
        assert torch.equal(tv_ops.roi_align(features, *args), out_tv)


def test_roi_align_lists_of_boxes_float64_and_autocast(tv_ops):
    g = torch.Generator().manual_seed(5)
    features = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64)
    per_image = [random_rois(30, 1, 32.0, g)[:, 1:].double() for _ in range(2)]
    out_tv, grad_tv = forward_backward(lambda f: roi_align_module.roi_align_torchvision(f, per_image, 7, 0.5, 0, True), features)
    out_pt, grad_pt = forward_backward(lambda f: roi_align_module.roi_align_torch(f, per_image, 7, 0.5, 0, True), features)
    assert out_tv.dtype == torch.float64
    assert_within(out_pt, out_tv, 1e-12)
    assert_within(grad_pt, grad_tv, 1e-12)
    # Under bf16 autocast both compute in float32 and return the input's dtype.
    features = features.float()
    rois = [b.float() for b in per_image]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_tv = roi_align_module.roi_align_torchvision(features.bfloat16(), rois, 7, 0.5, 0, True)
        out_pt = roi_align_module.roi_align_torch(features.bfloat16(), rois, 7, 0.5, 0, True)
    assert out_tv.dtype == out_pt.dtype == torch.bfloat16
    # Equal float32 results up to rounding, so at most one bf16 step apart.
    torch.testing.assert_close(out_tv.float(), out_pt.float(), rtol=2 ** -8, atol=1e-6)
    # No RoIs, or an empty map: zeros of the right shape on both.
    for boxes, fmap in (([torch.zeros(0, 4)], features), (rois, features[:, :, :0])):
        assert torch.equal(roi_align_module.roi_align_torchvision(fmap, boxes, 3),
                           roi_align_module.roi_align_torch(fmap, boxes, 3))


def test_pooler_and_detector_heads_equal_on_both_kernels(tv_ops, fresh_choice):
    g = torch.Generator().manual_seed(11)
    features = [torch.randn(2, 8, 64 // s, 64 // s, generator=g) for s in (4, 8, 16, 32)]
    rois = random_rois(200, 2, 64.0, g)
    pooler = RoIPooler(7, (4, 8, 16, 32), 0, True)
    use("torchvision")
    pooled_tv = pooler(features, rois)
    use("torch")
    pooled_pt = pooler(features, rois)
    assert_within(pooled_pt, pooled_tv, 1e-6)
    assert ops.kernels() == "torch"


def test_gpu_check_reports_the_kernels_and_their_agreement(tv_ops, fresh_choice):
    from vitasks.benchmarks.gpu_check import detection_kernels, format_report

    info = detection_kernels("cpu")  # what tools/gpu_check.sh runs on the GPU
    assert info["kernels"] == "torchvision"
    assert info["nms_equal"] and info["batched_nms_equal"]
    assert info["roi_align_max_rel_diff"] <= 1e-6
    use("torch")
    assert detection_kernels("cpu") == {"kernels": "torch"}
    report = {"device": "d", "torch": "t", "bf16_peak_tflops": 1.0, "ops": info,
              "sdpa": {"backends": {}, "default_kernels": []}, "table": {},
              "mfu": {"batch_size": 1, "train_tflops": 1.0, "mfu": 1.0}}
    assert "Detection ops (NMS, batched NMS, RoIAlign): torchvision's kernels; on the GPU equal" in format_report(report)


def test_detector_losses_gradients_and_predictions_equal_on_both_kernels(tv_ops, fresh_choice):
    """A tiny Mask R-CNN (as tests/models/test_detector.py builds it): the same losses, gradients
    and detections whichever kernels run its NMS and RoIAlign."""
    import copy

    from mmengine.structures import InstanceData

    from vitasks.registry import MODELS
    from vitasks.structures import DataSample

    torch.manual_seed(0)
    model = MODELS.build(dict(
        type="MaskRCNN", data_preprocessor=dict(type="BaseDataPreprocessor"),
        backbone=dict(type="VisionTransformer", img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                      class_token=False, pool="none", final_norm=False, out_indices=[-1]),
        neck=dict(type="SimpleFeaturePyramid", in_channels=32, out_channels=16),
        rpn_head=dict(type="RPNHead", in_channels=16, anchor_sizes=[8, 16, 32, 64, 128], batch_size_per_image=64,
                      pre_nms_topk=[200, 100], post_nms_topk=[100, 50]),
        roi_head=dict(type="StandardRoIHead", num_classes=3, in_channels=16, batch_size_per_image=64,
                      box_head=dict(conv_channels=16, fc_channels=32, num_convs=2),
                      mask_head=dict(conv_channels=16, num_convs=2)),
    ))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    samples = []
    for shift in (0, 6):
        masks = torch.zeros(2, 64, 64, dtype=torch.bool)
        masks[0, 10 + shift:30, 8:40] = True
        masks[1, 35:60, 30 - shift:55] = True
        data = DataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64), scale_factor=(1.0, 1.0)))
        data.gt_instances = InstanceData(
            bboxes=torch.tensor([[8.0, 10.0 + shift, 40.0, 30.0], [30.0 - shift, 35.0, 55.0, 60.0]]),
            labels=torch.tensor([0, 2]), masks=masks)
        samples.append(data)

    results = {}
    for choice in ("torchvision", "torch"):
        use(choice)
        replica = copy.deepcopy(model)
        torch.manual_seed(3)  # the heads' sampling of anchors and proposals
        losses = replica(images, copy.deepcopy(samples), mode="loss")
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in replica.named_parameters() if p.grad is not None}
        replica.eval()
        with torch.no_grad():
            predictions = replica(images, copy.deepcopy(samples), mode="predict")
        results[choice] = ({k: v.detach() for k, v in losses.items()}, grads, predictions)
    (losses_tv, grads_tv, pred_tv), (losses_pt, grads_pt, pred_pt) = results["torchvision"], results["torch"]
    assert losses_tv.keys() == losses_pt.keys() and grads_tv.keys() == grads_pt.keys()
    for name in losses_tv:
        torch.testing.assert_close(losses_pt[name], losses_tv[name], rtol=1e-5, atol=1e-6)
    for name in grads_tv:
        assert_within(grads_pt[name], grads_tv[name], 1e-5)
    assert sum(len(p.pred_instances) for p in pred_tv) > 0
    for a, b in zip(pred_tv, pred_pt):
        assert torch.equal(a.pred_instances.labels, b.pred_instances.labels)
        torch.testing.assert_close(a.pred_instances.bboxes, b.pred_instances.bboxes, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(a.pred_instances.scores, b.pred_instances.scores, rtol=1e-5, atol=1e-6)
