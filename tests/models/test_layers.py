import math

import pytest
import torch
import torch.nn.functional as F

from vitasks.errors import ConfigError
from vitasks.models.layers import (
    Attention,
    DropPath,
    LayerScale,
    TransformerBlock,
    drop_path,
    mlp_act_layer,
    resample_abs_pos_embed,
)


def reference_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Multi-head attention written out from the weights, one head at a time."""
    B, N, C = x.shape
    h, d = attn.num_heads, C // attn.num_heads
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).split(C, dim=-1)
    heads = []
    for i in range(h):
        sl = slice(i * d, (i + 1) * d)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d)
        heads.append(torch.softmax(scores, dim=-1) @ v[..., sl])
    return F.linear(torch.cat(heads, dim=-1), attn.proj.weight, attn.proj.bias)


def test_sdpa_attention_matches_explicit_softmax():
    attn = Attention(32, num_heads=4).eval()
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(attn(x), reference_attention(attn, x), rtol=1e-5, atol=1e-5)


def test_attention_forward_with_attention_probs():
    attn = Attention(32, num_heads=4, qkv_bias=False).eval()
    assert attn.qkv.bias is None
    x = torch.randn(2, 5, 32)
    out, probs = attn.forward_with_attention(x)
    torch.testing.assert_close(out, attn(x), rtol=1e-5, atol=1e-5)
    assert probs.shape == (2, 4, 5, 5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 5))
    # Head 0 probabilities from the raw weights.
    q, k, _ = F.linear(x, attn.qkv.weight).split(32, dim=-1)
    expected = torch.softmax(q[..., :8] @ k[..., :8].transpose(1, 2) / math.sqrt(8), dim=-1)
    torch.testing.assert_close(probs[:, 0], expected, rtol=1e-5, atol=1e-6)


def test_attention_rejects_bad_head_count():
    with pytest.raises(ValueError, match="divisible"):
        Attention(30, num_heads=4)


def test_block_matches_reference_and_layer_scale():
    block = TransformerBlock(16, 2, mlp_ratio=2.0, layer_scale_init_value=0.1).eval()
    assert torch.equal(block.ls1.gamma, torch.full((16,), 0.1))
    x = torch.randn(3, 5, 16)
    a = x + 0.1 * reference_attention(block.attn, block.norm1(x))
    h = block.norm2(a)
    expected = a + 0.1 * block.mlp.fc2(F.gelu(block.mlp.fc1(h)))
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    y, probs = block.forward_with_attention(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert probs.shape == (3, 2, 5, 5)


def tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation written out (JAX's default ``nn.gelu``)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def test_gelu_tanh_block_matches_reference():
    block = TransformerBlock(16, 2, mlp_ratio=2.0, mlp_act="gelu_tanh").eval().requires_grad_(False)
    block.mlp.fc1.weight.mul_(5)  # MLP pre-activations of a few units, where the GELUs differ most
    x = torch.randn(3, 5, 16)
    a = x + reference_attention(block.attn, block.norm1(x))
    h = block.mlp.fc1(block.norm2(a))
    expected = a + block.mlp.fc2(tanh_gelu(h))
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    # ... and is not the exact GELU.
    exact = a + block.mlp.fc2(0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0))))
    assert not torch.allclose(block(x), exact, rtol=1e-5, atol=1e-5)
    # The default stays exact, with the same parameter names.
    default = TransformerBlock(16, 2, mlp_ratio=2.0).eval()
    default.load_state_dict(block.state_dict())
    torch.testing.assert_close(default(x), exact, rtol=1e-5, atol=1e-5)


def test_mlp_act_layer_names_and_errors():
    x = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(mlp_act_layer("gelu_tanh")()(x), tanh_gelu(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mlp_act_layer("gelu")()(x), 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0))))
    with pytest.raises(ConfigError, match=r"mlp_act must be one of \['gelu', 'gelu_tanh'\], got 'relu'"):
        TransformerBlock(16, 2, mlp_act="relu")
    with pytest.raises(ConfigError, match="model.backbone.mlp_act"):
        mlp_act_layer("tanh", key="model.backbone.mlp_act")


def test_layer_scale_multiplies_channels():
    ls = LayerScale(4, 1e-5)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(ls(x), x * 1e-5)


def test_drop_path_eval_identity_and_train_per_sample():
    x = torch.randn(64, 3, 4) + 5
    module = DropPath(0.5)
    module.eval()
    assert module(x) is x
    assert drop_path(x, 0.0, training=True) is x
    module.train()
    y = module(x)
    for i in range(64):
        kept = torch.allclose(y[i], x[i] * 2.0)
        dropped = torch.equal(y[i], torch.zeros_like(y[i]))
        assert kept or dropped
    n_kept = sum(bool(y[i].abs().sum() > 0) for i in range(64))
    assert 0 < n_kept < 64
    with pytest.raises(ValueError):
        DropPath(1.0)


def test_resample_same_grid_returns_input():
    pos = torch.randn(1, 1 + 16, 8)
    assert resample_abs_pos_embed(pos, (4, 4), num_prefix_tokens=1) is pos
    assert resample_abs_pos_embed(pos, 4, (4, 4), num_prefix_tokens=1) is pos


@pytest.mark.parametrize("prefix,old,new", [(1, (4, 4), (6, 6)), (0, (2, 3), (4, 5)), (1, (3, 3), (2, 5))])
def test_resample_matches_independent_interpolate(prefix, old, new):
    C = 6
    pos = torch.randn(1, prefix + old[0] * old[1], C)
    out = resample_abs_pos_embed(pos, new, old, num_prefix_tokens=prefix, mode="bicubic")
    assert out.shape == (1, prefix + new[0] * new[1], C)
    torch.testing.assert_close(out[:, :prefix], pos[:, :prefix], rtol=0, atol=0)
    # Independent: every channel as its own 2D image.
    for c in range(C):
        img = pos[0, prefix:, c].reshape(1, 1, *old)
        ref = F.interpolate(img, size=new, mode="bicubic", align_corners=False).reshape(-1)
        torch.testing.assert_close(out[0, prefix:, c], ref, rtol=1e-5, atol=1e-6)


def test_resample_infers_square_grid_and_rejects_non_square():
    pos = torch.randn(1, 1 + 9, 4)
    out = resample_abs_pos_embed(pos, (6, 6), num_prefix_tokens=1)
    assert out.shape == (1, 37, 4)
    with pytest.raises(ValueError, match="not a square"):
        resample_abs_pos_embed(torch.randn(1, 1 + 6, 4), (4, 4), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="old_grid"):
        resample_abs_pos_embed(torch.randn(1, 1 + 6, 4), (4, 4), (2, 2), num_prefix_tokens=1)


def test_resample_keeps_dtype():
    pos = torch.randn(1, 1 + 4, 4, dtype=torch.float64)
    assert resample_abs_pos_embed(pos, (3, 3), num_prefix_tokens=1).dtype == torch.float64
