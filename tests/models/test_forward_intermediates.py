"""VisionTransformer.forward_intermediates: timm's contract (indices, norm, stop_early, output_fmt,
intermediates_only), checked against a forward written out by hand and against timm's own
VisionTransformer with the same weights; forward with out_indices and the multi-task model go
through it."""

import pytest
import torch

from vitasks.models.backbones import VisionTransformer

DEPTH = 3


def tiny(**kw):
    cfg = dict(img_size=32, patch_size=8, embed_dim=48, depth=DEPTH, num_heads=2, mlp_ratio=2.0)
    cfg.update(kw)
    torch.manual_seed(0)
    vit = VisionTransformer(**cfg).eval()
    with torch.no_grad():  # non-trivial norms and tokens
        for name, p in vit.named_parameters():
            if name.endswith(("norm.weight", "norm.bias", "cls_token")):
                p.add_(torch.randn_like(p) * 0.1)
    return vit


def by_hand(vit, x):
    """Tokens after each block, from the stem, the position table and the blocks alone."""
    patches = vit.stem(x).flatten(2).transpose(1, 2)
    h, w = x.shape[-2] // vit.stride, x.shape[-1] // vit.stride
    tokens = torch.cat([(vit.cls_token + vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1),
                        patches + vit.pos_embed[:, 1:]], dim=1)
    after = []
    for block in vit.blocks:
        tokens = block(tokens, (h, w))
        after.append(tokens)
    return after, (h, w)


def as_map(tokens, hw):
    return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, *hw)


@torch.no_grad()
@pytest.mark.parametrize("indices, taken", [(None, [0, 1, 2]), (2, [1, 2]), ([0, -1], [0, 2]), ([1], [1]), ([], [])])
def test_intermediates_are_the_blocks_outputs(indices, taken):
    vit = tiny()
    x = torch.randn(2, 3, 32, 32)
    after, hw = by_hand(vit, x)
    final, maps = vit.forward_intermediates(x, indices)
    assert len(maps) == len(taken)
    for got, i in zip(maps, taken):
        torch.testing.assert_close(got, as_map(after[i], hw), rtol=1e-5, atol=1e-5)
        assert got.shape == (2, 48, 4, 4) and got.is_contiguous()
    torch.testing.assert_close(final, vit.norm(after[-1]), rtol=1e-5, atol=1e-5)
    # norm=True: the final norm on every intermediate; NLC: the patch tokens as they are.
    normed = vit.forward_intermediates(x, indices, norm=True, output_fmt="NLC", intermediates_only=True)
    for got, i in zip(normed, taken):
        torch.testing.assert_close(got, vit.norm(after[i])[:, 1:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_stop_early_pooled_and_the_openmmlab_norm_of_the_last_map():
    vit = tiny()
    x = torch.randn(2, 3, 32, 32)
    after, hw = by_hand(vit, x)
    final, _ = vit.forward_intermediates(x, [0], stop_early=True)
    torch.testing.assert_close(final, vit.norm(after[0]), rtol=1e-5, atol=1e-5)
    maps = vit.forward_intermediates(x, [1, 2], intermediates_only=True, norm_last_block=True)
    torch.testing.assert_close(maps[0], as_map(after[1], hw), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(maps[1], as_map(vit.norm(after[2]), hw), rtol=1e-5, atol=1e-5)
    pooled, _ = vit.forward_intermediates(x, [], pooled=True)
    torch.testing.assert_close(pooled, vit.norm(after[-1])[:, 0], rtol=1e-5, atol=1e-5)
    assert torch.equal(pooled, vit(x)[0])
    # forward with out_indices is forward_intermediates with the OpenMMLab norm, in the asked order.
    dense = tiny(out_indices=[2, 0])
    expected = dense.forward_intermediates(x, [2, 0], intermediates_only=True, norm_last_block=True)
    assert all(torch.equal(a, b) for a, b in zip(dense(x), expected))
    torch.testing.assert_close(dense(x)[0], as_map(vit.norm(after[2]), hw), rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    vit = tiny()
    x = torch.randn(1, 3, 32, 32)
    for bad in (0, DEPTH + 1, [DEPTH], [-DEPTH - 1]):
        with pytest.raises(ValueError, match="forward_intermediates"):
            vit.forward_intermediates(x, bad)
    with pytest.raises(ValueError, match="output_fmt"):
        vit.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.torch_leg
@torch.no_grad()
@pytest.mark.parametrize("kwargs", [dict(indices=2), dict(indices=[0, 2], norm=True), dict(stop_early=True, indices=[1]),
                                    dict(indices=None, output_fmt="NLC"), dict(indices=[0], intermediates_only=True)])
def test_same_as_timm(kwargs):
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    reference = TimmViT(img_size=32, patch_size=8, embed_dim=48, depth=DEPTH, num_heads=2, mlp_ratio=2.0,
                        num_classes=0).eval()
    vit = tiny()
    reference.load_state_dict({k.replace("stem.", "patch_embed."): v for k, v in vit.state_dict().items()})
    assert timm.__version__
    x = torch.randn(2, 3, 32, 32)
    ours, theirs = vit.forward_intermediates(x, **kwargs), reference.forward_intermediates(x, **kwargs)
    if kwargs.get("intermediates_only"):
        ours, theirs = (None, ours), (None, theirs)
    else:
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    assert len(ours[1]) == len(theirs[1])
    for a, b in zip(ours[1], theirs[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
