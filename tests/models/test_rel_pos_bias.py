"""BEiT's relative position bias (use_rel_pos_bias / use_shared_rel_pos_bias) and LayerScale."""

import pytest
import torch

from vitasks.errors import ConfigError
from vitasks.models.backbones.vit import VisionTransformer
from vitasks.models.layers.attention import Attention
from vitasks.models.layers.rel_pos_bias import RelativePositionBias, resize_rel_pos_bias_table


def brute_force_bias(table: torch.Tensor, h: int, w: int, cls: bool) -> torch.Tensor:
    """(heads, N, N) built pair by pair from the definition: patch offsets (dh, dw) shifted to
    be >= 0 and read row-major from a (2h-1) x (2w-1) table, then the three class-token rows."""
    L = (2 * h - 1) * (2 * w - 1) + 3
    assert table.shape[0] == L
    coords = [(i, j) for i in range(h) for j in range(w)]
    n = len(coords) + int(cls)
    out = torch.empty(table.shape[1], n, n)
    for a in range(n):
        for b in range(n):
            if cls and a == 0 and b == 0:
                row = L - 1
            elif cls and a == 0:
                row = L - 3
            elif cls and b == 0:
                row = L - 2
            else:
                (i1, j1), (i2, j2) = coords[a - int(cls)], coords[b - int(cls)]
                row = (i1 - i2 + h - 1) * (2 * w - 1) + (j1 - j2 + w - 1)
            out[:, a, b] = table[row]
    return out


@pytest.mark.parametrize("cls", [True, False])
def test_bias_equals_per_pair_table(cls):
    torch.manual_seed(0)
    module = RelativePositionBias((3, 4), num_heads=2)
    with torch.no_grad():
        module.table.normal_()
    bias = module((3, 4), int(cls))
    assert bias.shape == (1, 2, 12 + int(cls), 12 + int(cls))
    torch.testing.assert_close(bias[0], brute_force_bias(module.table.detach(), 3, 4, cls), rtol=0, atol=0)


def test_attention_adds_the_bias_to_the_logits():
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2, use_rel_pos_bias=True, rel_pos_size=(2, 3)).eval()
    with torch.no_grad():
        attn.rel_pos_bias.table.normal_()
    x = torch.randn(2, 7, 16)
    extra = torch.randn(1, 2, 7, 7)
    y = attn(x, (2, 3), extra)
    # Explicitly: softmax(q k^T / sqrt(d) + table bias + extra) v, then the projection.
    q, k, v = attn.qkv(x).reshape(2, 7, 3, 2, 8).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) / 8**0.5 + brute_force_bias(attn.rel_pos_bias.table.detach(), 2, 3, True) + extra
    ref = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 16))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y2, probs = attn.forward_with_attention(x, (2, 3), extra)
    torch.testing.assert_close(y2, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs, logits.softmax(-1), rtol=1e-5, atol=1e-6)


def test_resize_is_transformers_rule():
    """Another grid: the table resampled as transformers' BeitRelativePositionBias does."""
    from transformers import BeitConfig
    from transformers.models.beit.modeling_beit import BeitRelativePositionBias

    torch.manual_seed(0)
    cfg = BeitConfig(image_size=32, patch_size=8, num_attention_heads=3)  # a 4 x 4 table
    ref = BeitRelativePositionBias(cfg)
    ours = RelativePositionBias((4, 4), num_heads=3)
    with torch.no_grad():
        ref.relative_position_bias_table.normal_()
        ours.table.copy_(ref.relative_position_bias_table)
    for grid in [(4, 4), (6, 6), (3, 5), (7, 4)]:
        expected = ref(grid)  # (1, heads, N, N)
        torch.testing.assert_close(ours(grid, 1), expected, rtol=1e-6, atol=1e-6)
    # Loading a table made for another grid resamples it by the same rule.
    big = RelativePositionBias((6, 6), num_heads=3)
    big.load_state_dict({"table": ours.table.detach()})
    torch.testing.assert_close(big((6, 6), 1), ref((6, 6)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(resize_rel_pos_bias_table(big.table, (4, 4), (6, 6)).shape, ours.table.shape)


def _vit(**kw):
    base = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, layer_scale_init_value=0.1)
    base.update(kw)
    return VisionTransformer(**base).eval()


def test_shared_table_loads_into_every_block():
    torch.manual_seed(0)
    shared = _vit(use_shared_rel_pos_bias=True)
    with torch.no_grad():
        shared.rel_pos_bias.table.normal_()
    per_block = _vit(use_rel_pos_bias=True)
    result = per_block.load_state_dict(shared.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    for block in per_block.blocks:
        torch.testing.assert_close(block.attn.rel_pos_bias.table, shared.rel_pos_bias.table)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(per_block(x)[0], shared(x)[0], rtol=1e-5, atol=1e-5)
    # And at another input size (each resamples its own table the same way).
    x = torch.randn(1, 3, 48, 40)
    torch.testing.assert_close(per_block(x)[0], shared(x)[0], rtol=1e-5, atol=1e-5)


def test_zero_tables_change_nothing_and_tables_learn():
    """A checkpoint without tables (MAE) starts them at zero: the outputs are the plain ViT's."""
    torch.manual_seed(0)
    plain = _vit()
    biased = _vit(use_rel_pos_bias=True)
    result = biased.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(result.missing_keys) == [f"blocks.{i}.attn.rel_pos_bias.table" for i in range(3)]
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(biased(x)[0], plain(x)[0], rtol=1e-6, atol=1e-6)
    biased.train()
    (biased(x)[0] * torch.randn(2, 32)).sum().backward()  # (a plain sum of a LayerNorm output is constant)
    assert all(b.attn.rel_pos_bias.table.grad.abs().sum() > 0 for b in biased.blocks)
    assert {f"blocks.{i}.attn.rel_pos_bias.table" for i in range(3)} <= biased.no_weight_decay()
    assert biased.get_layer_id("blocks.1.attn.rel_pos_bias.table") == 2
    shared = _vit(use_shared_rel_pos_bias=True)
    assert "rel_pos_bias.table" in shared.no_weight_decay()


def test_layer_scale_is_beit_gamma():
    """x + gamma_1 * attn(norm1(x)), then x + gamma_2 * mlp(norm2(x)) (BEiT's block)."""
    torch.manual_seed(0)
    vit = _vit(depth=1, use_rel_pos_bias=True)
    block = vit.blocks[0]
    with torch.no_grad():
        block.ls1.gamma.normal_()
        block.ls2.gamma.normal_()
        block.attn.rel_pos_bias.table.normal_()
    x = torch.randn(2, 17, 32)
    y = block.norm1(x)
    x1 = x + block.ls1.gamma * block.attn(y, (4, 4))
    ref = x1 + block.ls2.gamma * block.mlp(block.norm2(x1))
    torch.testing.assert_close(block(x, (4, 4)), ref)


def test_maps_with_rel_pos_bias_and_checkpointing():
    torch.manual_seed(0)
    vit = _vit(use_shared_rel_pos_bias=True, out_indices=[0, 2], final_norm=False)
    with torch.no_grad():
        vit.rel_pos_bias.table.normal_()
    x = torch.randn(2, 3, 32, 48)
    maps = vit(x)
    assert [m.shape for m in maps] == [(2, 32, 4, 6)] * 2
    vit.train()
    vit.set_grad_checkpointing(True)
    for m in vit.modules():
        if hasattr(m, "p"):
            m.p = 0.0
    x.requires_grad_(True)
    cp = vit(x)
    cp[-1].sum().backward()
    torch.testing.assert_close(cp[-1], maps[-1], rtol=1e-5, atol=1e-5)
    assert vit.rel_pos_bias.table.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(use_rel_pos_bias=True, use_shared_rel_pos_bias=True), "exclude each other"),
        (dict(use_rel_pos_bias=True, class_token=False, pool="mean", window_size=2), "global attention"),
        (dict(use_shared_rel_pos_bias=True, num_reg_tokens=2), "num_reg_tokens"),
        (dict(use_rel_pos_bias=True, token_reduction={"type": "ToMe", "r": 1}), "token_reduction"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        _vit(**kw)


def test_geometric_resampling_is_beits_fine_tuning_rule():
    """BEiT's pre-training -> fine-tuning rule: offsets on a geometric sequence reaching the new
    extent, a bicubic interpolating spline through them; the class-token rows kept."""
    np = pytest.importorskip("numpy")
    interpolate = pytest.importorskip("scipy.interpolate")
    from vitasks.models.layers.rel_pos_bias import geometric_offsets, resize_rel_pos_bias_table_geometric

    torch.manual_seed(0)
    table = torch.randn(27 * 27 + 3, 2, dtype=torch.float64)  # a 14 x 14 pre-training table
    new = resize_rel_pos_bias_table_geometric(table, (40, 40))
    assert new.shape == (79 * 79 + 3, 2)
    torch.testing.assert_close(new[-3:], table[-3:], rtol=0, atol=0)
    src, dst = geometric_offsets(27, 79)
    # The sequence: 1, 1 + q, 1 + q + q^2, ... with its 13th partial sum at the new extent 39.
    q = src[15] - src[14]
    assert src[13] == 0 and src[14] == 1 and 1.01 < q < 1.5
    np.testing.assert_allclose(np.diff(src[14:]), q ** np.arange(1, 13), rtol=1e-9)
    assert abs(src[-1] - 39) < 1e-3 and dst[0] == -39 and dst[-1] == 39
    # Offsets 0 and +-1 are nodes of both grids: an interpolating spline keeps their values.
    old = table[:-3].reshape(27, 27, 2)
    grid = new[:-3].reshape(79, 79, 2)
    for i, j in [(0, 0), (1, -1), (-1, 0), (1, 1)]:
        torch.testing.assert_close(grid[39 + i, 39 + j], old[13 + i, 13 + j], rtol=1e-9, atol=1e-9)
    # Everywhere: a cubic spline through the same nodes by another construction (scipy's
    # RegularGridInterpolator, not-a-knot) agrees closely.
    X, Y = np.meshgrid(dst, dst, indexing="ij")
    ref = interpolate.RegularGridInterpolator((src, src), old[:, :, 1].numpy(), method="cubic")(np.stack([X, Y], -1))
    np.testing.assert_allclose(grid[:, :, 1].numpy(), ref, atol=1e-3)
    # A same-size table is returned as it is.
    assert resize_rel_pos_bias_table_geometric(table, (14, 14)) is table
