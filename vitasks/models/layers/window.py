"""Non-overlapping window partition of a token grid (Swin, ViTDet).

ViTDet (Li et al. 2022) runs most blocks of a plain ViT on windows of the patch grid. A grid whose
sides are not multiples of the window is padded at the bottom and right with zeros first; the
padded tokens take part in the window's attention (as keys and values, as in detectron2) and are
cut away again afterwards.
"""

from typing import Tuple

import torch
import torch.nn.functional as F


def window_partition(x: torch.Tensor, window_size: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Cut a grid (B, H, W, C) into windows (B * num_windows, window_size, window_size, C).

    The grid is zero-padded at the bottom and right to the next multiples of ``window_size``;
    windows are ordered row-major over the padded grid, batch-major. Returns the windows and the
    padded size (Hp, Wp), which :func:`window_unpartition` needs.
    """
    B, H, W, C = x.shape
    pad_h = -H % window_size
    pad_w = -W % window_size
    if pad_h or pad_w:
        # F.pad's pairs run from the last dimension: C (none), then W, then H.
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window_size, window_size, Wp // window_size, window_size, C)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, C)
    return windows, (Hp, Wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, padded_hw: Tuple[int, int], hw: Tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: windows (B * num_windows, ws, ws, C) -> grid
    (B, H, W, C) with the padding removed."""
    Hp, Wp = padded_hw
    H, W = hw
    num_windows = (Hp // window_size) * (Wp // window_size)
    B = windows.shape[0] // num_windows
    x = windows.view(B, Hp // window_size, Wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    if Hp > H or Wp > W:
        x = x[:, :H, :W]
    return x.contiguous()


def window_token_index(hw: Tuple[int, int], window_size: int, device=None) -> torch.Tensor:
    """(num_windows, window_size**2) long tensor: for each window position, the row-major index
    of its token in the unpadded H x W grid, or H * W for a padded position."""
    H, W = hw
    index = torch.arange(H * W, device=device).view(1, H, W, 1)
    # Padding with H*W marks the padded positions (an index one past the last token).
    index = F.pad(index, (0, 0, 0, -W % window_size, 0, -H % window_size), value=H * W)
    windows, _ = window_partition(index, window_size)
    return windows.reshape(windows.shape[0], window_size * window_size)
