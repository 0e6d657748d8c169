"""Multi-level neck strides; the decode heads' output shapes, losses, structure and initialisation."""

import math

import pytest
import torch

import vitasks.models  # noqa: F401  (registers everything)
from vitasks.errors import ConfigError
from vitasks.models.heads.decode_head import BaseDecodeHead
from vitasks.registry import MODELS
from vitasks.structures import DataSample, PixelData

K = 5
C = 32
TINY_VIT = dict(type="VisionTransformer", img_size=64, patch_size=16, embed_dim=C, depth=4, num_heads=2,
                out_indices=[0, 1, 2, 3])


def vit_maps(batch=2, size=64):
    backbone = MODELS.build(TINY_VIT)
    return backbone(torch.randn(batch, 3, size, size))


def test_neck_output_strides():
    maps = vit_maps(size=64)  # stride 16: 4x4 maps
    assert [tuple(m.shape) for m in maps] == [(2, C, 4, 4)] * 4
    neck = MODELS.build(dict(type="Feature2Pyramid", embed_dim=C, rescales=[4, 2, 1, 0.5]))
    outs = neck(maps)
    # strides 4, 8, 16, 32 of a 64-pixel input
    assert [tuple(o.shape[-2:]) for o in outs] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert all(o.shape[:2] == (2, C) for o in outs)
    # level 2 is the identity, level 3 a 2x2 max-pool
    assert torch.equal(outs[2], maps[2])
    assert torch.equal(outs[3], torch.nn.functional.max_pool2d(maps[3], 2))
    with pytest.raises(ConfigError, match="2 feature maps for 4 rescales"):
        neck(maps[:2])
    with pytest.raises(ConfigError, match="rescales must be among"):
        MODELS.build(dict(type="Feature2Pyramid", embed_dim=C, rescales=[3]))


def pyramid(batch=2):
    shapes = [16, 8, 4, 2]
    return tuple(torch.randn(batch, C, s, s) for s in shapes)


HEADS = {
    "UPerHead": (dict(type="UPerHead", in_channels=[C] * 4, in_index=[0, 1, 2, 3], channels=16,
                      pool_scales=[1, 2, 3, 6], num_classes=K), "pyramid", (16, 16)),
    "FCNHead": (dict(type="FCNHead", in_channels=C, in_index=2, channels=8, num_convs=1,
                     concat_input=False, num_classes=K), "pyramid", (4, 4)),
    "FCNHead_concat": (dict(type="FCNHead", in_channels=C, in_index=1, channels=8, num_convs=2,
                            concat_input=True, num_classes=K), "pyramid", (8, 8)),
    "SETRPUPHead": (dict(type="SETRPUPHead", in_channels=C, channels=8, in_index=3, num_convs=4,
                         up_scale=2, num_classes=K, dropout_ratio=0.0), "vit", (64, 64)),
    "SETRPUPHead_aux": (dict(type="SETRPUPHead", in_channels=C, channels=8, in_index=0, num_convs=2,
                             up_scale=4, num_classes=K), "vit", (64, 64)),
    "SegmenterLinearHead": (dict(type="SegmenterLinearHead", in_channels=C, num_classes=K), "vit", (4, 4)),
    "SegmenterMaskHead": (dict(type="SegmenterMaskHead", in_channels=C, embed_dims=16, num_layers=2,
                               num_heads=2, num_classes=K), "vit", (4, 4)),
}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_output_shape_and_loss(name):
    cfg, inputs, size = HEADS[name]
    head = MODELS.build(cfg)
    assert isinstance(head, BaseDecodeHead)
    feats = pyramid() if inputs == "pyramid" else vit_maps()
    logits = head(feats)
    assert tuple(logits.shape) == (2, K) + size
    labels = torch.randint(0, K, (2, 1, 64, 64))
    labels[:, :, :8] = 255
    samples = [DataSample(gt_sem_seg=PixelData(data=labels[i])) for i in range(2)]
    losses = head.loss(feats, samples)
    assert set(losses) == {"loss_ce", "acc_seg"}
    assert torch.isfinite(losses["loss_ce"]) and 0 <= losses["acc_seg"] <= 100
    losses["loss_ce"].backward()
    # In eval mode (no dropout, fixed BN) the loss is the cross-entropy of the bilinearly
    # upsampled logits over the non-ignored pixels.
    head.eval()
    with torch.no_grad():
        eval_loss = head.loss(feats, samples)["loss_ce"]
        up = torch.nn.functional.interpolate(head(feats), size=(64, 64), mode="bilinear", align_corners=False)
    # Averaged over all pixels, ignored ones included (mmseg's default).
    summed = torch.nn.functional.cross_entropy(up, labels[:, 0], ignore_index=255, reduction="sum")
    assert eval_loss.item() == pytest.approx(summed.item() / labels.numel(), rel=1e-5)


def test_mask_head_masks_are_normalised_products():
    head = MODELS.build(HEADS["SegmenterMaskHead"][0]).eval()
    feats = vit_maps()
    masks = head(feats)
    # Undo the final LayerNorm over classes: rows of the raw cosine matrix lie in [-1, 1], so
    # the normalised masks have zero mean over classes.
    assert torch.allclose(masks.mean(dim=1), torch.zeros(2, 4, 4), atol=1e-5)
    assert head.cls_emb.shape == (1, K, 16)


def test_head_config_errors():
    with pytest.raises(ConfigError, match="in_index 7 is out of range"):
        MODELS.build(dict(type="FCNHead", in_channels=C, channels=8, in_index=7, num_classes=K))(pyramid())
    with pytest.raises(ConfigError, match="num_classes"):
        MODELS.build(dict(type="FCNHead", in_channels=C, channels=8, num_classes=0))
    with pytest.raises(ConfigError, match="in_index"):
        MODELS.build(dict(type="UPerHead", in_channels=[C] * 4, in_index=[0, 1], channels=8, num_classes=K))


def test_loss_options_class_weight_and_all_ignored():
    head = MODELS.build(dict(
        type="SegmenterLinearHead", in_channels=C, num_classes=K,
        loss_decode=dict(type="CrossEntropyLoss", class_weight=[1.0, 2.0, 1.0, 1.0, 0.5], avg_non_ignore=True),
    ))
    feats = vit_maps()
    labels = torch.full((2, 1, 64, 64), 255)
    samples = [DataSample(gt_sem_seg=PixelData(data=labels[i])) for i in range(2)]
    losses = head.loss(feats, samples)
    assert losses["loss_ce"].item() == 0.0 and losses["acc_seg"].item() == 0.0


def test_loss_takes_the_heads_ignore_index_unless_it_sets_its_own():
    head = MODELS.build(dict(type="SegmenterLinearHead", in_channels=C, num_classes=K, ignore_index=0,
                             loss_decode=dict(type="CrossEntropyLoss", loss_weight=1.0)))
    assert head.loss_decode[0].ignore_index == 0
    head.eval()
    feats = vit_maps()
    labels = torch.randint(0, K, (2, 1, 64, 64))
    samples = [DataSample(gt_sem_seg=PixelData(data=labels[i])) for i in range(2)]
    with torch.no_grad():
        loss = head.loss(feats, samples)["loss_ce"]
        up = torch.nn.functional.interpolate(head(feats), size=(64, 64), mode="bilinear", align_corners=False)
    summed = torch.nn.functional.cross_entropy(up, labels[:, 0], ignore_index=0, reduction="sum")
    assert loss.item() == pytest.approx(summed.item() / labels.numel(), rel=1e-5)
    explicit = MODELS.build(dict(type="SegmenterLinearHead", in_channels=C, num_classes=K, ignore_index=0,
                                 loss_decode=[dict(type="CrossEntropyLoss", ignore_index=7), dict(type="CrossEntropyLoss")]))
    assert [loss.ignore_index for loss in explicit.loss_decode] == [7, 0]
    assert MODELS.build(dict(type="FCNHead", in_channels=C, channels=8, num_classes=K)).loss_decode[0].ignore_index == 255


# ---------------------------------------------------------------------------------------------
# Structure: the parameter shapes each head must have, written out from the published layer lists
# (mmsegmentation's UPerHead, FCNHead, SETRUPHead and Segmenter's mask transformer), independently
# of the heads' code. A conv + BN + ReLU block is a bias-free conv and a BatchNorm (weight, bias).


def conv_bn(cin, cout, k):
    return [(cout, cin, k, k), (cout,), (cout,)]


def classifier(cin, classes):
    return [(classes, cin, 1, 1), (classes,)]


def linear(cin, cout, bias=True):
    return [(cout, cin)] + ([(cout,)] if bias else [])


def layer_norm(dim):
    return [(dim,), (dim,)]


def uper_shapes(in_channels, channels, pool_scales, classes):
    shapes = []
    for _ in pool_scales:  # pyramid pooling: 1x1 conv per scale on the last level
        shapes += conv_bn(in_channels[-1], channels, 1)
    shapes += conv_bn(in_channels[-1] + len(pool_scales) * channels, channels, 3)  # PPM bottleneck
    for c in in_channels[:-1]:
        shapes += conv_bn(c, channels, 1)  # lateral
        shapes += conv_bn(channels, channels, 3)  # FPN output conv
    shapes += conv_bn(len(in_channels) * channels, channels, 3)  # fusion of all levels
    return shapes + classifier(channels, classes)


def fcn_shapes(cin, channels, num_convs, kernel, concat, classes):
    shapes = []
    for i in range(num_convs):
        shapes += conv_bn(cin if i == 0 else channels, channels, kernel)
    if concat:
        shapes += conv_bn(cin + channels, channels, kernel)
    return shapes + classifier(channels, classes)


def setr_pup_shapes(cin, channels, num_convs, classes):
    shapes = layer_norm(cin)
    for i in range(num_convs):
        shapes += conv_bn(cin if i == 0 else channels, channels, 3)
    return shapes + classifier(channels, classes)


def segmenter_mask_shapes(cin, dim, layers, classes, mlp_ratio=4):
    shapes = linear(cin, dim) + [(1, classes, dim)]  # input projection, class embeddings
    for _ in range(layers):  # pre-norm transformer layers
        shapes += layer_norm(dim) + linear(dim, 3 * dim) + linear(dim, dim)
        shapes += layer_norm(dim) + linear(dim, mlp_ratio * dim) + linear(mlp_ratio * dim, dim)
    shapes += layer_norm(dim) + linear(dim, dim, bias=False) + linear(dim, dim, bias=False)
    return shapes + layer_norm(classes)  # mask norm over classes


STRUCTURES = {
    # Distinct channel counts per level, so that swapped dimensions show.
    "UPerHead": (dict(type="UPerHead", in_channels=[12, 20, 28, 36], in_index=[0, 1, 2, 3], channels=16,
                      pool_scales=[1, 2, 3, 6], num_classes=K),
                 uper_shapes([12, 20, 28, 36], 16, [1, 2, 3, 6], K)),
    "FCNHead": (dict(type="FCNHead", in_channels=C, channels=8, num_convs=2, kernel_size=3, concat_input=True,
                     num_classes=K), fcn_shapes(C, 8, 2, 3, True, K)),
    "FCNHead_aux": (dict(type="FCNHead", in_channels=C, channels=8, num_convs=1, concat_input=False, num_classes=K),
                    fcn_shapes(C, 8, 1, 3, False, K)),
    "SETRPUPHead": (dict(type="SETRPUPHead", in_channels=C, channels=8, num_convs=4, up_scale=2, num_classes=K),
                    setr_pup_shapes(C, 8, 4, K)),
    "SegmenterLinearHead": (dict(type="SegmenterLinearHead", in_channels=C, num_classes=K), classifier(C, K)),
    "SegmenterMaskHead": (dict(type="SegmenterMaskHead", in_channels=C, embed_dims=16, num_layers=2, num_heads=2,
                               num_classes=K), segmenter_mask_shapes(C, 16, 2, K)),
}


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_head_parameters_match_the_published_layer_list(name):
    cfg, expected = STRUCTURES[name]
    head = MODELS.build(cfg)
    shapes = [tuple(p.shape) for p in head.parameters()]
    assert sorted(shapes) == sorted(expected)
    assert sum(p.numel() for p in head.parameters()) == sum(math.prod(s) for s in expected)


def test_ade20k_upernet_head_size():
    # The BEiT/MAE ADE20K heads: UperNet of width 768 on four 768-channel levels, and the FCN
    # auxiliary head of width 256 on one. Counted from the layer lists, built on the meta device.
    with torch.device("meta"):
        uper = MODELS.build(dict(type="UPerHead", in_channels=[768] * 4, channels=768, num_classes=150))
        fcn = MODELS.build(dict(type="FCNHead", in_channels=768, channels=256, num_convs=1, concat_input=False,
                                num_classes=150))
    count = sum(p.numel() for p in uper.parameters())
    assert count == sum(math.prod(s) for s in uper_shapes([768] * 4, 768, [1, 2, 3, 6], 150))
    # By hand: PPM 4 x 768^2 + bottleneck 3840 x 768 x 9 + 3 laterals 768^2 + 3 FPN convs 768^2 x 9
    # + fusion 3072 x 768 x 9 + 12 BatchNorms x 2 x 768 + classifier 768 x 150 + 150 (about 68.0M).
    assert count == (4 * 768**2 + 3840 * 768 * 9 + 3 * 768**2 + 3 * 768**2 * 9 + 3072 * 768 * 9
                     + 12 * 2 * 768 + 768 * 150 + 150) == 67_963_542
    assert sum(p.numel() for p in fcn.parameters()) == 768 * 256 * 9 + 2 * 256 + 256 * 150 + 150


def test_segmenter_mask_head_initialisation():
    # Segmenter: every Linear trunc_normal(std 0.02) with zero bias, LayerNorms 1 / 0, class
    # embeddings trunc_normal(std 0.02).
    torch.manual_seed(0)
    head = MODELS.build(dict(type="SegmenterMaskHead", in_channels=96, embed_dims=128, num_layers=2, num_heads=2,
                             num_classes=K))
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 1 + 2 * 4 + 2  # input projection, 4 per layer, patch and class projections
    for layer in linears:
        assert layer.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert layer.weight.abs().max().item() <= 2.0
        assert layer.bias is None or torch.count_nonzero(layer.bias) == 0
    norms = [m for m in head.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 2
    assert all(torch.all(n.weight == 1) and torch.all(n.bias == 0) for n in norms)
    assert head.cls_emb.std().item() == pytest.approx(0.02, rel=0.3)
