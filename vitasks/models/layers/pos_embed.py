"""Learned absolute position embeddings: resampling to another token grid."""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def _as_grid(size, name: str) -> Tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"{name} must be an int or (height, width), got {size}")
    return size


def resample_abs_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: Tuple[int, int],
    old_grid: Optional[Tuple[int, int]] = None,
    num_prefix_tokens: int = 1,
    mode: str = "bicubic",
    antialias: bool = False,
    offset: float = 0.0,
) -> torch.Tensor:
    """Resample position embeddings (1, P + H*W, C) laid out row-major on an H x W grid.

    The first ``num_prefix_tokens`` embeddings (e.g. the class token's) are kept as they are;
    the grid part is interpolated in 2D (``F.interpolate``, ``align_corners=False``, computed in
    at least float32 precision and cast back). When the grids are equal the input is returned unchanged.

    Args:
        pos_embed: (1, P + H*W, C) tensor.
        new_grid: target (height, width) in tokens (an int means square).
        old_grid: source (height, width); None means square, inferred from the token count.
        num_prefix_tokens: P, the leading embeddings that are not on the grid.
        mode: interpolation mode of ``F.interpolate`` (bicubic as DeiT/timm/mmpretrain).
        antialias: ``F.interpolate``'s antialias flag (bilinear/bicubic only). Not only for
            shrinking: PyTorch's antialiased bicubic uses PIL's cubic kernel (a = -0.5) instead
            of the plain one (a = -0.75), so it changes an upsampling too.
        offset: 0 gives ``F.interpolate`` the target size. Otherwise it gets the scale factors
            ``(new + offset) / old`` per axis instead (the output size is then still ``new``
            for 0 <= offset < 1, but the sampling positions follow the scale): the rule of
            DINO/DINOv2 (``interpolate_offset=0.1``, facebookresearch/dino issue 8) and of
            transformers' DINOv2 before it switched to sizes.
    """
    if pos_embed.ndim != 3:
        raise ValueError(f"pos_embed must be (1, P + H*W, C), got shape {tuple(pos_embed.shape)}")
    new_grid = _as_grid(new_grid, "new_grid")
    num_grid = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(max(num_grid, 0))
        if side * side != num_grid:
            raise ValueError(
                f"pos_embed has {num_grid} grid tokens (after {num_prefix_tokens} prefix tokens), "
                "which is not a square: pass old_grid=(height, width)"
            )
        old_grid = (side, side)
    old_grid = _as_grid(old_grid, "old_grid")
    if old_grid[0] * old_grid[1] != num_grid:
        raise ValueError(
            f"old_grid {old_grid} has {old_grid[0] * old_grid[1]} tokens but pos_embed has "
            f"{num_grid} grid tokens"
        )
    if new_grid == old_grid:
        return pos_embed

    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dtype = grid.dtype
    C = grid.shape[-1]
    # Half precision interpolation loses detail; compute in float32 (float64 stays float64).
    compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    grid = grid.reshape(1, old_grid[0], old_grid[1], C).permute(0, 3, 1, 2).to(compute_dtype)
    if offset:
        # Python floats, as the sources compute them: (new + offset) / old per axis.
        resize = dict(scale_factor=(float(new_grid[0] + offset) / old_grid[0], float(new_grid[1] + offset) / old_grid[1]))
    else:
        resize = dict(size=new_grid)
    grid = F.interpolate(
        grid,
        mode=mode,
        align_corners=False if mode in ("linear", "bilinear", "bicubic", "trilinear") else None,
        antialias=antialias,
        **resize,
    )
    if tuple(grid.shape[-2:]) != new_grid:
        raise ValueError(
            f"resampling with offset {offset} gave a {tuple(grid.shape[-2:])} grid instead of {new_grid}; "
            "the offset must be in [0, 1)"
        )
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], C).to(dtype)
    return torch.cat([prefix, grid], dim=1)
