"""Decomposed relative position bias (MViTv2, Li et al. 2022; used by ViTDet).

Each attention layer learns two tables, ``rel_pos_h`` of shape (2 * Sh - 1, head_dim) and
``rel_pos_w`` of shape (2 * Sw - 1, head_dim), for a query/key grid of Sh x Sw tokens. The bias of
query q at grid position (qh, qw) for key k at (kh, kw) is

    bias[q, k] = <q, Rh[qh - kh + Sh - 1]> + <q, Rw[qw - kw + Sw - 1]>

with the unscaled query vector q; it is added to the scaled logits q.k / sqrt(d) before the
softmax. The height part depends only on (q, kh) and the width part only on (q, kw), which is
what makes the bias cheap: two small einsums, then a broadcast sum.

When the layer runs on another grid than its tables were made for (a global-attention layer at
another input size), a table is resampled linearly to the needed length ``2 * max(q, k) - 1``
and, when query and key sides differ, the shorter side's coordinates are stretched to the
longer one's (detectron2's ``get_rel_pos``).
"""

from typing import Tuple

import torch
import torch.nn.functional as F


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly resample a table (L, C) to (length, C) (``F.interpolate`` mode "linear",
    ``align_corners=False``, in at least float32); returns the input when L == length."""
    if rel_pos.shape[0] == length:
        return rel_pos
    compute_dtype = torch.float64 if rel_pos.dtype == torch.float64 else torch.float32
    # (L, C) -> (1, C, L): interpolate along the relative distance.
    resized = F.interpolate(rel_pos.t().unsqueeze(0).to(compute_dtype), size=length, mode="linear")
    return resized.squeeze(0).t().to(rel_pos.dtype)


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Embeddings (q_size, k_size, C) of the relative positions between q_size query and
    k_size key coordinates along one axis, read from the table ``rel_pos`` (L, C).

    With equal sizes, entry [i, j] is ``rel_pos[i - j + size - 1]``. With different sizes the
    coordinates of the shorter side are scaled by ``max / min`` so both span the same extent,
    and the table is resampled to ``2 * max(q_size, k_size) - 1`` rows first if needed.
    """
    length = 2 * max(q_size, k_size) - 1
    table = resize_rel_pos(rel_pos, length)
    q_scale = max(k_size / q_size, 1.0)
    k_scale = max(q_size / k_size, 1.0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * q_scale
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * k_scale
    relative = (q_coords - k_coords) + (k_size - 1) * k_scale
    # Truncation toward zero as detectron2 (the values are >= 0, so this is floor).
    return table[relative.long()]


def decomposed_rel_pos_bias(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_hw: Tuple[int, int],
    k_hw: Tuple[int, int],
) -> torch.Tensor:
    """The additive attention bias (B, heads, q_h * q_w, k_h * k_w) for queries
    q (B, heads, q_h * q_w, head_dim) laid out row-major on a q_h x q_w grid.

    The result is meant as the float ``attn_mask`` of ``scaled_dot_product_attention``; it has
    the dtype of ``q``.
    """
    q_h, q_w = q_hw
    k_h, k_w = k_hw
    B, heads, N, dim = q.shape
    if N != q_h * q_w:
        raise ValueError(f"decomposed_rel_pos_bias: {N} query tokens do not form a {q_h} x {q_w} grid")
    Rh = get_rel_pos(q_h, k_h, rel_pos_h).to(q.dtype)  # (q_h, k_h, dim)
    Rw = get_rel_pos(q_w, k_w, rel_pos_w).to(q.dtype)  # (q_w, k_w, dim)
    grid_q = q.reshape(B, heads, q_h, q_w, dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, Rh)  # (B, heads, q_h, q_w, k_h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, Rw)  # (B, heads, q_h, q_w, k_w)
    bias = rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)  # (B, heads, q_h, q_w, k_h, k_w)
    return bias.reshape(B, heads, q_h * q_w, k_h * k_w)
