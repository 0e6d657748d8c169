"""Attention rollout: against a brute-force numpy computation, on identity and uniform
attention, with every stem, and the attention_map command end to end."""

import numpy as np
import pytest
import torch
from PIL import Image

from vitasks.models.backbones import VisionTransformer
from vitasks.models.layers.attention import Attention
from vitasks.cli import main as cli_main
from vitasks.visualization.attention_map import compute_attention_maps
from vitasks.visualization.rollout import attention_rollout, fuse_heads, rollout_matrix, upsample_map


def random_attention(layers, batch, heads, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, n, generator=g).mul(3).softmax(-1) for _ in range(layers)]


def brute_force_rollout(attentions, fusion="mean", residual=True):
    """Straight from the paper, in float64 numpy, one sample at a time: R = A_L ... A_1."""
    out = []
    for b in range(attentions[0].shape[0]):
        mats = []
        for attn in attentions:
            a = attn[b].detach().double().numpy()
            a = {"mean": a.mean(0), "max": a.max(0), "min": a.min(0)}[fusion]
            if residual:
                a = 0.5 * a + 0.5 * np.eye(a.shape[0])
            mats.append(a / a.sum(-1, keepdims=True))
        out.append(np.linalg.multi_dot(mats[::-1]) if len(mats) > 1 else mats[0])
    return np.stack(out)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("residual", [True, False])
def test_rollout_matches_brute_force(fusion, residual):
    grid, prefix = (3, 4), 1
    n = prefix + grid[0] * grid[1]
    attn = random_attention(layers=4, batch=2, heads=3, n=n)
    expected = brute_force_rollout(attn, fusion, residual)
    joint = rollout_matrix(attn, fusion, residual)
    np.testing.assert_allclose(joint.double().numpy(), expected, rtol=1e-4, atol=1e-6)
    rollout, layers = attention_rollout(attn, grid, num_prefix_tokens=prefix, head_fusion=fusion,
                                        add_residual=residual)
    np.testing.assert_allclose(rollout.numpy(), expected[:, 0, prefix:].reshape(2, *grid), rtol=1e-4, atol=1e-6)
    # Per-layer maps: the class-token row of each layer's fused heads (no residual, no product).
    assert layers.shape == (2, 4, *grid)
    reduce = {"mean": np.mean, "max": np.max, "min": np.min}[fusion]
    for i, a in enumerate(attn):
        fused = reduce(a.numpy(), axis=1)
        np.testing.assert_allclose(layers[:, i].numpy(), fused[:, 0, prefix:].reshape(2, *grid), rtol=1e-5)


def test_rollout_rows_stay_stochastic():
    attn = random_attention(layers=5, batch=1, heads=2, n=10)
    for fusion in ("mean", "max", "min"):
        joint = rollout_matrix(attn, fusion)
        torch.testing.assert_close(joint.sum(-1), torch.ones(1, 10))


def test_fuse_heads_options():
    attn = random_attention(layers=1, batch=2, heads=5, n=6)[0]
    torch.testing.assert_close(fuse_heads(attn, "mean"), attn.mean(1))
    torch.testing.assert_close(fuse_heads(attn, "max"), attn.max(1).values)
    torch.testing.assert_close(fuse_heads(attn, "min"), attn.min(1).values)
    with pytest.raises(ValueError, match="head_fusion"):
        fuse_heads(attn, "median")


def test_identity_attention_gives_uniform_map():
    grid = (4, 4)
    n = 1 + 16
    eye = [torch.eye(n).expand(2, 3, n, n) for _ in range(3)]
    rollout, layers = attention_rollout(eye, grid)
    # The class token only ever looks at itself: nothing flows from any patch, all equally.
    assert torch.equal(rollout, torch.zeros(2, *grid))
    # Without a class token the map is the mean of the patch rows: 1/P everywhere.
    rollout, _ = attention_rollout([torch.eye(16).expand(1, 2, 16, 16)] * 2, grid, num_prefix_tokens=0,
                                   class_token=False)
    torch.testing.assert_close(rollout, torch.full((1, *grid), 1 / 16))
    # A constant map is drawn as uniform mid-grey rather than stretched noise.
    torch.testing.assert_close(upsample_map(rollout, (8, 8)), torch.full((1, 8, 8), 0.5))


def test_register_tokens_are_left_out():
    grid, prefix = (2, 3), 1 + 4  # class token + 4 registers
    n = prefix + 6
    attn = random_attention(layers=2, batch=1, heads=2, n=n)
    rollout, _ = attention_rollout(attn, grid, num_prefix_tokens=prefix)
    expected = brute_force_rollout(attn)[:, 0, prefix:].reshape(1, *grid)
    np.testing.assert_allclose(rollout.numpy(), expected, rtol=1e-4, atol=1e-6)
    # Without a class token: the mean over patch rows, register rows and columns excluded.
    attn = random_attention(layers=2, batch=1, heads=2, n=4 + 6)
    rollout, _ = attention_rollout(attn, grid, num_prefix_tokens=4, class_token=False)
    joint = brute_force_rollout(attn)
    np.testing.assert_allclose(rollout.numpy(), joint[:, 4:, 4:].mean(1).reshape(1, *grid), rtol=1e-4, atol=1e-6)


def test_token_count_mismatch_is_reported():
    attn = random_attention(layers=1, batch=1, heads=1, n=10)
    with pytest.raises(ValueError, match="prefix tokens"):
        attention_rollout(attn, (3, 4), num_prefix_tokens=1)


def test_upsample_map_scales_each_map_to_unit_range():
    maps = torch.rand(2, 3, 4, 5)
    up = upsample_map(maps, (8, 10))
    assert up.shape == (2, 3, 8, 10)
    flat = up.flatten(2)
    torch.testing.assert_close(flat.amin(-1), torch.zeros(2, 3))
    torch.testing.assert_close(flat.amax(-1), torch.ones(2, 3))


STEMS = {
    "patch": dict(type="PatchEmbed"),
    "conv": dict(type="ConvStem", channels=[8, 16], strides=[2, 2]),
    "hybrid": dict(type="ResNetStem", layers=[1, 1], widths=[16, 32], stem_channels=8, num_groups=4),
}
STRIDES = {"patch": 4, "conv": 4, "hybrid": 8}


def tiny_vit(stem: str, **kwargs) -> VisionTransformer:
    stride = STRIDES[stem]
    return VisionTransformer(img_size=4 * stride, patch_size=stride, embed_dim=16, depth=2, num_heads=2,
                             stem=dict(STEMS[stem]), **kwargs).eval()


@pytest.mark.parametrize("stem", sorted(STEMS))
def test_maps_for_every_stem_and_non_square_inputs(stem):
    vit = tiny_vit(stem, num_reg_tokens=2)
    s = STRIDES[stem]
    x = torch.randn(1, 3, 3 * s, 5 * s)  # not the training size, not square
    maps = compute_attention_maps(vit, x)
    assert maps["rollout_grid"].shape == (1, 3, 5)
    assert maps["layers_grid"].shape == (1, 2, 3, 5)
    assert maps["rollout"].shape == (1, 3 * s, 5 * s)
    assert maps["layers"].shape == (1, 2, 3 * s, 5 * s)
    assert torch.isfinite(maps["rollout"]).all()
    # Independent check: the same backbone's attention through the brute-force rollout.
    _, attn = vit.forward_with_attention(x)
    expected = brute_force_rollout(attn)[:, 0, vit.num_prefix_tokens:].reshape(1, 3, 5)
    np.testing.assert_allclose(maps["rollout_grid"].numpy(), expected, rtol=1e-4, atol=1e-6)


def test_uniform_attention_in_a_real_backbone_gives_uniform_map():
    vit = tiny_vit("patch", class_token=False, pool="mean")
    with torch.no_grad():
        for block in vit.blocks:  # q = k = 0: softmax of zeros is uniform attention
            block.attn.qkv.weight.zero_()
            block.attn.qkv.bias.zero_()
    maps = compute_attention_maps(vit, torch.randn(1, 3, 16, 16))
    torch.testing.assert_close(maps["rollout_grid"], torch.full((1, 4, 4), 1 / 16))


def test_identity_attention_in_a_real_backbone(monkeypatch):
    original = Attention.forward_with_attention

    def identity_attention(self, x, *args, **kwargs):
        out, attn = original(self, x, *args, **kwargs)
        n = attn.shape[-1]
        return out, torch.eye(n).expand_as(attn)

    monkeypatch.setattr(Attention, "forward_with_attention", identity_attention)
    vit = tiny_vit("conv")
    maps = compute_attention_maps(vit, torch.randn(2, 3, 16, 24))
    assert torch.equal(maps["rollout_grid"], torch.zeros(2, 4, 6))
    torch.testing.assert_close(maps["rollout"], torch.full((2, 16, 24), 0.5))


def test_attention_map_command_writes_png(tmp_path, tiny_cls_config):
    from vitasks.apis import init_model

    config = tiny_cls_config()
    ckpt = tmp_path / "tiny.pth"
    torch.save({"state_dict": init_model(str(config)).state_dict()}, ckpt)
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "maps" / "attn.png"
    assert cli_main(["attention-map", str(config), str(ckpt), str(image), "--out", str(out), "--head-fusion", "max"]) == 0
    with Image.open(out) as im:
        assert im.size[0] > 200 and im.size[1] > 100


def test_attention_map_rejects_a_model_without_attention(tmp_path, capsys):
    from vitasks.visualization.attention_map import backbone_of

    with pytest.raises(Exception, match="forward_with_attention"):
        backbone_of(torch.nn.Linear(2, 2))
