"""The pre-norm transformer block of ViT, with ViTDet's window attention as an option."""

from typing import Callable, Optional, Tuple

import torch
from torch import nn

from .attention import Attention
from .drop_path import DropPath
from .layer_scale import LayerScale
from .mlp import Mlp, mlp_act_layer
from .window import window_partition, window_token_index, window_unpartition


class TransformerBlock(nn.Module):
    """x + attn(norm1(x)), then x + mlp(norm2(x)); each branch with optional LayerScale and
    stochastic depth.

    Submodule names (``norm1``, ``attn.qkv``, ``attn.proj``, ``ls1.gamma``, ``norm2``,
    ``mlp.fc1``, ``mlp.fc2``, ``ls2.gamma``) follow timm so checkpoints map key by key; the
    relative-position tables are ``attn.rel_pos_h`` and ``attn.rel_pos_w`` as in detectron2.

    Window attention (ViTDet): with ``window_size > 0`` the normalised tokens, which must be
    exactly a row-major grid (no class or register tokens), are zero-padded at the bottom and
    right to multiples of the window, cut into windows, attended within each window (the padded
    tokens included, as keys and values, as detectron2 does), and put back with the padding
    removed. The MLP branch is unchanged. ``window_size = 0`` is global attention.

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
        window_size: side of the attention windows in tokens; 0 for global attention.
        use_rel_pos: decomposed relative position bias in the attention.
        input_size: (height, width) of the token grid of a global-attention block, which sizes
            its relative-position tables (a window block's tables are sized by the window).
        rel_pos_zero_init: zero-initialise the relative-position tables.
        use_rel_pos_bias: BEiT's relative position bias (``attn.rel_pos_bias.table``, sized by
            ``input_size``; global attention only). LayerScale's ``ls1.gamma`` / ``ls2.gamma``
            are BEiT's ``gamma_1`` / ``gamma_2`` (transformers' ``lambda_1`` / ``lambda_2``):
            the same per-channel gain on each residual branch, before stochastic depth.
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
        window_size: int = 0,
        use_rel_pos: bool = False,
        input_size: Optional[Tuple[int, int]] = None,
        rel_pos_zero_init: bool = True,
        use_rel_pos_bias: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 0:
            raise ValueError(f"window_size must be an integer >= 0, got {window_size!r}")
        if use_rel_pos_bias and window_size > 0:
            raise ValueError("use_rel_pos_bias (BEiT's table) needs global attention (window_size=0)")
        self.window_size = window_size
        attn_size = (window_size, window_size) if window_size > 0 else input_size
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(
            dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop,
            use_rel_pos=use_rel_pos, rel_pos_size=attn_size, rel_pos_zero_init=rel_pos_zero_init,
            use_rel_pos_bias=use_rel_pos_bias,
        )
        self.ls1 = LayerScale(dim, layer_scale_init_value) if layer_scale_init_value else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=mlp_act_layer(mlp_act), drop=proj_drop)
        self.ls2 = LayerScale(dim, layer_scale_init_value) if layer_scale_init_value else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _grid(self, x: torch.Tensor, hw: Optional[Tuple[int, int]]) -> Tuple[int, int]:
        if hw is None or hw[0] * hw[1] != x.shape[1]:
            raise ValueError(
                f"window attention needs the tokens to be exactly the patch grid: got {x.shape[1]} tokens "
                f"and grid {hw} (class and register tokens are not supported with windows)"
            )
        return hw

    def _attend(
        self, x: torch.Tensor, hw: Optional[Tuple[int, int]], attn_bias: Optional[torch.Tensor] = None,
        with_attention: bool = False,
    ):
        """The attention branch on normalised tokens (global or windowed); with ``with_attention``
        also its probabilities (B, heads, N, N)."""
        attend = self.attn.forward_with_attention if with_attention else self.attn
        if self.window_size == 0:
            return attend(x, hw, attn_bias)
        if attn_bias is not None:
            raise ValueError("an external attention bias needs global attention (window_size=0)")
        B, N, C = x.shape
        h, w = self._grid(x, hw)
        ws = self.window_size
        windows, padded_hw = window_partition(x.view(B, h, w, C), ws)
        y = attend(windows.view(-1, ws * ws, C), (ws, ws))
        if with_attention:
            y, window_attn = y
        y = window_unpartition(y.view(-1, ws, ws, C), ws, padded_hw, (h, w)).view(B, N, C)
        if not with_attention:
            return y
        # Scatter each window's (ws^2 x ws^2) probabilities into the full N x N matrix (zero
        # between windows). Padded positions map to the extra index N, dropped at the end.
        index = window_token_index((h, w), ws, device=x.device)  # (num_windows, ws^2)
        num_windows, L = index.shape
        heads = window_attn.shape[1]
        window_attn = window_attn.view(B, num_windows, heads, L, L).transpose(1, 2)
        full = window_attn.new_zeros(B, heads, N + 1, N + 1)
        full[:, :, index[:, :, None].expand(-1, -1, L), index[:, None, :].expand(-1, L, -1)] = window_attn
        return y, full[:, :, :N, :N]

    def forward(
        self, x: torch.Tensor, hw: Optional[Tuple[int, int]] = None, attn_bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Tokens (B, N, C) -> (B, N, C); ``hw`` is the (height, width) of the patch grid, needed
        with window attention or a relative position bias; ``attn_bias`` (e.g. BEiT's shared
        relative position bias, (1, heads, N, N)) is added to the attention logits."""
        x = x + self.drop_path1(self.ls1(self._attend(self.norm1(x), hw, attn_bias)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x

    def forward_with_attention(
        self, x: torch.Tensor, hw: Optional[Tuple[int, int]] = None, attn_bias: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` plus the attention probabilities (B, heads, N, N) of this block.

        In a window block the probabilities are zero between windows, and a row sums to less
        than 1 where its window has padded tokens (their share is not shown).
        """
        y, attn = self._attend(self.norm1(x), hw, attn_bias, with_attention=True)
        x = x + self.drop_path1(self.ls1(y))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, attn

    def forward_merging(
        self,
        x: torch.Tensor,
        merge: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        attn_bias: Optional[torch.Tensor] = None,
        return_attention: bool = False,
    ):
        """Token merging's block (ToMe, Bolya et al. 2023): attention (global; ``attn_bias`` added
        to its logits, log token sizes for proportional attention), then ``merge(x, keys)``
        reduces the tokens, using the keys averaged over heads as similarity, then the MLP runs
        on the merged tokens. With ``attn_bias=None`` and a ``merge`` that returns ``x`` this is
        :meth:`forward`, bit for bit. Returns the tokens, or (tokens, attention probabilities
        (B, heads, N, N) over the tokens before merging) when ``return_attention``.
        """
        if self.window_size or self.attn.use_rel_pos or self.attn.rel_pos_bias is not None:
            raise ValueError("token merging needs global attention without a relative position bias")
        y, keys, attn = self.attn.forward_with_keys(self.norm1(x), attn_bias, return_attention)
        x = x + self.drop_path1(self.ls1(y))
        x = merge(x, keys)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return (x, attn) if return_attention else x
