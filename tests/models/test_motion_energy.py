"""The video ViT's opponent motion-energy tubelets (``motion_energy: true``)."""

import pytest
import torch

from vitasks.errors import ConfigError
from vitasks.models.backbones.video_vit import TubeletEmbed, VideoVisionTransformer


def _energy_by_hand(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, p: int, t: int) -> torch.Tensor:
    """Each tubelet flattened, dotted with the kernel and with the kernel reversed in time."""
    B, C, T, H, W = x.shape
    tubes = x.reshape(B, C, T // t, t, H // p, p, W // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
    tubes = tubes.reshape(B, T // t, H // p, W // p, -1)
    forward = tubes @ weight.reshape(weight.shape[0], -1).T
    backward = tubes @ weight.flip(2).reshape(weight.shape[0], -1).T
    return (forward ** 2 - backward ** 2 + bias).permute(0, 4, 1, 2, 3)


def test_energy_equals_the_formula_and_its_symmetries():
    torch.manual_seed(0)
    stem = TubeletEmbed(3, 5, patch_size=4, tubelet_size=3, motion_energy=True)
    with torch.no_grad():
        stem.proj.bias.normal_()
    x = torch.randn(2, 3, 6, 8, 12, dtype=torch.float64)
    stem = stem.double()
    out = stem(x)
    assert out.shape == (2, 5, 2, 2, 3)
    torch.testing.assert_close(out, _energy_by_hand(x, stem.proj.weight, stem.proj.bias, 4, 3))
    bias = stem.proj.bias.view(1, -1, 1, 1, 1)
    # Even in the input (contrast polarity does not matter)...
    torch.testing.assert_close(stem(-x), out)
    # ...odd in time within each tubelet (the direction is the sign)...
    reversed_in_tubelets = x.reshape(2, 3, 2, 3, 8, 12).flip(3).reshape(2, 3, 6, 8, 12)
    torch.testing.assert_close(stem(reversed_in_tubelets) - bias, -(out - bias))
    # ...and nothing where nothing moves, whatever the texture.
    static = x[:, :, :1].expand(-1, -1, 6, -1, -1)
    torch.testing.assert_close(stem(static), bias.expand_as(out))


def test_a_moving_edge_and_its_mirror_motion_get_opposite_energies():
    # A vertical edge moving right, and the same edge moving left: every channel's energy flips
    # sign, light-on-dark and dark-on-light alike.
    torch.manual_seed(1)
    stem = TubeletEmbed(1, 8, patch_size=8, tubelet_size=2, motion_energy=True)
    columns = torch.arange(8.0)
    # Normalised pixels: light +1, dark -1 (inverting the picture around mid-grey negates it).
    frames = [(columns >= 3 + shift).float().mul(2).sub(1).expand(8, 8) for shift in (0, 1)]
    right = torch.stack(frames).reshape(1, 1, 2, 8, 8)
    left = right.flip(2)
    with torch.no_grad():
        e_right, e_left, e_dark = stem(right).flatten(), stem(left).flatten(), stem(-right).flatten()
    bias = stem.proj.bias
    torch.testing.assert_close(e_left - bias, -(e_right - bias))
    torch.testing.assert_close(e_dark, e_right)
    assert (e_right - bias).abs().max() > 1e-3


def test_backbone_option_and_checks():
    model = VideoVisionTransformer(num_frames=4, img_size=16, patch_size=8, tubelet_size=2, embed_dim=16, depth=1,
                                   num_heads=2, motion_energy=True, class_token=False, pool="mean")
    static = torch.randn(1, 3, 1, 16, 16).expand(2, 3, 4, 16, 16)
    assert model.stem.motion_energy
    # A static clip embeds to the bias alone: the tokens are then the position embeddings + bias.
    torch.testing.assert_close(model.stem(static), model.stem.proj.bias.view(1, -1, 1, 1, 1).expand(2, 16, 2, 2, 2))
    (pooled,) = model(torch.randn(2, 3, 4, 16, 16))
    pooled.sum().backward()
    assert model.stem.proj.weight.grad.abs().sum() > 0
    # The state dict is the linear embedding's: checkpoints load either way.
    plain = VideoVisionTransformer(num_frames=4, img_size=16, patch_size=8, tubelet_size=2, embed_dim=16, depth=1,
                                   num_heads=2, class_token=False, pool="mean")
    assert plain.state_dict().keys() == model.state_dict().keys()
    with pytest.raises(ConfigError, match="motion_energy needs tubelet_size >= 2"):
        VideoVisionTransformer(num_frames=4, img_size=16, patch_size=8, tubelet_size=1, embed_dim=16, depth=1,
                               num_heads=2, motion_energy=True)
