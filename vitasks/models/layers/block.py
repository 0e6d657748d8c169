"""The pre-norm transformer block of ViT."""

from typing import Optional, Tuple

import torch
from torch import nn

from .attention import Attention
from .drop_path import DropPath
from .layer_scale import LayerScale
from .mlp import Mlp, mlp_act_layer


class TransformerBlock(nn.Module):
    """x + attn(norm1(x)), then x + mlp(norm2(x)); each branch with optional LayerScale and
    stochastic depth.

    Submodule names (``norm1``, ``attn.qkv``, ``attn.proj``, ``ls1.gamma``, ``norm2``,
    ``mlp.fc1``, ``mlp.fc2``, ``ls2.gamma``) follow timm so checkpoints map key by key.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / ``dim``.
        qkv_bias: bias in the fused qkv projection.
        proj_drop: dropout after the attention projection and in the MLP.
        attn_drop: dropout on attention probabilities.
        drop_path: stochastic depth rate of both branches.
        layer_scale_init_value: LayerScale initial value; None disables LayerScale.
        norm_eps: LayerNorm epsilon.
        mlp_act: MLP activation, ``"gelu"`` (exact) or ``"gelu_tanh"`` (tanh approximation,
            as Google's JAX ViT).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale_init_value: Optional[float] = None,
        norm_eps: float = 1e-6,
        mlp_act: str = "gelu",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, layer_scale_init_value) if layer_scale_init_value else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=mlp_act_layer(mlp_act), drop=proj_drop)
        self.ls2 = LayerScale(dim, layer_scale_init_value) if layer_scale_init_value else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    def forward_with_attention(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` plus the attention probabilities (B, heads, N, N) of this block."""
        y, attn = self.attn.forward_with_attention(self.norm1(x))
        x = x + self.drop_path1(self.ls1(y))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, attn
