"""Multi-head self-attention through ``torch.nn.functional.scaled_dot_product_attention``."""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .rel_pos import decomposed_rel_pos_bias, resize_rel_pos
from .rel_pos_bias import RelativePositionBias


class Attention(nn.Module):
    """Multi-head self-attention over tokens (B, N, C).

    One fused ``qkv`` linear layer gives queries, keys and values; the heads are split with
    views only, and SDPA picks the fastest kernel (flash / memory-efficient on GPUs, the fused
    CPU kernel otherwise).

    With ``use_rel_pos`` the layer adds a decomposed relative position bias (MViTv2 / ViTDet, see
    :mod:`vitasks.models.layers.rel_pos`) from the tables ``rel_pos_h`` (2 * Sh - 1, head_dim)
    and ``rel_pos_w`` (2 * Sw - 1, head_dim), where (Sh, Sw) is ``rel_pos_size``, the token grid
    the layer is made for. The bias goes to SDPA as its float ``attn_mask``, so the fused kernels
    that accept a mask stay in use. The tokens must then be exactly a grid (no class token) and
    ``forward`` needs the grid's (height, width).

    With ``use_rel_pos_bias`` the layer adds BEiT's relative position bias (one learned value per
    head and relative offset, class-token entries included; :mod:`vitasks.models.layers.rel_pos_bias`)
    from its table ``rel_pos_bias.table``; the tokens are then the grid, optionally behind one
    class token. ``forward(x, hw, attn_bias)`` also adds an external bias (the backbone's shared
    table) to the logits. All biases go to SDPA as one float ``attn_mask``.

    Args:
        dim: token width C.
        num_heads: number of heads; must divide ``dim``.
        qkv_bias: whether the ``qkv`` projection has a bias.
        attn_drop: dropout on the attention probabilities (training only).
        proj_drop: dropout after the output projection.
        use_rel_pos: add the decomposed relative position bias.
        rel_pos_size: (height, width) of the grid the tables are sized for; needed with
            ``use_rel_pos``. Other grids work too (the tables are resampled linearly).
        rel_pos_zero_init: start the tables at zero (detectron2's default) instead of a
            truncated normal with std 0.02.
        use_rel_pos_bias: add BEiT's relative position bias from a table sized by
            ``rel_pos_size`` (zero-initialised; other grids resample it bilinearly).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        use_rel_pos: bool = False,
        rel_pos_size: Optional[Tuple[int, int]] = None,
        rel_pos_zero_init: bool = True,
        use_rel_pos_bias: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_drop = float(attn_drop)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.use_rel_pos = bool(use_rel_pos)
        self.rel_pos_h: Optional[nn.Parameter] = None
        self.rel_pos_w: Optional[nn.Parameter] = None
        if self.use_rel_pos:
            if rel_pos_size is None or len(rel_pos_size) != 2 or min(rel_pos_size) < 1:
                raise ValueError(
                    f"use_rel_pos needs rel_pos_size=(height, width) of the token grid, got {rel_pos_size!r}"
                )
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size[1] - 1, self.head_dim))
            if not rel_pos_zero_init:
                nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
                nn.init.trunc_normal_(self.rel_pos_w, std=0.02)
        self.rel_pos_bias: Optional[RelativePositionBias] = None
        if use_rel_pos_bias:
            if rel_pos_size is None or len(rel_pos_size) != 2 or min(rel_pos_size) < 1:
                raise ValueError(
                    f"use_rel_pos_bias needs rel_pos_size=(height, width) of the token grid, got {rel_pos_size!r}"
                )
            self.rel_pos_bias = RelativePositionBias(tuple(rel_pos_size), num_heads)

    def _qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        # (B, N, 3C) -> (3, B, heads, N, head_dim): a view, no copy; the last dim stays
        # contiguous, which is all the SDPA kernels need.
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def _bias(
        self, q: torch.Tensor, hw: Optional[Tuple[int, int]], attn_bias: Optional[torch.Tensor] = None
    ) -> Optional[torch.Tensor]:
        """The additive attention bias for queries q on the grid ``hw`` (decomposed relative
        position, BEiT's relative position table, and ``attn_bias``), or None without any."""
        bias = attn_bias.to(q.dtype) if attn_bias is not None else None
        if not self.use_rel_pos and self.rel_pos_bias is None:
            return bias
        if hw is None:
            raise ValueError(
                "Attention with a relative position bias needs the token grid: call it as attn(x, (height, width))"
            )
        if self.use_rel_pos:
            rel = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, hw, hw)
            bias = rel if bias is None else bias + rel
        if self.rel_pos_bias is not None:
            num_prefix = q.shape[-2] - hw[0] * hw[1]
            rel = self.rel_pos_bias(hw, num_prefix).to(q.dtype)
            bias = rel if bias is None else bias + rel
        return bias

    def forward(
        self, x: torch.Tensor, hw: Optional[Tuple[int, int]] = None, attn_bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Tokens (B, N, C) -> (B, N, C); ``hw`` is the (height, width) of the token grid,
        needed with ``use_rel_pos`` (N == height * width) or ``use_rel_pos_bias`` (N == height *
        width, + 1 with a class token) and ignored otherwise; ``attn_bias`` (broadcastable to
        (B, heads, N, N)) is added to the logits."""
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=self._bias(q, hw, attn_bias), dropout_p=self.attn_drop if self.training else 0.0
        )
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))

    def forward_with_keys(
        self, x: torch.Tensor, attn_bias: Optional[torch.Tensor] = None, return_attention: bool = False
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Global attention for token merging (ToMe): the output of :meth:`forward`, the keys
        averaged over heads (B, N, head_dim), ToMe's similarity metric, and the attention
        probabilities (B, heads, N, N) when ``return_attention`` (computed explicitly), else None.

        ``attn_bias`` is added to the attention logits (SDPA's float ``attn_mask``, broadcast to
        (B, heads, N, N)): proportional attention passes log(token size) as (B, 1, 1, N). With
        ``attn_bias=None`` the SDPA call is the one :meth:`forward` makes, so the output is
        bit-identical. No relative position bias here (merged tokens are no longer a grid).
        """
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        attn = None
        if return_attention:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if attn_bias is not None:
                attn = attn + attn_bias
            attn = attn.softmax(dim=-1)
            y = attn @ v
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_bias, dropout_p=self.attn_drop if self.training else 0.0
            )
        y = y.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(y)), k.mean(dim=1), attn

    def forward_with_attention(
        self, x: torch.Tensor, hw: Optional[Tuple[int, int]] = None, attn_bias: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Same output as :meth:`forward` (without attention dropout), plus the attention
        probabilities softmax(QK^T / sqrt(d) + bias) of shape (B, heads, N, N).

        The explicit N x N matrix makes this slower and hungrier than :meth:`forward`; it exists
        for visualisation (attention maps, rollout).
        """
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self._bias(q, hw, attn_bias)
        if bias is not None:
            attn = attn + bias
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x)), attn

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Tables trained for another grid (a detector fine-tuned at another input size):
        # resample them linearly, as the forward pass would, instead of failing on the shape.
        for name in ("rel_pos_h", "rel_pos_w"):
            own = getattr(self, name)
            value = state_dict.get(prefix + name)
            if (
                own is not None
                and isinstance(value, torch.Tensor)
                and value.ndim == 2
                and value.shape[1] == own.shape[1]
                and value.shape[0] != own.shape[0]
            ):
                state_dict[prefix + name] = resize_rel_pos(value, own.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
