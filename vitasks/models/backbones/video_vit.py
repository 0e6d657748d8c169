"""The video Vision Transformer: ViViT (Arnab et al. 2021), TimeSformer (Bertasius et al. 2021)
and VideoMAE (Tong et al. 2022) as options of one backbone built from the image ViT's layers.

A clip (B, C, T, H, W) is cut into tubelets (``tubelet_size`` frames x ``patch_size`` pixels
square, a Conv3d), giving a T' x h x w grid of tokens, T' = T / tubelet_size; or a clip stem
(``stem``: :class:`~vitasks.models.backbones.ConvStem3D`, stacked 3D convs with those total
strides) gives the grid, a hybrid video ViT. Three ways to attend over it
(``attention_type``):

- ``joint``: one sequence of T' * h * w tokens (+ class token) through plain transformer blocks
  (ViViT model 1, VideoMAE);
- ``factorised_encoder``: the spatial encoder (plain blocks) runs on each of the T' frame groups
  with its own class token; a temporal encoder (``temporal_encoder``) then attends over the T'
  frame tokens (ViViT model 2);
- ``divided``: each block attends over time (each spatial position's T' tokens; its own norm,
  qkv and projection, then a ``temporal_fc`` layer), then over space (each frame's h * w tokens
  with the class token), then the MLP (TimeSformer's divided space-time attention).

Tokens are kept in (t, h, w) order (the Conv3d's own order); an image ViT's weights load into
every variant (see :func:`_adapt_checkpoint`). On a static clip (every frame the same) the
loaded model then computes exactly the image model's output with divided attention, and with
joint attention without a class token; with joint attention and a class token it is close but
not equal: the class token is one key among T' copies of each patch key, so it gets less weight.
"""

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from torch import nn

from vitasks.checks import IntPair, OneOf, PositiveInt, checked, config_key, one_of
from vitasks.errors import CheckpointError, ConfigError
from vitasks.registry import MODELS

from ..layers import Attention, TransformerBlock, resample_abs_pos_embed
from .base import INTERPOLATE_MODES, ViTBackbone
from .stems import init_patchify

ATTENTION_TYPES = ("joint", "divided", "factorised_encoder")
POS_EMBED_TYPES = ("learned", "joint", "sincos")
INFLATE_MODES = ("center", "average")
# The parameter names of an attention layer and a LayerNorm, copied spatial -> temporal.
_ATTN_PARAMS = ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias")
_NORM_PARAMS = ("weight", "bias")


def sincos_position_table(num_positions: int, dim: int, device=None) -> torch.Tensor:
    """VideoMAE's fixed position table (1, num_positions, dim) over the flattened token index p:
    entry (p, j) is sin(p / 10000^(2 floor(j/2) / dim)) for even j and cos(...) for odd j
    (the Transformer's sinusoids, as VideoMAE builds them). Computed in float64, returned float32."""
    position = torch.arange(num_positions, dtype=torch.float64, device=device)[:, None]
    exponent = 2 * (torch.arange(dim, device=device) // 2).to(torch.float64) / dim
    angle = position / torch.pow(10000.0, exponent)[None, :]
    table = torch.empty_like(angle)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table.to(torch.float32)[None]


def inflate_patch_kernel(weight: torch.Tensor, frames: int, mode: str) -> torch.Tensor:
    """A 2D patch kernel (C, in, p, p) as a tubelet kernel (C, in, frames, p, p).

    ``center``: the central frame (index frames // 2) gets the kernel, the others zero, so a
    static clip embeds exactly as its frame; ``average``: every frame gets kernel / frames, so a
    static clip embeds as its frame too and every frame contributes (I3D's inflation).
    """
    one_of(mode, INFLATE_MODES, config_key("inflate", default=VideoVisionTransformer.config_key))
    if mode == "average":
        return (weight / frames).unsqueeze(2).repeat(1, 1, frames, 1, 1)
    out = weight.new_zeros(weight.shape[0], weight.shape[1], frames, *weight.shape[2:])
    out[:, :, frames // 2] = weight
    return out


class TubeletEmbed(nn.Module):
    """Clip (B, in, T, H, W) -> token grid (B, C, T / t, H / p, W / p): a t x p x p Conv3d with
    stride equal to its kernel. State dict ``proj.{weight,bias}`` as the image ``PatchEmbed``
    (so image checkpoints name the kernel the same: it is inflated on loading).

    With ``motion_energy`` the token is the opponent motion energy of each tubelet instead of its
    linear response (Adelson & Bergen 1985): ``(w . x)^2 - (w_r . x)^2 + bias``, where ``w_r`` is
    the same kernel ``w`` played backwards in time. The energy equals
    ``((w - w_r) . x) ((w + w_r) . x)``, a temporal change times a spatial pattern (the gradient
    motion detector ``I_t * I_x``), so it is

    - even in the input: a clip and its negative (a dark object on a light background and a light
      one on a dark background) give the same tokens. A linear tubelet's tokens flip sign with
      contrast polarity, so near initialisation, with random colours, the motion signal has a
      random sign across samples and the gradients of a few hundred clips cancel: a small model
      then learns nothing;
    - zero on a static tubelet (every frame the same), whatever its texture: appearance that does
      not move is not in the tokens, which keeps a small model from memorising backgrounds;
    - odd in time: a clip played backwards gives the negated energies, so the direction of motion
      is the sign.

    Same parameters as the linear embedding (nothing to load differently); it needs
    ``tubelet_size >= 2`` (:class:`VideoVisionTransformer` checks it).

    Args:
        in_channels: image channels.
        embed_dim: token width.
        patch_size: spatial patch side p.
        tubelet_size: frames per token t (1 for TimeSformer, 2 for ViViT/VideoMAE).
        bias: whether the projection has a bias.
        motion_energy: tokens are opponent motion energies (above) rather than linear responses.
    """

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int, tubelet_size: int, bias: bool = True,
                 motion_energy: bool = False) -> None:
        super().__init__()
        self.stride = patch_size
        self.tubelet_size = tubelet_size
        self.motion_energy = bool(motion_energy)
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = init_patchify(nn.Conv3d(in_channels, embed_dim, kernel_size=kernel, stride=kernel, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.motion_energy:
            return self.proj(x)
        # The bias is added after the energies: inside the squares it would break the symmetries.
        # One convolution with the kernel and its time reversal stacked: (B, 2C, t', h, w).
        weight = self.proj.weight
        forward, backward = F.conv3d(x, torch.cat([weight, weight.flip(2)]), None, self.proj.stride).chunk(2, dim=1)
        energy = forward.square() - backward.square()
        return energy if self.proj.bias is None else energy + self.proj.bias.view(1, -1, 1, 1, 1)


class DividedSpaceTimeBlock(TransformerBlock):
    """TimeSformer's block: temporal attention, spatial attention, MLP, each residual.

    The spatial part and the MLP are the image block's own modules (``norm1``, ``attn``,
    ``ls1``, ``norm2``, ``mlp``, ``ls2``), so an image checkpoint fills them key by key; the
    temporal part adds ``temporal_norm``, ``temporal_attn`` (an :class:`Attention`) and
    ``temporal_fc`` (a linear layer after it, zero-initialised, so that a new block starts as the
    image block, as TimeSformer initialises it).

    ``forward(x, num_frames)`` takes tokens (B, P + T' * N, C) in (t, h, w) order with P = 0 or 1
    class tokens:

    1. temporal: each spatial position's T' patch tokens attend to each other;
       ``patches += temporal_fc(temporal_attn(temporal_norm(patches)))``;
    2. spatial: each frame's N patch tokens with a copy of the class token attend to each other;
       the class token's update is the mean of its T' per-frame updates (TimeSformer);
    3. MLP on every token.

    Stochastic depth drops a branch for a whole clip (not per frame or per position).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, norm_eps: float = 1e-6, **kwargs) -> None:
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop,
                         norm_eps=norm_eps, **kwargs)
        self.temporal_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.temporal_attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.temporal_fc = nn.Linear(dim, dim)
        nn.init.zeros_(self.temporal_fc.weight)
        nn.init.zeros_(self.temporal_fc.bias)

    def forward(self, x: torch.Tensor, num_frames: int = 1, num_prefix_tokens: int = 1) -> torch.Tensor:  # type: ignore[override]
        B, L, C = x.shape
        P, T = num_prefix_tokens, num_frames
        N = (L - P) // T
        prefix, patches = x[:, :P], x[:, P:]

        # Temporal attention: (B, T, N, C) -> (B * N, T, C), back to (B, T * N, C).
        xt = patches.reshape(B, T, N, C).transpose(1, 2).reshape(B * N, T, C)
        xt = self.temporal_attn(self.temporal_norm(xt))
        xt = xt.reshape(B, N, T, C).transpose(1, 2).reshape(B, T * N, C)
        patches = patches + self.drop_path1(self.temporal_fc(xt))

        # Spatial attention per frame: (B * T, P + N, C), the class token copied into each frame.
        xs = patches.reshape(B * T, N, C)
        if P:
            xs = torch.cat([prefix.unsqueeze(1).expand(B, T, P, C).reshape(B * T, P, C), xs], dim=1)
        ys = self.ls1(self.attn(self.norm1(xs)))
        update = ys[:, P:].reshape(B, T * N, C)
        if P:
            update = torch.cat([ys[:, :P].reshape(B, T, P, C).mean(dim=1), update], dim=1)
        x = torch.cat([prefix, patches], dim=1) + self.drop_path1(update)

        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class TemporalEncoder(nn.Module):
    """ViViT model 2's temporal transformer: frame tokens (B, T', C) -> (B, P + T', C) after a
    class token (when ``class_token``), learned position embeddings ``pos_embed`` (1, P + T', C),
    ``depth`` plain blocks and a final ``norm``."""

    def __init__(self, num_frames: int, embed_dim: int, depth: int, num_heads: int, class_token: bool,
                 final_norm: bool, drop_path_rates: Sequence[float], **block_kwargs) -> None:
        super().__init__()
        self.num_frames = num_frames
        self.num_prefix_tokens = int(class_token)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + num_frames, embed_dim))
        self.blocks = nn.ModuleList(
            TransformerBlock(embed_dim, num_heads, drop_path=drop_path_rates[i], **block_kwargs) for i in range(depth)
        )
        eps = block_kwargs.get("norm_eps", 1e-6)
        self.norm = nn.LayerNorm(embed_dim, eps=eps) if final_norm else nn.Identity()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        pos = self.pos_embed
        if T != self.num_frames:
            pos = _resample_time(pos, T, self.num_prefix_tokens)
        x = x + pos[:, self.num_prefix_tokens :]
        if self.cls_token is not None:
            x = torch.cat([(self.cls_token + pos[:, :1]).expand(B, -1, -1), x], dim=1)
        return x


def _resample_time(table: torch.Tensor, length: int, num_prefix_tokens: int = 0) -> torch.Tensor:
    """(1, P + T, C) -> (1, P + length, C), the T part interpolated linearly (prefix kept)."""
    prefix, rest = table[:, :num_prefix_tokens], table[:, num_prefix_tokens:]
    dtype = rest.dtype
    rest = F.interpolate(rest.transpose(1, 2).float(), size=length, mode="linear", align_corners=False)
    return torch.cat([prefix, rest.transpose(1, 2).to(dtype)], dim=1)


@MODELS.register_module()
class VideoVisionTransformer(ViTBackbone):
    """Video ViT: tubelet embedding -> tokens (+ class token, + position embeddings) -> blocks
    (joint, factorised encoder or divided space-time attention) -> final norm -> pooling.

    Args:
        num_frames: clip length T the model is built for; sets the temporal position grid
            T' = num_frames / tubelet_size (other lengths divisible by the tubelet run too: the
            temporal embeddings are interpolated).
        img_size: frame size (int or (H, W)); sets the spatial grid img_size / patch_size.
        patch_size: spatial side of a tubelet.
        tubelet_size: frames per tubelet (1: TimeSformer; 2: ViViT, VideoMAE).
        in_channels: image channels.
        embed_dim, depth, num_heads: the transformer's size (``depth``: the blocks of the
            (spatial) encoder).
        mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, drop_path_rate, layer_scale_init_value,
        norm_eps, mlp_act: the blocks' options, keyword arguments of
            :class:`~vitasks.models.backbones.base.ViTBackbone` (``drop_path_rate`` rises over all
            blocks: spatial then temporal encoder for ``factorised_encoder``).
        fc_norm_eps: epsilon of ``fc_norm``; None: ``norm_eps`` (VideoMAE's is 1e-5 with 1e-12
            in the blocks).
        attention_type: ``"joint"``, ``"factorised_encoder"`` or ``"divided"`` (module docstring).
        temporal_depth: blocks of the temporal encoder (``factorised_encoder`` only; ViViT-B: 4).
        pos_embed: ``"learned"``: a spatial table ``pos_embed`` (1, P + h*w, C), laid out as the
            image ViT's, plus a temporal one ``time_embed`` (1, T', C) (for the factorised
            encoder, the temporal encoder's ``temporal_encoder.pos_embed``); ``"joint"``: one
            learned table (1, P + T'*h*w, C) over the whole grid (transformers' ViViT);
            ``"sincos"``: VideoMAE's fixed sinusoidal table over the flattened grid (nothing
            learned; the class token, if any, gets no position).
        class_token: prepend a learned class token (for ``factorised_encoder``: one per frame
            group in the spatial encoder and one in the temporal encoder; without it a frame
            group is the mean of its patch tokens).
        pool: ``"token"`` (the class token) or ``"mean"`` (mean of the other tokens).
        fc_norm: norm after pooling instead of a final norm on all tokens (VideoMAE); None means
            True iff ``pool == "mean"``.
        final_norm: whether there is a final norm (``norm``/``temporal_encoder.norm`` or
            ``fc_norm``) at all.
        inflate: how a 2D patch kernel of an image checkpoint becomes the tubelet kernel:
            ``"center"`` (central frame) or ``"average"`` (kernel / t on each frame).
        motion_energy: tokens are each tubelet's opponent motion energy (see
            :class:`TubeletEmbed`): polarity-invariant, zero where nothing moves, signed by the
            direction of motion; for small models learning motion from few clips. Needs
            ``tubelet_size >= 2``; a static clip then embeds to zero (no image-model equivalence).
        stem: a convolutional stem instead of the tubelet embedding (a hybrid video ViT), as a
            config dict: ``{type: ConvStem3D, channels: [...], strides: [...],
            temporal_strides: [...], ...}`` (:class:`~vitasks.models.backbones.ConvStem3D`). Its
            spatial ``stride`` must equal ``patch_size`` and its ``temporal_stride``
            ``tubelet_size``. None: the tubelet embedding (:class:`TubeletEmbed`). An image
            checkpoint's stem kernels are inflated in time as the patch kernel is (``inflate``).
        with_cp: gradient checkpointing of every block.
        interpolate_mode: ``F.interpolate`` mode for resampling the spatial position embeddings
            (joint tables are resampled trilinearly).

    ``forward(x)`` on clips (B, in_channels, T, H, W) returns ``(pooled,)`` with pooled (B, C).
    """

    # Parameters of the embedding "layer" (layer id 0 for layer-wise lr decay), and those that
    # get no weight decay (timm's convention).
    embed_names = ("stem", "pos_embed", "time_embed", "cls_token")
    no_decay_names = ("pos_embed", "time_embed", "cls_token")

    @checked
    def __init__(
        self,
        num_frames: PositiveInt = 8,
        img_size: IntPair = 224,
        patch_size: PositiveInt = 16,
        tubelet_size: PositiveInt = 1,
        in_channels: int = 3,
        embed_dim: PositiveInt = 768,
        depth: PositiveInt = 12,
        num_heads: PositiveInt = 12,
        fc_norm_eps: Optional[float] = None,
        attention_type: OneOf(*ATTENTION_TYPES) = "joint",
        temporal_depth: PositiveInt = 4,
        pos_embed: OneOf(*POS_EMBED_TYPES) = "learned",
        class_token: bool = True,
        pool: OneOf("token", "mean") = "token",
        fc_norm: Optional[bool] = None,
        final_norm: bool = True,
        inflate: OneOf(*INFLATE_MODES) = "center",
        motion_energy: bool = False,
        stem: Optional[dict] = None,
        with_cp: bool = False,
        interpolate_mode: OneOf(*INTERPOLATE_MODES) = "bicubic",
        **kwargs,
    ) -> None:
        super().__init__(embed_dim, depth, num_heads, pool, class_token, with_cp, **kwargs)
        self.attention_type, self.pos_embed_type = attention_type, pos_embed
        self.inflate, self.interpolate_mode = inflate, interpolate_mode
        (self.temporal_size,) = self.grid_of((num_frames,), tubelet_size, "num_frames", "tubelet_size")
        self.grid_size = self.grid_of(img_size, patch_size, "img_size", "patch_size")
        problem = (f"{self.key()}: attention_type factorised_encoder takes pos_embed: learned (a spatial table per "
                   f"frame group and the temporal encoder's own), got {pos_embed!r}"
                   if attention_type == "factorised_encoder" and pos_embed != "learned" else
                   f"{self.key('motion_energy')} needs tubelet_size >= 2 (motion within a tubelet), got {tubelet_size}"
                   if motion_energy and tubelet_size < 2 else
                   f"{self.key('motion_energy')} is an option of the tubelet embedding; with "
                   f"{self.key('stem')} set, leave it false" if motion_energy and stem is not None else None)
        if problem:
            raise ConfigError(problem)

        self.num_frames = num_frames
        self.img_size = img_size
        self.patch_size = patch_size
        self.tubelet_size = tubelet_size
        self.num_prefix_tokens = int(bool(class_token))
        factorised = self.attention_type == "factorised_encoder"
        self.spatial_depth = depth
        self.temporal_depth = temporal_depth if factorised else 0
        # Layers for layer-wise lr decay (the optimizer reads `depth`): spatial then temporal blocks.
        self.depth = depth + self.temporal_depth

        if stem is None:
            self.stem = TubeletEmbed(in_channels, embed_dim, patch_size, tubelet_size, motion_energy=motion_energy)
        else:
            self.stem = self.build_stem(stem, in_channels, embed_dim, patch_size, default="ConvStem3D",
                                        choices=("ConvStem3D",))
            temporal = getattr(self.stem, "temporal_stride", None)
            if temporal != tubelet_size:
                raise ConfigError(
                    f"{self.key()}: the {type(self.stem).__name__} stem has temporal stride {temporal!r} but "
                    f"{self.key('tubelet_size')} is {tubelet_size}; set tubelet_size: {temporal} (or change the "
                    "stem's temporal_strides; a clip stem exposes an integer `temporal_stride`)"
                )
        self.stride = patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        num_spatial = self.grid_size[0] * self.grid_size[1]
        self.pos_embed: Optional[nn.Parameter] = None
        self.time_embed: Optional[nn.Parameter] = None
        if self.pos_embed_type == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + num_spatial, embed_dim))
            if not factorised:
                self.time_embed = nn.Parameter(torch.zeros(1, self.temporal_size, embed_dim))
        elif self.pos_embed_type == "joint":
            self.pos_embed = nn.Parameter(
                torch.zeros(1, self.num_prefix_tokens + self.temporal_size * num_spatial, embed_dim)
            )
        else:
            # Not saved: it is a function of the grid (VideoMAE's checkpoints don't hold it either).
            self.register_buffer(
                "sincos_table", sincos_position_table(self.temporal_size * num_spatial, embed_dim), persistent=False
            )
        self.pos_drop = nn.Dropout(self.drop_rate) if self.drop_rate > 0 else nn.Identity()

        block_kwargs, norm_eps = self.block_kwargs, self.norm_eps
        dpr = self.drop_path_rates(self.drop_path_rate, self.depth)  # over all blocks
        block_cls = DividedSpaceTimeBlock if self.attention_type == "divided" else TransformerBlock
        self.blocks = nn.ModuleList(
            block_cls(embed_dim, num_heads, drop_path=dpr[i], **block_kwargs) for i in range(depth)
        )
        norm, fc = self.final_norms(embed_dim, norm_eps, pool, fc_norm, final_norm, fc_norm_eps)
        self.temporal_encoder: Optional[TemporalEncoder] = None
        if factorised:
            # The spatial encoder keeps its own final norm (ViViT), named as the image ViT's; the
            # temporal encoder's is the final norm on all tokens.
            self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if final_norm else nn.Identity()
            self.temporal_encoder = TemporalEncoder(
                self.temporal_size, embed_dim, temporal_depth, num_heads, class_token=bool(class_token),
                final_norm=isinstance(norm, nn.LayerNorm), drop_path_rates=dpr[depth:], **block_kwargs,
            )
        else:
            self.norm = norm
        self.fc_norm = fc
        encoder = self.temporal_encoder
        self.init_embeddings([self.pos_embed, self.time_embed], [self.cls_token])
        if encoder is not None:
            self.init_embeddings([encoder.pos_embed], [encoder.cls_token])
        self.init_linears([self.blocks] + ([encoder.blocks] if encoder is not None else []), skip="temporal_fc")

    # ---------------------------------------------------------------------------- optimizer

    def get_layer_id(self, param_name: str) -> int:
        """:meth:`ViTBackbone.get_layer_id`; the temporal encoder's embeddings and block j follow
        the spatial blocks: depth + 1 and depth + j + 1."""
        parts = param_name.split(".")
        if parts[0] == "temporal_encoder":
            if parts[1] == "blocks":
                return self.spatial_depth + int(parts[2]) + 1
            if parts[1] in ("cls_token", "pos_embed"):
                return self.spatial_depth + 1
        return super().get_layer_id(param_name)

    def no_weight_decay(self) -> set:
        """Position embeddings and class tokens (the temporal encoder's too)."""
        names = super().no_weight_decay()
        encoder = self.temporal_encoder
        if encoder is not None:
            names.update(f"temporal_encoder.{n}" for n in ("pos_embed", "cls_token") if getattr(encoder, n) is not None)
        return names

    # ---------------------------------------------------------------------------- position embeddings

    def _spatial_pos(self, grid: Tuple[int, int]) -> torch.Tensor:
        if grid == self.grid_size:
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, grid, self.grid_size, self.num_prefix_tokens,
                                      mode=self.interpolate_mode)

    def _joint_pos(self, t: int, grid: Tuple[int, int]) -> torch.Tensor:
        if (t, *grid) == (self.temporal_size, *self.grid_size):
            return self.pos_embed
        return _resample_joint(self.pos_embed, (self.temporal_size, *self.grid_size), (t, *grid), self.num_prefix_tokens)

    def _positions(self, t: int, grid: Tuple[int, int]) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """(class-token position (1, 1, C) or None, patch positions broadcastable to (B, t, h*w, C))."""
        P = self.num_prefix_tokens
        hw = grid[0] * grid[1]
        if self.pos_embed_type == "sincos":
            table = self.sincos_table
            if table.shape[1] != t * hw:
                table = sincos_position_table(t * hw, self.embed_dim, device=table.device)
            return None, table.view(1, t, hw, -1)
        if self.pos_embed_type == "joint":
            table = self._joint_pos(t, grid)
            return (table[:, :1] if P else None), table[:, P:].view(1, t, hw, -1)
        spatial = self._spatial_pos(grid)
        patches = spatial[:, P:].unsqueeze(1)  # (1, 1, hw, C)
        if self.time_embed is not None:
            time = self.time_embed if t == self.temporal_size else _resample_time(self.time_embed, t)
            patches = patches + time.unsqueeze(2)  # (1, t, hw, C)
        return (spatial[:, :1] if P else None), patches

    # ---------------------------------------------------------------------------- loading

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # An image ViT (or another video layout) loads by adapting its tensors first; every change
        # is logged. The usual copy then follows (and fails, naming the key, on what is left).
        _adapt_checkpoint(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---------------------------------------------------------------------------- forward

    def _embed(self, x: torch.Tensor) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """Clip -> (class token (B, 1, C) or None, patch tokens (B, T', h*w, C)), positions added."""
        if x.dim() != 5:
            raise ValueError(
                f"VideoVisionTransformer takes clips (B, C, T, H, W), got shape {tuple(x.shape)}"
            )
        B, _, T, H, W = x.shape
        self.check_input((T, H, W), (self.tubelet_size, self.patch_size, self.patch_size))
        x = self.stem(x)  # (B, C, t, h, w)
        t, grid = x.shape[2], (x.shape[3], x.shape[4])
        patches = x.flatten(3).permute(0, 2, 3, 1)  # (B, t, h*w, C)
        cls_pos, patch_pos = self._positions(t, grid)
        patches = patches + patch_pos
        cls = None
        if self.cls_token is not None:
            cls = self.cls_token if cls_pos is None else self.cls_token + cls_pos
            cls = cls.expand(B, -1, -1)
        return cls, patches

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All output tokens (B, P + L, C) before pooling, after the final ``norm`` (not
        ``fc_norm``): the T'*h*w patch tokens (joint, divided), or the T' frame tokens of the
        temporal encoder (factorised encoder); P class tokens first."""
        cls, patches = self._embed(x)
        B, t, hw, C = patches.shape
        if self.attention_type == "factorised_encoder":
            return self._factorised(cls, patches)
        tokens = patches.reshape(B, t * hw, C)
        x = self.pos_drop(torch.cat([cls, tokens], dim=1) if cls is not None else tokens)
        for block in self.blocks:
            if self.attention_type == "divided":
                x = self.run_block(block, x, t, self.num_prefix_tokens)
            else:
                x = self.run_block(block, x)
        return self.norm(x)

    def _factorised(self, cls: Optional[torch.Tensor], patches: torch.Tensor) -> torch.Tensor:
        B, t, hw, C = patches.shape
        x = patches.reshape(B * t, hw, C)
        if cls is not None:
            x = torch.cat([cls.repeat_interleave(t, dim=0), x], dim=1)
        x = self.pos_drop(x)
        for block in self.blocks:
            x = self.run_block(block, x)
        x = self.norm(x)
        frames = x[:, 0] if cls is not None else x.mean(dim=1)  # a token per frame group
        encoder = self.temporal_encoder
        x = self.pos_drop(encoder.embed(frames.reshape(B, t, C)))
        for block in encoder.blocks:
            x = self.run_block(block, x)
        return encoder.norm(x)

    def pool_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens from :meth:`forward_features` -> pooled (B, C), then ``fc_norm``."""
        x = x[:, 0] if self.pool == "token" else x[:, self.num_prefix_tokens :].mean(dim=1)
        return self.fc_norm(x)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor]:
        """Clips (B, in_channels, T, H, W) -> ``(pooled,)``, pooled (B, C)."""
        return (self.pool_tokens(self.forward_features(x)),)


def _resample_joint(table: torch.Tensor, old: Tuple[int, int, int], new: Tuple[int, int, int],
                    num_prefix_tokens: int) -> torch.Tensor:
    """A joint table (1, P + t*h*w, C) on grid ``old`` -> on grid ``new`` (trilinear)."""
    prefix, grid = table[:, :num_prefix_tokens], table[:, num_prefix_tokens:]
    C, dtype = grid.shape[-1], grid.dtype
    grid = grid.reshape(1, *old, C).permute(0, 4, 1, 2, 3).float()
    grid = F.interpolate(grid, size=new, mode="trilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 4, 1).reshape(1, -1, C).to(dtype)
    return torch.cat([prefix, grid], dim=1)


# -------------------------------------------------------------------------------------------------
# Loading image (and other video) checkpoints


def _log(message: str) -> None:
    print_log(message, logger="current")


def _adapt_checkpoint(model: VideoVisionTransformer, sd: Dict[str, torch.Tensor], prefix: str) -> None:
    """Bring a checkpoint's backbone tensors to ``model``'s layout, in place:

    - a 2D patch kernel (C, in, p, p) is inflated to the tubelet (``model.inflate``), and so is
      every 2D kernel of an image ConvStem loading into a ConvStem3D;
    - a class token the model does not have is dropped, with its position;
    - spatial position embeddings (an image ViT's) are resampled to the model's grid; the temporal
      ones the checkpoint lacks start at zero (so a static clip sees the image model's positions);
      a joint table gets the spatial table on every frame (plus the checkpoint's ``time_embed``
      if it has one); a sin-cos model drops learned tables;
    - TimeSformer blocks the checkpoint has only the image half of get their temporal attention and
      norm copied from the spatial ones and ``temporal_fc`` zero, so the network computes the image
      model's function on a static clip.
    """
    own_cls = model.cls_token is not None
    is_backbone = any(k.startswith(prefix + n) for k in sd for n in ("stem.", "pos_embed", "blocks."))
    if not is_backbone:
        return
    for name, param in model.stem.named_parameters():
        key = prefix + "stem." + name
        kernel = sd.get(key)
        if isinstance(kernel, torch.Tensor) and kernel.ndim == 4 and param.ndim == 5:
            frames = param.shape[2]
            sd[key] = inflate_patch_kernel(kernel, frames, model.inflate)
            _log(f"Inflated the 2D kernel {key} {tuple(kernel.shape)} to {frames} frames ({model.inflate})")

    if not own_cls and prefix + "cls_token" in sd:
        sd.pop(prefix + "cls_token")
        _log(f"Dropped {prefix}cls_token: this model has no class token")

    _adapt_positions(model, sd, prefix)

    if model.attention_type == "divided":
        copied = 0
        for i in range(model.spatial_depth):
            block = f"{prefix}blocks.{i}."
            if block + "attn.qkv.weight" not in sd or block + "temporal_attn.qkv.weight" in sd:
                continue
            for name in _ATTN_PARAMS:
                if block + "attn." + name in sd:
                    sd[block + "temporal_attn." + name] = sd[block + "attn." + name].clone()
            for name in _NORM_PARAMS:
                if block + "norm1." + name in sd:
                    sd[block + "temporal_norm." + name] = sd[block + "norm1." + name].clone()
            fc = model.blocks[i].temporal_fc
            sd[block + "temporal_fc.weight"] = torch.zeros_like(fc.weight, device="cpu")
            sd[block + "temporal_fc.bias"] = torch.zeros_like(fc.bias, device="cpu")
            copied += 1
        if copied:
            _log(f"Initialised the temporal attention of {copied} blocks from their spatial attention, with "
                 "temporal_fc at zero: the network starts as the image model (TimeSformer)")


def _split_cls(table: torch.Tensor, key: str) -> Tuple[Optional[torch.Tensor], torch.Tensor, int]:
    """A checkpoint's (1, L, C) spatial table -> (class position or None, grid part, side)."""
    L = table.shape[1]
    for num_prefix in (1, 0):
        side = math.isqrt(max(L - num_prefix, 0))
        if side > 0 and side * side == L - num_prefix:
            cls = table[:, :1] if num_prefix else None
            return cls, table[:, num_prefix:], side
    raise CheckpointError(
        f"{key}: position embeddings of shape {tuple(table.shape)} are neither this model's nor an image ViT's "
        "(class token + a square grid); convert the checkpoint (tools/convert_checkpoint.py) or build the model "
        "at the checkpoint's img_size and num_frames"
    )


def _adapt_positions(model: VideoVisionTransformer, sd: Dict[str, torch.Tensor], prefix: str) -> None:
    key, time_key = prefix + "pos_embed", prefix + "time_embed"
    table, time = sd.get(key), sd.get(time_key)
    if model.pos_embed_type == "sincos":
        dropped = [k for k in (key, time_key) if k in sd]
        for k in dropped:
            sd.pop(k)
        if dropped:
            _log(f"Dropped {dropped}: this model uses VideoMAE's fixed sin-cos positions")
        return
    P = model.num_prefix_tokens
    own = model.pos_embed
    if isinstance(table, torch.Tensor) and table.ndim == 3 and tuple(table.shape) != tuple(own.shape):
        cls, grid, side = _split_cls(table, key)
        cls = (cls if cls is not None else grid.new_zeros(1, 1, grid.shape[-1])) if P else None
        spatial = torch.cat([cls, grid], dim=1) if P else grid
        spatial = resample_abs_pos_embed(spatial, model.grid_size, (side, side), P, mode=model.interpolate_mode)
        if model.pos_embed_type == "learned":
            sd[key] = spatial
            _log(f"Took {key} {tuple(table.shape)} as the spatial position embeddings on a "
                 f"{model.grid_size[0]}x{model.grid_size[1]} grid")
        else:
            # A joint table: the spatial positions on every frame, plus the temporal ones if any.
            t = model.temporal_size
            frames = spatial[:, P:].unsqueeze(1).repeat(1, t, 1, 1)
            if isinstance(time, torch.Tensor) and time.ndim == 3:
                frames = frames + (time if time.shape[1] == t else _resample_time(time, t)).unsqueeze(2)
                sd.pop(time_key)
            sd[key] = torch.cat([spatial[:, :P], frames.flatten(1, 2)], dim=1)
            _log(f"Built the joint position table {key} from the spatial table {tuple(table.shape)} on each of {t} "
                 "frame groups")
    if model.time_embed is not None:
        if isinstance(time, torch.Tensor):
            if time.ndim == 3 and time.shape[1] != model.temporal_size:
                sd[time_key] = _resample_time(time, model.temporal_size)
                _log(f"Resampled {time_key} from {time.shape[1]} to {model.temporal_size} frame groups")
        elif table is not None:
            # An image checkpoint: no temporal positions yet, so a static clip looks like the image.
            sd[time_key] = torch.zeros(1, model.temporal_size, model.embed_dim)
            _log(f"{time_key}: not in the checkpoint, set to zero")
