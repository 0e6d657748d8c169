"""BEiT's relative position bias (Bao et al. 2022; also Data2Vec-vision and MAE's segmentation
fine-tuning): one learned scalar per head for every relative offset between two patches, plus
three entries for the class token.

For a patch grid of Wh x Ww tokens the table holds ``(2 Wh - 1)(2 Ww - 1) + 3`` rows of
``num_heads`` values. The bias of query patch (i1, j1) for key patch (i2, j2) is row
``(i1 - i2 + Wh - 1) * (2 Ww - 1) + (j1 - j2 + Ww - 1)``; the last three rows are class token ->
patch (row L - 3), patch -> class token (L - 2) and class token -> class token (L - 1). The
bias (heads, N, N) is added to the scaled logits q.k / sqrt(d) (SDPA's float ``attn_mask``).

Another grid than the table's (another input size, or a checkpoint made for another size): the
(2 Wh - 1) x (2 Ww - 1) part is resampled bilinearly (``F.interpolate``, ``align_corners=False``)
to (2 h - 1) x (2 w - 1), the three class-token rows are kept. That is the rule of transformers'
``BeitRelativePositionBias`` (every forward, from MiDaS v3.1), so a converted transformers model
gives transformers' outputs at any input size. BEiT's own fine-tuning code instead resamples a
pre-training table once, when loading it, on a geometric sequence of offsets with a cubic spline
(``semantic_segmentation/backbone/beit.py``, mmseg's ``resize_rel_pos_embed``); vitasks applies the
bilinear rule at load time too, which differs from that (the published fine-tuned checkpoints
already hold tables at their fine-tuning grid, so they need no resampling). BEiT's rule is
:func:`resize_rel_pos_bias_table_geometric`, which the ``mae`` converter applies to BEiT's own
checkpoints when given ``--img-size`` (``python tools/convert_checkpoint.py mae
beit_base_patch16_224_pt22k_ft22k.pth out.pth --img-size 640``), so the converted tables are
BEiT's fine-tuning start.
"""

from functools import lru_cache
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RelativePositionBias", "num_relative_distances", "relative_position_index", "resize_rel_pos_bias_table"]


def num_relative_distances(grid: Tuple[int, int]) -> int:
    """Rows of the table for a ``grid`` = (Wh, Ww) of patches: (2Wh-1)(2Ww-1) + 3."""
    return (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3


@lru_cache(maxsize=16)
def _index(h: int, w: int, num_prefix: int, device: str) -> torch.Tensor:
    rows = torch.arange(h, device=device).repeat_interleave(w)  # (h*w,) row of each patch
    cols = torch.arange(w, device=device).repeat(h)
    grid = (rows[:, None] - rows[None, :] + h - 1) * (2 * w - 1) + (cols[:, None] - cols[None, :] + w - 1)
    if num_prefix == 0:
        return grid
    L = (2 * h - 1) * (2 * w - 1) + 3
    index = torch.empty(h * w + 1, h * w + 1, dtype=grid.dtype, device=device)
    index[1:, 1:] = grid
    index[0, :] = L - 3  # class token -> patches
    index[:, 0] = L - 2  # patches -> class token
    index[0, 0] = L - 1  # class token -> class token
    return index


def relative_position_index(hw: Tuple[int, int], num_prefix: int = 1, device=None) -> torch.Tensor:
    """(N, N) long index into a table for grid ``hw`` (N = num_prefix + h * w; ``num_prefix``
    is 1 with a class token, 0 without); cached per grid and device, do not modify."""
    if num_prefix not in (0, 1):
        raise ValueError(f"the relative position bias supports a class token or none, got {num_prefix} prefix tokens")
    return _index(int(hw[0]), int(hw[1]), num_prefix, str(torch.device(device or "cpu")))


def resize_rel_pos_bias_table(
    table: torch.Tensor, new_grid: Tuple[int, int], old_grid: Optional[Tuple[int, int]] = None
) -> torch.Tensor:
    """Resample a table (L, heads) made for ``old_grid`` (None: square, from L) to ``new_grid``:
    bilinear on the (2Wh-1) x (2Ww-1) offsets (``align_corners=False``, in at least float32),
    the three class-token rows kept. Returns the input when the grids are equal."""
    L, heads = table.shape
    if old_grid is None:
        side = (int(round((L - 3) ** 0.5)) + 1) // 2
        if (2 * side - 1) ** 2 + 3 != L:
            raise ValueError(
                f"a relative position bias table with {L} rows is not (2S-1)^2 + 3 for a square grid S x S"
            )
        old_grid = (side, side)
    old_grid = (int(old_grid[0]), int(old_grid[1]))
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    if num_relative_distances(old_grid) != L:
        raise ValueError(f"table of {L} rows does not match grid {old_grid} ({num_relative_distances(old_grid)} rows)")
    if old_grid == new_grid:
        return table
    compute = torch.float64 if table.dtype == torch.float64 else torch.float32
    offsets = table[:-3].to(compute).reshape(2 * old_grid[0] - 1, 2 * old_grid[1] - 1, heads).permute(2, 0, 1)
    size = (2 * new_grid[0] - 1, 2 * new_grid[1] - 1)
    offsets = F.interpolate(offsets.unsqueeze(0), size=size, mode="bilinear", align_corners=False)[0]
    offsets = offsets.permute(1, 2, 0).reshape(size[0] * size[1], heads).to(table.dtype)
    return torch.cat([offsets, table[-3:]], dim=0)


class RelativePositionBias(nn.Module):
    """BEiT's relative position bias table for a ``grid`` of patches and ``num_heads`` heads.

    The parameter is ``table`` ((2Wh-1)(2Ww-1)+3, num_heads), zero-initialised (as transformers;
    MAE checkpoints have no tables, so their fine-tuning starts from zero too).
    ``forward(hw, num_prefix)`` returns the bias (1, heads, N, N) for a grid ``hw`` with
    ``num_prefix`` (0 or 1) class token in front, in the table's dtype.
    """

    def __init__(self, grid: Tuple[int, int], num_heads: int) -> None:
        super().__init__()
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"RelativePositionBias needs a (height, width) grid, got {grid!r}")
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_heads = int(num_heads)
        self.table = nn.Parameter(torch.zeros(num_relative_distances(self.grid), self.num_heads))

    def forward(self, hw: Tuple[int, int], num_prefix: int = 1) -> torch.Tensor:
        table = resize_rel_pos_bias_table(self.table, hw, self.grid)
        index = relative_position_index(hw, num_prefix, table.device)
        N = index.shape[0]
        return table[index.reshape(-1)].reshape(N, N, self.num_heads).permute(2, 0, 1).unsqueeze(0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A table made for another grid (a pre-training checkpoint): resample it as forward would.
        key = prefix + "table"
        value = state_dict.get(key)
        if (
            isinstance(value, torch.Tensor)
            and value.ndim == 2
            and value.shape[1] == self.num_heads
            and value.shape[0] != self.table.shape[0]
        ):
            state_dict[key] = resize_rel_pos_bias_table(value, self.grid)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, num_heads={self.num_heads}"


def geometric_offsets(src_side: int, dst_side: int):
    """BEiT's fine-tuning offsets for resampling a (src_side x src_side) offset table, src_side
    = 2S - 1, to dst_side = 2D - 1 (BEiT's ``semantic_segmentation/backbone/beit.py``): the
    source's S - 1 positive offsets are spread on a geometric sequence 1, 1 + q, 1 + q + q^2, ...
    whose ratio q (bisection in [1.01, 1.5]) makes the sum of S - 1 terms reach D - 1, so offsets
    near 0 keep their spacing and far ones stretch. Returns (source coordinates, target
    coordinates) along one axis."""
    import numpy as np

    half_src, half_dst = src_side // 2, dst_side // 2
    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:
        q = (lo + hi) / 2.0
        if (1.0 - q**half_src) / (1.0 - q) > half_dst:  # 1 + q + ... + q^(half_src - 1)
            hi = q
        else:
            lo = q
    steps = np.cumsum([q**i for i in range(half_src)])  # 1, 1 + q, 1 + q + q^2, ...
    src = np.concatenate([-steps[::-1], [0.0], steps])
    dst = np.arange(-(dst_side // 2), dst_side // 2 + 1, dtype=np.float64)
    return src, dst


def resize_rel_pos_bias_table_geometric(table: torch.Tensor, new_grid: Tuple[int, int]) -> torch.Tensor:
    """BEiT's own rule for loading a pre-training table (square grid S x S) into a fine-tuning
    grid D x D: per head, a bicubic interpolating spline (scipy's ``RectBivariateSpline``,
    s = 0: what BEiT's ``interp2d(kind="cubic")`` computes on a grid) through the offsets of
    :func:`geometric_offsets`, read at the integer offsets -(D-1) .. D-1; the three class-token
    rows kept. Needs scipy; computed in float64 and returned in the table's dtype."""
    import numpy as np
    from scipy.interpolate import RectBivariateSpline

    L, heads = table.shape
    side = (int(round((L - 3) ** 0.5)) + 1) // 2
    if (2 * side - 1) ** 2 + 3 != L or new_grid[0] != new_grid[1]:
        raise ValueError("BEiT's geometric resampling takes a square table and a square target grid")
    if side == new_grid[0]:
        return table
    src_side, dst_side = 2 * side - 1, 2 * int(new_grid[0]) - 1
    src, dst = geometric_offsets(src_side, dst_side)
    offsets = table[:-3].detach().to(torch.float64).cpu().numpy().reshape(src_side, src_side, heads)
    out = np.stack(
        [RectBivariateSpline(src, src, offsets[:, :, h], kx=3, ky=3, s=0)(dst, dst) for h in range(heads)], axis=-1
    )
    resized = torch.from_numpy(out.reshape(dst_side * dst_side, heads)).to(table.dtype).to(table.device)
    return torch.cat([resized, table[-3:]], dim=0)
