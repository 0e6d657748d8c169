import pytest
import torch
import torch.nn.functional as F

from vitasks.errors import CheckpointError, ConfigError
from vitasks.models.backbones import VisionTransformer
from vitasks.models.layers import resample_abs_pos_embed
from vitasks.registry import MODELS


def tiny(**kw):
    cfg = dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
    cfg.update(kw)
    return VisionTransformer(**cfg)


def block_inputs_and_outputs(model, x):
    """Run ``model(x)`` and record the tokens entering block 0 and leaving every block."""
    record = {}
    hooks = [model.blocks[0].register_forward_pre_hook(lambda m, a: record.__setitem__("in", a[0]))]
    for i, blk in enumerate(model.blocks):
        hooks.append(blk.register_forward_hook(lambda m, a, out, i=i: record.__setitem__(i, out)))
    result = model(x)
    for h in hooks:
        h.remove()
    return result, record


def test_built_from_registry_with_defaults():
    vit = MODELS.build(dict(type="VisionTransformer", img_size=32, embed_dim=32, depth=2, num_heads=2))
    assert isinstance(vit, VisionTransformer)
    assert (vit.embed_dim, vit.depth, vit.stride, vit.num_prefix_tokens) == (32, 2, 16, 1)
    assert vit.grid_size == (2, 2) and vit.pos_embed.shape == (1, 5, 32)


def test_state_dict_names_follow_the_interface():
    vit = tiny(num_reg_tokens=2, layer_scale_init_value=1e-5)
    names = set(vit.state_dict())
    expected = {"cls_token", "reg_token", "pos_embed", "stem.proj.weight", "stem.proj.bias", "norm.weight", "norm.bias"}
    for i in range(2):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            expected |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
        expected |= {f"blocks.{i}.ls1.gamma", f"blocks.{i}.ls2.gamma"}
    assert names == expected
    assert vit.reg_token.shape == (1, 2, 32)
    assert vit.pos_embed.shape == (1, 1 + 4, 32)  # register tokens get no position embedding
    assert torch.equal(vit.blocks[0].ls1.gamma, torch.full((32,), 1e-5))


def test_token_pool_is_normed_class_token():
    vit = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    (pooled,), rec = block_inputs_and_outputs(vit, x)
    assert pooled.shape == (2, 32)
    torch.testing.assert_close(pooled, vit.norm(rec[1])[:, 0])
    assert isinstance(vit.fc_norm, torch.nn.Identity)


def test_mean_pool_uses_fc_norm_and_no_final_norm():
    vit = tiny(pool="mean", class_token=False).eval()
    names = set(vit.state_dict())
    assert "fc_norm.weight" in names and not any(n.startswith("norm.") for n in names)
    x = torch.randn(2, 3, 48, 32)
    (pooled,), rec = block_inputs_and_outputs(vit, x)
    assert rec[1].shape == (2, 6, 32)
    torch.testing.assert_close(pooled, F.layer_norm(rec[1].mean(1), (32,), vit.fc_norm.weight, vit.fc_norm.bias, 1e-6))
    # With a class token the mean skips it; fc_norm=False switches back to the final norm.
    vit = tiny(pool="mean").eval()
    (pooled,), rec = block_inputs_and_outputs(vit, x)
    torch.testing.assert_close(pooled, vit.fc_norm(rec[1][:, 1:].mean(1)))
    vit = tiny(pool="mean", fc_norm=False).eval()
    (pooled,), rec = block_inputs_and_outputs(vit, x)
    torch.testing.assert_close(pooled, vit.norm(rec[1])[:, 1:].mean(1))
    vit = tiny(pool="mean", final_norm=False)
    assert not any("norm." in n and not n.startswith("blocks") for n in vit.state_dict())


def test_pool_none_returns_all_tokens():
    vit = tiny(pool="none", num_reg_tokens=3).eval()
    (tokens,) = vit(torch.randn(2, 3, 32, 64))
    assert tokens.shape == (2, 1 + 3 + 2 * 4, 32)


def test_embedding_layout_with_register_tokens():
    vit = tiny(num_reg_tokens=3, pool="none").eval()
    x = torch.randn(2, 3, 32, 32)
    _, rec = block_inputs_and_outputs(vit, x)
    tokens = rec["in"]
    assert tokens.shape == (2, 1 + 3 + 4, 32) and tokens.is_contiguous()
    patches = vit.stem(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens[:, 0], (vit.cls_token + vit.pos_embed[:, :1])[0].expand(2, -1))
    torch.testing.assert_close(tokens[:, 1:4], vit.reg_token.expand(2, -1, -1))
    torch.testing.assert_close(tokens[:, 4:], patches + vit.pos_embed[:, 1:])


def test_no_class_token():
    vit = tiny(class_token=False, pool="mean").eval()
    assert vit.cls_token is None and vit.num_prefix_tokens == 0 and vit.pos_embed.shape == (1, 4, 32)
    _, rec = block_inputs_and_outputs(vit, torch.randn(1, 3, 32, 32))
    assert rec["in"].is_contiguous()


def test_out_indices_maps():
    vit = tiny(depth=3, out_indices=[0, -1], num_reg_tokens=1).eval()
    assert vit.out_indices == (0, 2)
    x = torch.randn(2, 3, 32, 48)
    maps, rec = block_inputs_and_outputs(vit, x)
    assert len(maps) == 2 and all(m.shape == (2, 32, 2, 3) for m in maps)
    assert all(m.is_contiguous() for m in maps)
    expected0 = rec[0][:, 2:].reshape(2, 2, 3, 32).permute(0, 3, 1, 2)
    torch.testing.assert_close(maps[0], expected0)
    # The last block's map gets the final norm (OpenMMLab convention).
    expected2 = vit.norm(rec[2])[:, 2:].reshape(2, 2, 3, 32).permute(0, 3, 1, 2)
    torch.testing.assert_close(maps[1], expected2)


def test_out_indices_stop_after_the_last_requested_block():
    vit = tiny(depth=3, out_indices=[1, 0]).eval()
    maps, rec = block_inputs_and_outputs(vit, torch.randn(1, 3, 32, 32))
    assert 2 not in rec
    torch.testing.assert_close(maps[0], rec[1][:, 1:].reshape(1, 2, 2, 32).permute(0, 3, 1, 2))


def test_forward_with_attention_matches_forward():
    vit = tiny(num_reg_tokens=1, pool="none", layer_scale_init_value=0.5).eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        tokens, attns = vit.forward_with_attention(x)
        (expected,) = vit(x)
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vit.forward_features(x), expected, rtol=1e-5, atol=1e-5)
    n = 1 + 1 + 6
    assert len(attns) == 2 and all(a.shape == (2, 2, n, n) for a in attns)
    torch.testing.assert_close(attns[0].sum(-1), torch.ones(2, 2, n))


def test_any_divisible_size_runs_and_bad_sizes_fail():
    vit = tiny().eval()
    for size in [(32, 32), (48, 48), (64, 96), (16, 16)]:
        assert vit(torch.randn(1, 3, *size))[0].shape == (1, 32)
    with pytest.raises(ConfigError, match="not divisible by the stem stride 16"):
        vit(torch.randn(1, 3, 40, 32))
    with pytest.raises(ConfigError, match="img_size"):
        tiny(img_size=40)


@pytest.mark.parametrize("new_size", [(48, 48), (64, 96)])
def test_on_the_fly_resampling_equals_loading_a_resampled_checkpoint(new_size):
    small = tiny(num_reg_tokens=1, pool="none").eval()
    x = torch.randn(2, 3, *new_size)
    big = tiny(img_size=new_size, num_reg_tokens=1, pool="none").eval()
    big.load_state_dict(small.state_dict())  # the load hook resamples pos_embed
    grid = (new_size[0] // 16, new_size[1] // 16)
    expected_pos = resample_abs_pos_embed(small.pos_embed, grid, (2, 2), num_prefix_tokens=1)
    torch.testing.assert_close(big.pos_embed.data, expected_pos.data, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(small(x)[0], big(x)[0], rtol=1e-5, atol=1e-5)


def test_load_hook_keeps_same_size_and_rejects_non_square():
    a, b = tiny(), tiny()
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.pos_embed, b.pos_embed)
    sd = a.state_dict()
    sd["pos_embed"] = torch.randn(1, 1 + 6, 32)
    with pytest.raises(CheckpointError, match="pos_embed"):
        b.load_state_dict(sd)


def test_load_hook_works_with_a_prefix():
    holder_a, holder_b = torch.nn.Module(), torch.nn.Module()
    holder_a.backbone, holder_b.backbone = tiny(), tiny(img_size=64)
    holder_b.load_state_dict(holder_a.state_dict())
    assert holder_b.backbone.pos_embed.shape == (1, 1 + 16, 32)


def test_grad_checkpointing_gives_identical_gradients():
    x = torch.randn(2, 3, 32, 32)

    def grads(model):
        torch.manual_seed(123)  # same drop-path masks in both runs
        model.zero_grad()
        model(x)[0].square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = tiny(drop_path_rate=0.2, num_reg_tokens=1).train()
    cp = tiny(drop_path_rate=0.2, num_reg_tokens=1, with_cp=True).train()
    cp.load_state_dict(ref.state_dict())
    assert cp.grad_checkpointing
    g_ref, g_cp = grads(ref), grads(cp)
    assert g_ref.keys() == g_cp.keys()
    for n in g_ref:
        torch.testing.assert_close(g_cp[n], g_ref[n], rtol=1e-6, atol=1e-7, msg=n)
    ref.set_grad_checkpointing(True)
    assert ref.grad_checkpointing
    ref.set_grad_checkpointing(False)
    assert not ref.grad_checkpointing


def test_mlp_act_reaches_every_block():
    x = torch.randn(1, 3, 32, 32)
    exact, approx = tiny().eval(), tiny(mlp_act="gelu_tanh").eval()
    assert exact.mlp_act == "gelu" and approx.mlp_act == "gelu_tanh"
    assert all(b.mlp.act.approximate == "none" for b in exact.blocks)
    assert all(b.mlp.act.approximate == "tanh" for b in approx.blocks)
    # Same parameters and names; only the activation differs.
    approx.load_state_dict(exact.state_dict())
    with torch.no_grad():
        for b in (exact, approx):  # larger MLP inputs so the two GELUs differ visibly
            for blk in b.blocks:
                blk.mlp.fc1.weight.mul_(20)
        assert not torch.allclose(exact(x)[0], approx(x)[0], rtol=1e-5, atol=1e-5)


def test_drop_path_rises_linearly():
    vit = tiny(depth=5, drop_path_rate=0.4)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in vit.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_get_layer_id():
    vit = tiny(depth=3, num_reg_tokens=1, pool="mean")
    expected = {}
    for name, _ in vit.named_parameters():
        if name.startswith(("stem.", "pos_embed", "cls_token", "reg_token")):
            expected[name] = 0
        elif name.startswith("blocks."):
            expected[name] = int(name.split(".")[1]) + 1
        else:
            expected[name] = 4
    assert {n: vit.get_layer_id(n) for n in expected} == expected
    assert vit.get_layer_id("fc_norm.weight") == 4 and vit.get_layer_id("blocks.2.mlp.fc1.weight") == 3


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(pool="max"), "pool"),
        (dict(class_token=False), "class_token"),
        (dict(out_indices=[2]), "out_indices"),
        (dict(out_indices=[0, -2]), "twice"),
        (dict(num_heads=3), "divisible by num_heads"),
        (dict(num_reg_tokens=-1), "num_reg_tokens"),
        (dict(interpolate_mode="cubic"), "interpolate_mode"),
        (dict(depth=0), "depth"),
        (dict(mlp_act="swish"), r"model.backbone.mlp_act must be one of \['gelu', 'gelu_tanh'\]"),
    ],
)
def test_bad_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**kwargs)
