"""ViTDet's backbone options (window attention, decomposed relative position bias) and the
simple feature pyramid, each against an independent computation."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitasks.engine.checkpoint import load_model_weights
from vitasks.engine.optimizers import LayerDecayOptimizerConstructor
from vitasks.errors import ConfigError
from vitasks.models.backbones import VisionTransformer
from vitasks.models.layers import Attention, TransformerBlock
from vitasks.models.layers.norm import LayerNorm2d
from vitasks.models.layers.rel_pos import decomposed_rel_pos_bias, get_rel_pos, resize_rel_pos
from vitasks.models.layers.window import window_partition, window_token_index, window_unpartition
from vitasks.models.necks.simple_fpn import SimpleFeaturePyramid
from vitasks.registry import MODELS

DIM, HEADS = 16, 2


def vitdet(**kw):
    cfg = dict(
        img_size=64, patch_size=16, embed_dim=DIM, depth=3, num_heads=HEADS, mlp_ratio=2.0, class_token=False,
        pool="none", out_indices=[-1], final_norm=False, window_size=3, global_indices=[1], use_rel_pos=True,
        rel_pos_zero_init=False,
    )
    cfg.update(kw)
    return VisionTransformer(**cfg)


# ------------------------------------------------------------------------- references


def linear_resize_reference(table: torch.Tensor, length: int) -> torch.Tensor:
    """Linear resampling with half-pixel centres (align_corners=False), written out."""
    L = table.shape[0]
    out = torch.empty(length, table.shape[1], dtype=table.dtype)
    for i in range(length):
        src = max((i + 0.5) * L / length - 0.5, 0.0)
        lo = min(int(math.floor(src)), L - 1)
        hi = min(lo + 1, L - 1)
        frac = src - lo
        out[i] = table[lo] * (1 - frac) + table[hi] * frac
    return out


def rel_index(q: int, k: int, q_size: int, k_size: int) -> int:
    """detectron2's index into the (resampled) table: the shorter side's coordinates are
    stretched by max/min so both sides span the same extent."""
    q_scale = max(k_size / q_size, 1.0)
    k_scale = max(q_size / k_size, 1.0)
    return int(q * q_scale - k * k_scale + (k_size - 1) * k_scale)


def pairwise_bias(q, rel_h, rel_w, q_hw, k_hw):
    """bias[b, n, i, j] = <q_i, Rh[...]> + <q_i, Rw[...]>, one query/key pair at a time."""
    (qh, qw), (kh, kw) = q_hw, k_hw
    Rh = linear_resize_reference(rel_h, 2 * max(qh, kh) - 1) if rel_h.shape[0] != 2 * max(qh, kh) - 1 else rel_h
    Rw = linear_resize_reference(rel_w, 2 * max(qw, kw) - 1) if rel_w.shape[0] != 2 * max(qw, kw) - 1 else rel_w
    B, N = q.shape[:2]
    bias = torch.zeros(B, N, qh * qw, kh * kw, dtype=q.dtype)
    for i in range(qh * qw):
        y, x = divmod(i, qw)
        for j in range(kh * kw):
            ky, kx = divmod(j, kw)
            rh = Rh[rel_index(y, ky, qh, kh)]
            rw = Rw[rel_index(x, kx, qw, kw)]
            bias[:, :, i, j] = q[:, :, i] @ rh + q[:, :, i] @ rw
    return bias


def explicit_attention(attn: Attention, x: torch.Tensor, hw) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + per-pair bias) v, then the projection."""
    B, N, C = x.shape
    d = C // attn.num_heads
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(B, N, 3, attn.num_heads, d).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)
    if attn.use_rel_pos:
        scores = scores + pairwise_bias(q, attn.rel_pos_h, attn.rel_pos_w, hw, hw)
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
    return F.linear(out, attn.proj.weight, attn.proj.bias)


def windowed_attention_brute(attn: Attention, x: torch.Tensor, hw, ws: int) -> torch.Tensor:
    """Window attention by slicing: zero-pad the grid, attend each window alone, cut out."""
    B, N, C = x.shape
    h, w = hw
    Hp, Wp = -(-h // ws) * ws, -(-w // ws) * ws
    grid = torch.zeros(B, Hp, Wp, C)
    grid[:, :h, :w] = x.view(B, h, w, C)
    out = torch.zeros_like(grid)
    for i in range(0, Hp, ws):
        for j in range(0, Wp, ws):
            window = grid[:, i : i + ws, j : j + ws].reshape(B, ws * ws, C)
            out[:, i : i + ws, j : j + ws] = explicit_attention(attn, window, (ws, ws)).view(B, ws, ws, C)
    return out[:, :h, :w].reshape(B, N, C)


# ------------------------------------------------------------------------- windows


def test_window_partition_round_trips_with_padding():
    x = torch.randn(2, 5, 7, 3)
    windows, padded = window_partition(x, 3)
    assert padded == (6, 9) and windows.shape == (2 * 2 * 3, 3, 3, 3)
    grid = F.pad(x, (0, 0, 0, 2, 0, 1))  # zeros at the bottom and right
    for b in range(2):
        for i in range(2):
            for j in range(3):
                expected = grid[b, 3 * i : 3 * i + 3, 3 * j : 3 * j + 3]
                assert torch.equal(windows[b * 6 + i * 3 + j], expected)
    assert torch.equal(window_unpartition(windows, 3, padded, (5, 7)), x)
    # No padding needed: the same round trip.
    windows, padded = window_partition(x[:, :3, :6], 3)
    assert padded == (3, 6) and torch.equal(window_unpartition(windows, 3, padded, (3, 6)), x[:, :3, :6])


def test_window_token_index_names_each_token_once():
    index = window_token_index((5, 7), 3)
    assert index.shape == (6, 9)
    valid = index[index < 35]
    assert sorted(valid.tolist()) == list(range(35))
    assert (index == 35).sum() == 6 * 9 - 35
    # Window (1, 2) starts at row 3, column 6: token 3 * 7 + 6.
    assert index[1 * 3 + 2, 0] == 27 and index[1 * 3 + 2, 1] == 35  # column 7 is padding


@pytest.mark.parametrize("use_rel_pos", [False, True])
def test_window_covering_the_whole_grid_equals_global_attention(use_rel_pos):
    torch.manual_seed(0)
    kw = dict(use_rel_pos=use_rel_pos, input_size=(4, 4), rel_pos_zero_init=False)
    global_block = TransformerBlock(DIM, HEADS, **kw).eval()
    window_block = TransformerBlock(DIM, HEADS, window_size=4, **kw).eval()
    window_block.load_state_dict(global_block.state_dict())  # the tables have the same size
    x = torch.randn(2, 16, DIM)
    with torch.no_grad():
        torch.testing.assert_close(window_block(x, (4, 4)), global_block(x, (4, 4)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("use_rel_pos", [False, True])
def test_window_attention_with_padding_equals_sliced_windows(use_rel_pos):
    torch.manual_seed(0)
    block = TransformerBlock(DIM, HEADS, window_size=3, use_rel_pos=use_rel_pos, rel_pos_zero_init=False).eval()
    x = torch.randn(2, 5 * 7, DIM)
    with torch.no_grad():
        y = block(x, (5, 7))
        attn_out = windowed_attention_brute(block.attn, block.norm1(x), (5, 7), 3)
        expected = x + attn_out
        expected = expected + block.mlp(block.norm2(expected))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_window_block_attention_maps():
    torch.manual_seed(0)
    block = TransformerBlock(DIM, HEADS, window_size=2, use_rel_pos=True, rel_pos_zero_init=False).eval()
    x = torch.randn(1, 4 * 3, DIM)
    with torch.no_grad():
        y, attn = block.forward_with_attention(x, (4, 3))
        torch.testing.assert_close(y, block(x, (4, 3)), rtol=1e-5, atol=1e-5)
    assert attn.shape == (1, HEADS, 12, 12)
    window_of = [(t // 3) // 2 * 2 + (t % 3) // 2 for t in range(12)]  # 2 x 2 windows of the 4 x 3 grid
    for i in range(12):
        for j in range(12):
            if window_of[i] != window_of[j]:
                assert torch.all(attn[0, :, i, j] == 0)
    # The first window (tokens 0, 1, 3, 4) has no padding: its rows sum to one; the last column's
    # windows hold padded keys, which take a share.
    torch.testing.assert_close(attn[0, :, [0, 1, 3, 4]].sum(-1), torch.ones(HEADS, 4))
    assert torch.all(attn[0, :, 2].sum(-1) < 1)


def test_window_block_needs_the_grid():
    block = TransformerBlock(DIM, HEADS, window_size=2)
    with pytest.raises(ValueError, match="patch grid"):
        block(torch.randn(1, 1 + 16, DIM), (4, 4))  # a class token in front


# ------------------------------------------------------------------------- relative position


def test_get_rel_pos_equal_sizes_reads_the_table():
    table = torch.randn(2 * 5 - 1, 4)
    R = get_rel_pos(5, 5, table)
    for i in range(5):
        for j in range(5):
            assert torch.equal(R[i, j], table[i - j + 4])


def test_resize_rel_pos_is_linear_interpolation():
    table = torch.randn(7, 3)
    torch.testing.assert_close(resize_rel_pos(table, 13), linear_resize_reference(table, 13))
    torch.testing.assert_close(resize_rel_pos(table, 5), linear_resize_reference(table, 5))
    assert resize_rel_pos(table, 7) is table


@pytest.mark.parametrize(
    "q_hw, k_hw, table_hw",
    [((3, 4), (3, 4), (3, 4)), ((3, 4), (3, 4), (5, 2)), ((2, 4), (4, 2), (4, 4)), ((4, 3), (2, 6), (3, 3))],
)
def test_decomposed_bias_equals_per_pair_computation(q_hw, k_hw, table_hw):
    torch.manual_seed(0)
    q = torch.randn(2, 3, q_hw[0] * q_hw[1], 4, dtype=torch.float64)
    rel_h = torch.randn(2 * table_hw[0] - 1, 4, dtype=torch.float64)
    rel_w = torch.randn(2 * table_hw[1] - 1, 4, dtype=torch.float64)
    bias = decomposed_rel_pos_bias(q, rel_h, rel_w, q_hw, k_hw)
    torch.testing.assert_close(bias, pairwise_bias(q, rel_h, rel_w, q_hw, k_hw))


@pytest.mark.parametrize("hw", [(4, 4), (6, 5)])  # the tables' own grid, then resampled ones
def test_rel_pos_attention_through_sdpa_equals_explicit_softmax(hw):
    torch.manual_seed(0)
    attn = Attention(DIM, HEADS, use_rel_pos=True, rel_pos_size=(4, 4), rel_pos_zero_init=False).double()
    x = torch.randn(2, hw[0] * hw[1], DIM, dtype=torch.float64)
    y = attn(x, hw)
    expected = explicit_attention(attn, x, hw)
    torch.testing.assert_close(y, expected)
    # The tables learn: their gradients through SDPA's mask equal the explicit ones.
    (g_sdpa,) = torch.autograd.grad(y.square().sum(), attn.rel_pos_h)
    (g_ref,) = torch.autograd.grad(expected.square().sum(), attn.rel_pos_h)
    assert g_sdpa.abs().sum() > 0
    torch.testing.assert_close(g_sdpa, g_ref)
    # The explicit path (attention maps) adds the same bias.
    y_explicit, probs = attn.forward_with_attention(x, hw)
    torch.testing.assert_close(y_explicit, expected)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, HEADS, hw[0] * hw[1], dtype=torch.float64))


def test_rel_pos_tables_init_and_resampled_on_load():
    zero = Attention(DIM, HEADS, use_rel_pos=True, rel_pos_size=(3, 5))
    assert zero.rel_pos_h.shape == (5, DIM // HEADS) and zero.rel_pos_w.shape == (9, DIM // HEADS)
    assert not zero.rel_pos_h.any() and not zero.rel_pos_w.any()
    other = Attention(DIM, HEADS, use_rel_pos=True, rel_pos_size=(4, 4), rel_pos_zero_init=False)
    assert 0 < other.rel_pos_h.std() < 0.05
    zero.load_state_dict(other.state_dict())
    torch.testing.assert_close(zero.rel_pos_h, linear_resize_reference(other.rel_pos_h.detach(), 5))
    torch.testing.assert_close(zero.rel_pos_w, linear_resize_reference(other.rel_pos_w.detach(), 9))
    with pytest.raises(ValueError, match="rel_pos_size"):
        Attention(DIM, HEADS, use_rel_pos=True)


# ------------------------------------------------------------------------- backbone


def plain_forward(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The classic ViT forward written with the modules' weights and no window/rel-pos code:
    tokens, blocks x + attn(norm1(x)) (SDPA without a mask), x + mlp(norm2(x)), final norm."""
    tokens = vit.stem(x).flatten(2).transpose(1, 2) + vit.pos_embed[:, 1:]
    tokens = torch.cat([(vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1), tokens], dim=1)
    for blk in vit.blocks:
        a = blk.attn
        B, N, C = tokens.shape
        q, k, v = a.qkv(blk.norm1(tokens)).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        tokens = tokens + a.proj(y)
        tokens = tokens + blk.mlp(blk.norm2(tokens))
    return vit.norm(tokens)[:, 0]


def test_default_vit_is_bit_identical_to_a_plain_build():
    cfg = dict(img_size=32, embed_dim=DIM, depth=2, num_heads=HEADS)
    torch.manual_seed(0)
    plain = VisionTransformer(**cfg).eval()
    torch.manual_seed(0)
    explicit = VisionTransformer(**cfg, window_size=0, global_indices=(), use_rel_pos=False).eval()
    sd_plain, sd_explicit = plain.state_dict(), explicit.state_dict()
    assert sd_plain.keys() == sd_explicit.keys()
    assert all(torch.equal(sd_plain[k], sd_explicit[k]) for k in sd_plain)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        (out,) = plain(x)
        assert torch.equal(out, explicit(x)[0])
        assert torch.equal(out, plain_forward(plain, x))
    assert all(blk.window_size == 0 and not blk.attn.use_rel_pos for blk in plain.blocks)


def test_window_and_global_blocks_and_table_sizes():
    vit = vitdet(depth=4, global_indices=[1, -1], img_size=(64, 96))
    assert vit.global_indices == (1, 3)
    assert [blk.window_size for blk in vit.blocks] == [3, 0, 3, 0]
    # Window blocks: tables for the 3 x 3 window; global blocks: for the 4 x 6 grid of img_size.
    assert vit.blocks[0].attn.rel_pos_h.shape[0] == 5 and vit.blocks[0].attn.rel_pos_w.shape[0] == 5
    assert vit.blocks[1].attn.rel_pos_h.shape[0] == 7 and vit.blocks[1].attn.rel_pos_w.shape[0] == 11
    # window_size 0 makes every block global whatever global_indices says.
    assert all(blk.window_size == 0 for blk in vitdet(window_size=0).blocks)


def test_vitdet_maps_equal_a_block_by_block_computation():
    vit = vitdet(depth=2, global_indices=[1], drop_path_rate=0.0).eval()
    x = torch.randn(1, 3, 80, 64)  # a 5 x 4 grid: windows of 3 need padding
    with torch.no_grad():
        (feat,) = vit(x)
        tokens = vit.stem(x).flatten(2).transpose(1, 2)
        pos = vit.pos_embed.reshape(1, 4, 4, DIM).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(5, 4), mode="bicubic", align_corners=False)
        tokens = tokens + pos.flatten(2).transpose(1, 2)
        blk0, blk1 = vit.blocks
        tokens = tokens + windowed_attention_brute(blk0.attn, blk0.norm1(tokens), (5, 4), 3)
        tokens = tokens + blk0.mlp(blk0.norm2(tokens))
        tokens = tokens + explicit_attention(blk1.attn, blk1.norm1(tokens), (5, 4))
        tokens = tokens + blk1.mlp(blk1.norm2(tokens))
    assert feat.shape == (1, DIM, 5, 4)
    torch.testing.assert_close(feat, tokens.transpose(1, 2).reshape(1, DIM, 5, 4), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("img_size", [1024, (1024, 768)])
def test_224_checkpoint_loads_into_a_1024_windowed_backbone(img_size):
    torch.manual_seed(0)
    source = VisionTransformer(img_size=224, embed_dim=DIM, depth=2, num_heads=HEADS, mlp_ratio=1.0)
    target = VisionTransformer(
        img_size=img_size, embed_dim=DIM, depth=2, num_heads=HEADS, mlp_ratio=1.0, class_token=False, pool="none",
        out_indices=[-1], final_norm=False, window_size=14, global_indices=[1], use_rel_pos=True,
    )
    result = load_model_weights(target, source.state_dict(), "a 224 checkpoint")
    assert sorted(result["missing"]) == sorted(f"blocks.{i}.attn.rel_pos_{a}" for i in range(2) for a in "hw")
    assert set(result["unexpected"]) == {"cls_token", "norm.weight", "norm.bias"}
    grid = target.grid_size
    source_grid = source.pos_embed[:, 1:].reshape(1, 14, 14, DIM).permute(0, 3, 1, 2)
    expected = F.interpolate(source_grid, size=grid, mode="bicubic", align_corners=False)
    torch.testing.assert_close(target.pos_embed, expected.flatten(2).transpose(1, 2), rtol=0, atol=0)
    assert torch.equal(target.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    # Global blocks' tables are sized for the 1024 grid, window blocks' for the window.
    assert target.blocks[1].attn.rel_pos_h.shape[0] == 2 * grid[0] - 1
    assert target.blocks[0].attn.rel_pos_w.shape[0] == 2 * 14 - 1
    side = (img_size, img_size) if isinstance(img_size, int) else img_size
    with torch.no_grad():
        (feat,) = target.eval()(torch.randn(1, 3, *side))
    assert feat.shape == (1, DIM, side[0] // 16, side[1] // 16) and torch.isfinite(feat).all()


def test_grad_checkpointing_with_windows_gives_the_same_gradients():
    x = torch.randn(2, 3, 80, 64)

    def grads(model):
        torch.manual_seed(123)  # the same drop-path masks in both runs
        model.zero_grad()
        model(x)[0].square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = vitdet(drop_path_rate=0.2).train()
    cp = vitdet(drop_path_rate=0.2, with_cp=True).train()
    cp.load_state_dict(ref.state_dict())
    g_ref, g_cp = grads(ref), grads(cp)
    assert g_ref.keys() == g_cp.keys() and g_ref["blocks.0.attn.rel_pos_h"].abs().sum() > 0
    for n in g_ref:
        torch.testing.assert_close(g_cp[n], g_ref[n], rtol=1e-5, atol=1e-6, msg=n)
    # Drop path is active with windows: two training passes differ, eval passes do not.
    torch.manual_seed(1)
    a = ref(x)[0]
    torch.manual_seed(2)
    assert not torch.equal(a, ref(x)[0])


def test_layer_ids_and_no_weight_decay_of_rel_pos_tables_and_neck():
    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = vitdet()
            self.neck = SimpleFeaturePyramid(in_channels=DIM, out_channels=8)

    model = Detector()
    depth, decay, lr, wd = 3, 0.5, 1e-3, 0.1
    assert model.backbone.get_layer_id("blocks.2.attn.rel_pos_w") == 3
    expected_no_wd = {f"blocks.{i}.attn.rel_pos_{a}" for i in range(depth) for a in "hw"} | {"pos_embed"}
    assert model.backbone.no_weight_decay() == expected_no_wd
    cfg = dict(optimizer=dict(type="AdamW", lr=lr, weight_decay=wd))
    groups = LayerDecayOptimizerConstructor(cfg, dict(layer_decay_rate=decay))(model).optimizer.param_groups
    for name, param in model.named_parameters():
        (group,) = [g for g in groups if any(p is param for p in g["params"])]
        if name.startswith("backbone.blocks."):
            layer_id = int(name.split(".")[2]) + 1
        elif name.startswith("backbone."):
            layer_id = 0  # stem and position embedding
        else:
            layer_id = depth + 1  # the neck
        assert group["lr"] == pytest.approx(lr * decay ** (depth + 1 - layer_id)), name
        no_wd = param.ndim == 1 or "rel_pos" in name or name == "backbone.pos_embed"
        assert group["weight_decay"] == (0.0 if no_wd else wd), name


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(class_token=True, pool="token"), "class_token: false"),
        (dict(window_size=0, num_reg_tokens=1), "num_reg_tokens: 0"),
        (dict(window_size=-1), "window_size"),
        (dict(window_size=2.5), "window_size"),
        (dict(global_indices=[3]), "global_indices"),
        (dict(global_indices=[0, -3]), "twice"),
        (dict(global_indices="2"), "global_indices"),
    ],
)
def test_bad_window_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        vitdet(**kwargs)


def test_windows_on_a_grid_smaller_than_the_window():
    vit = vitdet(window_size=14, global_indices=[]).eval()
    with torch.no_grad():
        (feat,) = vit(torch.randn(1, 3, 48, 32))
    assert feat.shape == (1, DIM, 3, 2) and torch.isfinite(feat).all()


# ------------------------------------------------------------------------- neck


def test_layer_norm_2d_is_detectron2_channel_layer_norm():
    norm = LayerNorm2d(6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 6, 5, 4)
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    expected = norm.weight[:, None, None] * (x - mean) / torch.sqrt(var + 1e-6) + norm.bias[:, None, None]
    torch.testing.assert_close(norm(x), expected)


def pyramid_param_count(C: int, out: int) -> int:
    """Parameters of ViTDet's simple pyramid from its layer list (deconvs with bias, convs
    without, every LN with weight and bias)."""
    deconv = lambda i, o: i * o * 2 * 2 + o  # noqa: E731
    ln = lambda c: 2 * c  # noqa: E731
    convs = lambda i: i * out + ln(out) + out * out * 9 + ln(out)  # noqa: E731  1x1 + LN, 3x3 + LN
    x4 = deconv(C, C // 2) + ln(C // 2) + deconv(C // 2, C // 4) + convs(C // 4)
    x2 = deconv(C, C // 2) + convs(C // 2)
    return x4 + x2 + convs(C) + convs(C)


def test_simple_pyramid_shapes_strides_and_parameter_count():
    neck = MODELS.build(dict(type="SimpleFeaturePyramid", in_channels=32, out_channels=8))
    assert neck.strides == (4, 8, 16, 32, 64) and neck.names == ("p2", "p3", "p4", "p5", "p6")
    assert sum(p.numel() for p in neck.parameters()) == pyramid_param_count(32, 8)
    # ViT-B: 768 -> 256 channels.
    big = SimpleFeaturePyramid(in_channels=768, out_channels=256)
    assert sum(p.numel() for p in big.parameters()) == pyramid_param_count(768, 256)
    x = torch.randn(2, 32, 8, 6)  # a 128 x 96 image at stride 16
    outs = neck((torch.randn(2, 32, 4, 3), x))  # only the last map is used
    assert [tuple(o.shape) for o in outs] == [(2, 8, 32, 24), (2, 8, 16, 12), (2, 8, 8, 6), (2, 8, 4, 3), (2, 8, 2, 2)]
    assert all(128 // s == o.shape[2] or s == 64 for s, o in zip(neck.strides, outs))
    # p6 is p5 subsampled (max pool with kernel 1, stride 2: every other pixel).
    assert torch.equal(outs[4], outs[3][:, :, ::2, ::2])
    # The stride-16 level: the map itself through the 1x1 and 3x3 convs, each with channel LN.
    level = neck.levels[2]
    y = level.lateral.norm(F.conv2d(x, level.lateral.conv.weight))
    y = level.output.norm(F.conv2d(y, level.output.conv.weight, padding=1))
    torch.testing.assert_close(outs[2], y)
    # The stride-32 level starts with a 2 x 2 max pool.
    level = neck.levels[3]
    torch.testing.assert_close(outs[3], level.output(level.lateral(F.max_pool2d(x, 2))))


def test_simple_pyramid_options_and_errors():
    neck = SimpleFeaturePyramid(in_channels=16, out_channels=4, scale_factors=(2.0, 1.0), top_block=False)
    assert neck.strides == (8, 16) and neck.names == ("p3", "p4")
    assert len(neck(torch.randn(1, 16, 4, 4))) == 2
    with pytest.raises(ConfigError, match="scale_factors"):
        SimpleFeaturePyramid(in_channels=16, scale_factors=(1.0, 2.0))
    with pytest.raises(ConfigError, match="scale_factors"):
        SimpleFeaturePyramid(in_channels=16, scale_factors=(3.0,))
    with pytest.raises(ConfigError, match="divisible by 4"):
        SimpleFeaturePyramid(in_channels=18)
    with pytest.raises(ConfigError, match="out_indices"):
        neck(torch.randn(1, 8, 4, 4))


# ------------------------------------------------------------- position embedding as detectron2


def detectron2_get_abs_pos(abs_pos: torch.Tensor, has_cls_token: bool, hw) -> torch.Tensor:
    """detectron2's ``get_abs_pos`` (modeling/backbone/utils.py), written from its description:
    drop the class token's entry, lay the rest on its square grid, resize bicubically
    (align_corners=False) to the input's h x w when it differs, return (1, h, w, C)."""
    h, w = hw
    if has_cls_token:
        abs_pos = abs_pos[:, 1:]
    size = int(math.sqrt(abs_pos.shape[1]))
    assert size * size == abs_pos.shape[1]
    grid = abs_pos.reshape(1, size, size, -1)
    if size != h or size != w:
        grid = F.interpolate(grid.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1)
    return grid


@pytest.mark.parametrize("input_size", [(64, 64), (96, 80), (32, 32)])
def test_pretrain_grid_position_embedding_is_detectron2s_get_abs_pos(input_size):
    """pretrain_img_size: the stored table is the pre-training grid (224 / 16 = 14 x 14 in
    ViTDet; here 48 / 16 = 3 x 3), resampled to the input's grid in every forward."""
    torch.manual_seed(0)
    vit = vitdet(pretrain_img_size=48, window_size=0, global_indices=[], use_rel_pos=False, depth=1).eval()
    assert vit.pos_embed.shape == (1, 9, DIM)
    with torch.no_grad():
        vit.pos_embed.normal_()
    expected = detectron2_get_abs_pos(vit.pos_embed.detach(), False, (input_size[0] // 16, input_size[1] // 16))
    got = vit._pos_embed_for((input_size[0] // 16, input_size[1] // 16))
    torch.testing.assert_close(got.reshape(expected.shape), expected, rtol=1e-6, atol=1e-6)
    # And it is what the blocks see: tokens = patch embedding + detectron2's positions.
    x = torch.randn(1, 3, *input_size)
    tokens, grid = vit._embed(x)
    patches = vit.stem(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens, patches + expected.reshape(1, -1, DIM), rtol=1e-6, atol=1e-6)


def test_pretrain_grid_loads_a_class_token_checkpoint_unchanged():
    """A 224-style checkpoint (class token + 3 x 3 grid) loads as is: the class token's entry
    dropped (detectron2's pretrain_use_cls_token), no resampling at load time."""
    torch.manual_seed(0)
    table = torch.randn(1, 10, DIM)
    vit = vitdet(pretrain_img_size=48)
    vit.load_state_dict({"pos_embed": table}, strict=False)
    torch.testing.assert_close(vit.pos_embed.detach(), table[:, 1:])
    expected = detectron2_get_abs_pos(table, True, (4, 4))
    torch.testing.assert_close(vit._pos_embed_for((4, 4)).reshape(expected.shape), expected, rtol=1e-6, atol=1e-6)
    assert "pos_embed" in vit.no_weight_decay()


def test_pretrain_img_size_must_divide_by_the_stride():
    with pytest.raises(ConfigError, match="pretrain_img_size"):
        vitdet(pretrain_img_size=40)
