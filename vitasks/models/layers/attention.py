"""Multi-head self-attention through ``torch.nn.functional.scaled_dot_product_attention``."""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention over tokens (B, N, C).

    One fused ``qkv`` linear layer gives queries, keys and values; the heads are split with
    views only, and SDPA picks the fastest kernel (flash / memory-efficient on GPUs, the fused
    CPU kernel otherwise).

    Args:
        dim: token width C.
        num_heads: number of heads; must divide ``dim``.
        qkv_bias: whether the ``qkv`` projection has a bias.
        attn_drop: dropout on the attention probabilities (training only).
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
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

    def _qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        # (B, N, 3C) -> (3, B, heads, N, head_dim): a view, no copy; the last dim stays
        # contiguous, which is all the SDPA kernels need.
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0
        )
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))

    def forward_with_attention(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Same output as :meth:`forward` (without attention dropout), plus the attention
        probabilities softmax(QK^T / sqrt(d)) of shape (B, heads, N, N).

        The explicit N x N matrix makes this slower and hungrier than :meth:`forward`; it exists
        for visualisation (attention maps, rollout).
        """
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x)), attn
