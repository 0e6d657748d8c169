"""EncoderDecoder: modes, sliding-window and TTA inference, SegDataPreprocessor."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitasks.data  # noqa: F401
import vitasks.models  # noqa: F401  (registers everything)
from vitasks.config import load_config, validate_config
from vitasks.data.synthetic.seg import make_seg_dataset
from vitasks.errors import ConfigError
from vitasks.models.data_preprocessors import SegDataPreprocessor
from vitasks.models.tasks.segmentor import EncoderDecoder, slide_windows
from vitasks.registry import DATASETS, MODELS
from vitasks.structures import DataSample, PixelData

K = 4
C = 32


def upernet_cfg(test_cfg=None, **kwargs):
    return dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreprocessor", size=[64, 64]),
        backbone=dict(type="VisionTransformer", img_size=64, patch_size=16, embed_dim=C, depth=4,
                      num_heads=2, out_indices=[0, 1, 2, 3]),
        neck=dict(type="Feature2Pyramid", embed_dim=C, rescales=[4, 2, 1, 0.5]),
        decode_head=dict(type="UPerHead", in_channels=[C] * 4, in_index=[0, 1, 2, 3], channels=16,
                         num_classes=K),
        auxiliary_head=dict(type="FCNHead", in_channels=C, in_index=2, channels=8, num_convs=1,
                            concat_input=False, num_classes=K,
                            loss_decode=dict(type="CrossEntropyLoss", loss_weight=0.4)),
        test_cfg=test_cfg,
        **kwargs,
    )


def build(test_cfg=None, **kwargs):
    return MODELS.build(upernet_cfg(test_cfg, **kwargs)).eval()


def test_tensor_mode_gives_raw_head_logits():
    model = build()
    out = model(torch.randn(2, 3, 64, 96), mode="tensor")
    assert tuple(out.shape) == (2, K, 16, 24)  # UPerHead at stride 4


def test_loss_keys_and_backward():
    model = build().train()
    pre = model.data_preprocessor
    inputs = [torch.randint(0, 255, (3, 48, 64), dtype=torch.uint8) for _ in range(2)]
    samples = [DataSample(gt_sem_seg=PixelData(data=torch.randint(0, K, (1, 48, 64)))) for _ in range(2)]
    data = pre(dict(inputs=inputs, data_samples=samples), training=True)
    assert data["inputs"].shape == (2, 3, 64, 64)  # padded to size
    losses = model(**data, mode="loss")
    assert set(losses) == {"decode.loss_ce", "decode.acc_seg", "aux.loss_ce", "aux.acc_seg"}
    total = losses["decode.loss_ce"] + losses["aux.loss_ce"]
    total.backward()
    assert model.backbone.blocks[0].attn.qkv.weight.grad is not None


def test_list_of_auxiliary_heads():
    aux = dict(type="SETRPUPHead", in_channels=C, channels=8, num_convs=2, up_scale=4, num_classes=K)
    model = MODELS.build(dict(
        type="EncoderDecoder",
        backbone=dict(type="VisionTransformer", img_size=32, patch_size=16, embed_dim=C, depth=3,
                      num_heads=2, out_indices=[0, 1, 2]),
        decode_head=dict(type="SETRPUPHead", in_channels=C, channels=8, in_index=2, num_classes=K),
        auxiliary_head=[dict(aux, in_index=0), dict(aux, in_index=1)],
    ))
    samples = [DataSample(gt_sem_seg=PixelData(data=torch.randint(0, K, (1, 32, 32)))) for _ in range(2)]
    losses = model(torch.randn(2, 3, 32, 32), samples, mode="loss")
    assert {"decode.loss_ce", "aux_0.loss_ce", "aux_1.loss_ce"} <= set(losses)
    with pytest.raises(ConfigError, match="num_classes=3"):
        MODELS.build(dict(
            type="EncoderDecoder",
            backbone=dict(type="VisionTransformer", img_size=32, patch_size=16, embed_dim=C, depth=1,
                          num_heads=2, out_indices=[0]),
            decode_head=dict(type="SegmenterLinearHead", in_channels=C, num_classes=K),
            auxiliary_head=dict(type="SegmenterLinearHead", in_channels=C, num_classes=3),
        ))


def test_slide_windows_cover_the_image_like_mmseg():
    boxes = slide_windows(512, 2048, (512, 512), (341, 341))
    # cols = (2048 - 512 + 340) // 341 + 1 = 6; the last one ends at the right edge.
    assert len(boxes) == 6 and boxes[-1] == (0, 512, 1536, 2048) and boxes[1] == (0, 512, 341, 853)
    count = torch.zeros(700, 900)
    for y0, y1, x0, x1 in slide_windows(700, 900, (512, 512), (341, 341)):
        assert (y1 - y0, x1 - x0) == (512, 512)
        count[y0:y1, x0:x1] += 1
    assert count.min() >= 1
    assert slide_windows(100, 120, (512, 512), (341, 341)) == [(0, 100, 0, 120)]


def test_slide_equals_whole_when_one_window_covers_the_image():
    x = torch.randn(1, 3, 64, 96)
    whole = build(dict(mode="whole"))
    slide = build(dict(mode="slide", crop_size=[64, 96], stride=[32, 32]))
    slide.load_state_dict(whole.state_dict())
    with torch.no_grad():
        assert torch.allclose(whole.inference(x), slide.inference(x), atol=1e-6)
        # Also when the crop is larger than the image (windows are clipped to it).
        big = build(dict(mode="slide", crop_size=[128, 128], stride=[64, 64]))
        big.load_state_dict(whole.state_dict())
        assert torch.allclose(whole.inference(x), big.inference(x), atol=1e-6)


def test_batched_slide_equals_one_window_at_a_time():
    model = build(dict(mode="slide", crop_size=[32, 32], stride=[21, 21], windows_per_batch=8))
    x = torch.randn(2, 3, 48, 80)  # 2 x 4 windows per image, overlapping, 16 jobs
    with torch.no_grad():
        batched = model.slide_inference(x)
        single = model.slide_inference(x, windows_per_batch=1)
        # Reference: windows one by one, summed and divided by the count, written out here.
        ref = torch.zeros(2, K, 48, 80)
        count = torch.zeros(1, 1, 48, 80)
        for y0, y1, x0, x1 in slide_windows(48, 80, (32, 32), (21, 21)):
            crop = x[:, :, y0:y1, x0:x1]
            logits = F.interpolate(model(crop, mode="tensor"), size=(32, 32), mode="bilinear")
            ref[:, :, y0:y1, x0:x1] += logits
            count[..., y0:y1, x0:x1] += 1
    assert torch.allclose(batched, single, atol=1e-5)
    assert torch.allclose(batched, ref / count, atol=1e-5)


class Pointwise(nn.Module):
    """A flip-equivariant toy backbone: one 1x1 conv (stride 1)."""

    stride = 1

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, C, 1)

    def forward(self, x):
        return (torch.tanh(self.conv(x)),)


def test_flip_tta_on_a_flip_symmetric_model_equals_plain():
    head = dict(type="SegmenterLinearHead", in_channels=C, num_classes=K)
    plain = EncoderDecoder(backbone=Pointwise(), decode_head=head).eval()
    tta_cfg = dict(tta=dict(ratios=[1.0], flip=True))
    tta = EncoderDecoder(backbone=Pointwise(), decode_head=head, test_cfg=tta_cfg).eval()
    tta.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 20, 30)
    with torch.no_grad():
        a = plain.predict(x, [DataSample(metainfo=dict(ori_shape=(20, 30)))])[0]
        b = tta.predict(x, [DataSample(metainfo=dict(ori_shape=(20, 30)))])[0]
    assert torch.allclose(a.seg_logits.data, b.seg_logits.data, atol=1e-6)
    assert torch.equal(a.pred_sem_seg.data, b.pred_sem_seg.data)


def test_multiscale_tta_averages_resized_logits():
    cfg = dict(mode="whole", tta=dict(ratios=[0.5, 1.0], flip=True))
    model = build(cfg)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got = model.aug_inference(x, (40, 50))
        parts = []
        for r in (0.5, 1.0):
            xs = F.interpolate(x, scale_factor=r, mode="bilinear") if r != 1.0 else x
            for flip in (False, True):
                logits = model.encode_decode(xs.flip(-1) if flip else xs)
                logits = logits.flip(-1) if flip else logits
                parts.append(F.interpolate(logits, size=(40, 50), mode="bilinear"))
    assert torch.allclose(got, torch.stack(parts).mean(0), atol=1e-5)
    probs = build(dict(mode="whole", tta=dict(ratios=[1.0], merge="probs")))
    with torch.no_grad():
        p = probs.aug_inference(x, (64, 64))
    assert torch.allclose(p.sum(1), torch.ones(1, 64, 64), atol=1e-5)


def test_predict_resizes_back_and_cuts_padding():
    model = build(dict(mode="slide", crop_size=[32, 32], stride=[24, 24]))
    pre = model.data_preprocessor
    imgs = [torch.randint(0, 255, (3, 48, 64), dtype=torch.uint8),
            torch.randint(0, 255, (3, 32, 40), dtype=torch.uint8)]
    samples = [DataSample(metainfo=dict(ori_shape=(24, 32), img_shape=(48, 64))),
               DataSample(metainfo=dict(ori_shape=(30, 41), img_shape=(32, 40)))]
    data = pre(dict(inputs=imgs, data_samples=samples), training=False)
    assert data["inputs"].shape == (2, 3, 48, 64)  # padded to the batch's largest only
    with torch.no_grad():
        out = model(**data, mode="predict")
        alone = model(**pre(dict(inputs=imgs[1:], data_samples=[DataSample(metainfo=dict(ori_shape=(30, 41)))])),
                      mode="predict")
    assert out[0].pred_sem_seg.data.shape == (1, 24, 32) and out[0].seg_logits.data.shape == (K, 24, 32)
    assert out[1].pred_sem_seg.data.shape == (1, 30, 41)
    # The padding added for batching does not change the second image's prediction.
    assert torch.allclose(out[1].seg_logits.data, alone[0].seg_logits.data, atol=1e-5)


def test_inputs_not_divisible_by_the_patch_are_padded_inside():
    model = build(dict(mode="whole"))
    with torch.no_grad():
        logits = model.inference(torch.randn(1, 3, 50, 70))
    assert logits.shape == (1, K, 50, 70)


def test_data_preprocessor_pads_images_with_zero_and_labels_with_255():
    pre = SegDataPreprocessor(mean=[0, 0, 0], std=[1, 1, 1], size=[8, 10], size_divisor=4)
    img = torch.full((3, 5, 6), 7, dtype=torch.uint8)
    sample = DataSample(gt_sem_seg=PixelData(data=torch.ones(1, 5, 6, dtype=torch.long)))
    data = pre(dict(inputs=[img], data_samples=[sample]), training=True)
    x, s = data["inputs"], data["data_samples"][0]
    assert x.shape == (1, 3, 8, 12)  # size 8x10, then a multiple of 4
    assert (x[0, :, :5, :6] == 7).all() and x[0, :, 5:].abs().sum() == 0 and x[0, :, :, 6:].abs().sum() == 0
    seg = s.gt_sem_seg.data[0]
    assert (seg[:5, :6] == 1).all() and (seg[5:] == 255).all() and (seg[:, 6:] == 255).all()
    assert s.padding_size == [0, 6, 0, 3] and s.pad_shape == (8, 12)
    with pytest.raises(ConfigError):
        SegDataPreprocessor(size=[8])


def test_test_cfg_errors():
    with pytest.raises(ConfigError, match="needs crop_size and stride"):
        build(dict(mode="slide"))
    with pytest.raises(ConfigError, match="unknown keys"):
        build(dict(mode="whole", crop=[1, 1]))
    with pytest.raises(ConfigError, match="'whole' or 'slide'"):
        build(dict(mode="sliding"))
    with pytest.raises(ConfigError, match="tta"):
        build(dict(tta=dict(scales=[1.0])))


CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


@pytest.mark.parametrize(
    "name", ["seg_ade20k.yaml", "seg_ade20k_setr_pup.yaml", "seg_ade20k_segmenter.yaml", "demo/seg_synthetic.yaml"]
)
def test_seg_configs_load_and_validate(name):
    cfg = load_config(os.path.join(CONFIGS, name))
    validate_config(cfg)
    assert cfg.model.type == "EncoderDecoder" and cfg.model.decode_head.num_classes == cfg.num_classes
    assert cfg.val_evaluator.type == "IoUMetric" and cfg.test_dump.type == "SegPredictionDumper"


def test_mae_recipe_settings():
    cfg = load_config(os.path.join(CONFIGS, "seg_ade20k.yaml"))
    bb, head, aux = cfg.model.backbone, cfg.model.decode_head, cfg.model.auxiliary_head
    assert (bb.embed_dim, bb.depth, bb.patch_size, bb.img_size) == (768, 12, 16, 512)
    assert list(bb.out_indices) == [3, 5, 7, 11] and bb.drop_path_rate == 0.1
    assert head.type == "UPerHead" and head.channels == 768
    assert aux.type == "FCNHead" and aux.loss_decode.loss_weight == 0.4
    assert cfg.optim_wrapper.optimizer.lr == 1e-4 and cfg.optim_wrapper.optimizer.weight_decay == 0.05
    assert cfg.optim_wrapper.paramwise_cfg.layer_decay_rate == 0.65
    assert cfg.optim_wrapper.dtype == "bfloat16"
    warmup, poly = cfg.param_scheduler
    assert warmup.end == 1500 and poly.type == "PolyLR" and poly.power == 1.0 and poly.eta_min == 0
    assert cfg.train_cfg.max_iters == 160000 and cfg.train_cfg.val_interval == 16000
    assert cfg.train_dataloader.batch_size == 2  # x 8 GPUs = 16
    assert cfg.default_hooks.checkpoint.interval == 16000 and cfg.default_hooks.checkpoint.save_best == "mIoU"
    assert dict(cfg.model.test_cfg) == dict(mode="slide", crop_size=[512, 512], stride=[341, 341], windows_per_batch=8)


def test_ade_config_retargets_to_a_dataset_of_the_same_layout(tmp_path):
    data = make_seg_dataset(str(tmp_path / "seg"), num_train=2, num_val=1, img_size=32, num_classes=3)
    cfg = load_config(os.path.join(CONFIGS, "seg_ade20k.yaml"), [f"data_root={data}", "num_classes=3"])
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    assert len(dataset) == 2 and len(dataset.metainfo["classes"]) == 3
    assert cfg.model.decode_head.num_classes == 3 and cfg.val_evaluator.num_classes == 3
    item = dataset[0]  # the full ADE training pipeline on the small images
    assert item["inputs"].shape[0] == 3 and item["data_samples"].gt_sem_seg.data.shape[-2:] == item["inputs"].shape[-2:]
