"""The Vision Transformer backbone (Dosovitskiy et al. 2021), with the common extensions:
LayerScale, register tokens, mean pooling, multi-level NCHW outputs and any input size, and
ViTDet's options (Li et al. 2022): window attention with a few global blocks and the decomposed
relative position bias."""

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from mmengine.logging import print_log
from torch import nn

from vitasks.checks import (
    BlockIndices, Flag, InRange, IntPair, NonNegativeInt, OneOf, OrNone, PositiveInt, checked,
)
from vitasks.errors import CheckpointError, ConfigError
from vitasks.registry import MODELS

from ..layers import TransformerBlock, resample_abs_pos_embed
from ..layers.rel_pos_bias import RelativePositionBias
from ..layers.token_reduction import build_token_reduction
from .base import INTERPOLATE_MODES, ViTBackbone

_POOLS = ("token", "mean", "token_mean", "none")
# The relative-position tables of each block's attention (blocks.<i>.attn.<name>): no weight decay.
REL_POS_NAMES = ("rel_pos_h", "rel_pos_w")
# BEiT's relative position bias tables (blocks.<i>.attn.rel_pos_bias.table, or the shared
# rel_pos_bias.table): no weight decay, as BEiT's relative_position_bias_table.
REL_POS_BIAS_SUFFIX = "rel_pos_bias.table"


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


@MODELS.register_module()
class VisionTransformer(ViTBackbone):
    """Vision Transformer: stem -> tokens (+ class / register tokens, + position embeddings) ->
    pre-norm transformer blocks -> final norm -> pooling or multi-level maps.

    Args:
        img_size: training image size (int or (H, W)); sets the position-embedding grid
            ``img_size / stride``. Other sizes divisible by the stride run too (the embeddings
            are resampled on the fly).
        patch_size: patch size of ``PatchEmbed``; other stems must have this total stride.
        in_channels: image channels.
        embed_dim: token width.
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, drop_path_rate, layer_scale_init_value,
        norm_eps, mlp_act: the blocks' options, keyword arguments of
            :class:`~vitasks.models.backbones.base.ViTBackbone`.
        class_token: prepend a learned class token.
        num_reg_tokens: learned register tokens placed after the class token (Darcet et al.
            2024); they get no position embedding.
        pool: ``"token"`` (class token), ``"mean"`` (mean of the patch tokens),
            ``"token_mean"`` (the class token concatenated with the mean of the patch tokens,
            register tokens excluded: (B, 2 * embed_dim), DINOv2's linear-probe features and
            transformers' ``Dinov2ForImageClassification`` input) or ``"none"`` (all tokens).
        fc_norm: norm after pooling instead of the final norm on all tokens (timm/MAE
            convention); None means True iff ``pool == "mean"``.
        final_norm: whether there is a final norm at all (``norm`` or ``fc_norm``).
        out_indices: block indices (negative counts from the end) whose outputs are returned as
            NCHW maps (B, C, H/stride, W/stride), prefix tokens removed; the last block's map
            gets the final ``norm`` when that exists (OpenMMLab convention). None: return the
            pooled features.
        stem: config of the stem (``type`` from the MODELS registry: ``PatchEmbed``,
            ``ConvStem``, ``ResNetStem``); None means ``dict(type="PatchEmbed")``.
        with_cp: gradient checkpointing of every block (saves memory, costs a recompute).
        interpolate_mode: ``F.interpolate`` mode for resampling position embeddings.
        interpolate_antialias: ``F.interpolate``'s antialias flag for that resampling
            (bilinear/bicubic; it changes upsampling too): timm's and DINOv2-with-registers'
            rule.
        interpolate_offset: 0 resamples to the target grid size; > 0 (DINOv2's 0.1) passes the
            scale factors ``(new + offset) / old`` instead, as DINO/DINOv2 do (see
            :func:`~vitasks.models.layers.pos_embed.resample_abs_pos_embed`). The three
            ``interpolate_*`` options are the source's rule a converted checkpoint records, so
            features at other input sizes equal the source's; they apply on the fly and when
            loading a checkpoint of another grid.
        frozen: no parameter of the backbone trains (``requires_grad=False``, left out of the
            optimizer) and it stays in eval mode: a linear probe on frozen features (DINOv2's
            linear evaluation).
        window_size: ViTDet's window attention: every block except ``global_indices`` attends
            within non-overlapping ``window_size`` x ``window_size`` windows of the patch grid
            (padded with zeros at the bottom/right to a multiple of the window; the padded
            tokens take part in the attention as in detectron2). 0: global attention everywhere
            (``global_indices`` is then ignored, so a windowed config can be compared with
            ``window_size=0``).
        global_indices: blocks (negative counts from the end) that keep global attention when
            ``window_size > 0``, e.g. (2, 5, 8, 11) for ViT-B.
        use_rel_pos: decomposed relative position bias in every block (MViTv2 / ViTDet); the
            tables of a window block are sized by the window, those of a global block by the
            grid of ``img_size`` (resampled linearly for other grids).
        rel_pos_zero_init: start the relative-position tables at zero (detectron2's default).
        use_rel_pos_bias: BEiT's relative position bias in every block (mmseg/BEiT's name): a
            table ``blocks.<i>.attn.rel_pos_bias.table`` of (2Wh-1)(2Ww-1)+3 rows x num_heads for
            the grid Wh x Ww of ``img_size``, class-token entries included, zero-initialised,
            added to the attention logits through SDPA's mask (other grids resample it
            bilinearly: :mod:`vitasks.models.layers.rel_pos_bias`). A checkpoint with one shared
            table (BEiT pre-training) loads into every block, as BEiT's fine-tuning does.
        use_shared_rel_pos_bias: one such table ``rel_pos_bias.table`` shared by all blocks
            (BEiT pre-training). Both need global attention, no register tokens and no token
            reduction.
        pretrain_img_size: ViTDet's absolute position embedding as detectron2 keeps it: the
            stored ``pos_embed`` is the grid of this size (224: 14 x 14 for 16-pixel patches)
            and is resampled (``interpolate_mode``, bicubic, ``align_corners=False``:
            detectron2's ``get_abs_pos``) to the input's grid in every forward. None: the table
            is the grid of ``img_size``.
        token_reduction: fewer tokens (:mod:`vitasks.models.layers.token_reduction`):
            ``{type: ToMe, r: 13, proportional_attention: true}`` (token merging, no parameters),
            ``{type: TokenLearner, num_tokens: 8, at_block: K, fuser: true}`` or
            ``{type: VisualTokens, num_tokens: 16, at_block: K, recurrent_at: [...]}``. Dense
            outputs (``out_indices``) keep their shapes (unmerged, fused or projected back onto
            the grid); ``pool: mean`` averages the reduced patch tokens (ToMe: weighted by
            size); ``pool: none`` returns the reduced tokens. Blocks that see reduced tokens need
            global attention without relative position bias (a ``ConfigError`` says where).
            None: every block sees every token.

    Window attention and the relative position bias work on the patch grid alone, as ViTDet
    (which has no class token): they need ``class_token=False`` and ``num_reg_tokens=0`` (a
    ``ConfigError`` says so otherwise). A checkpoint with a class token still loads: its
    ``cls_token`` is unused and the class token's position embedding is dropped (detectron2's
    ``pretrain_use_cls_token``).

    ``forward(x)`` returns a tuple: one map per ``out_indices`` entry (through
    :meth:`forward_intermediates`), else ``(pooled,)`` with pooled (B, C), or ``(tokens,)``
    (B, N, C) for ``pool="none"``. Token order is [class token, register tokens, patch tokens
    (row-major)]. The common parts (norms, pooling, block call, parameter groups) are
    :class:`~vitasks.models.backbones.base.ViTBackbone`'s.
    """


    # Parameters of the embedding "layer" (layer id 0 for layer-wise lr decay), and those that
    # get no weight decay whatever their shape.
    embed_names = ("stem", "pos_embed", "cls_token", "reg_token")
    no_decay_names = ("pos_embed", "cls_token", "reg_token")

    @checked
    def __init__(
        self,
        img_size: IntPair = 224,
        patch_size: PositiveInt = 16,
        in_channels: int = 3,
        embed_dim: PositiveInt = 768,
        depth: PositiveInt = 12,
        num_heads: PositiveInt = 12,
        class_token: bool = True,
        num_reg_tokens: NonNegativeInt = 0,
        pool: OneOf(*_POOLS) = "token",
        fc_norm: Optional[bool] = None,
        final_norm: bool = True,
        out_indices: OrNone(BlockIndices("depth", allow_empty=False, unique=True)) = None,
        stem: Optional[dict] = None,
        with_cp: bool = False,
        interpolate_mode: OneOf(*INTERPOLATE_MODES) = "bicubic",
        interpolate_antialias: Flag = False,
        interpolate_offset: InRange(0, 1, high_open=True) = 0.0,
        frozen: Flag = False,
        window_size: NonNegativeInt = 0,
        global_indices: BlockIndices("depth", unique=True) = (),
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        use_rel_pos_bias: bool = False,
        use_shared_rel_pos_bias: bool = False,
        pretrain_img_size: OrNone(IntPair) = None,
        token_reduction: Optional[dict] = None,
        **kwargs,
    ) -> None:
        super().__init__(embed_dim, depth, num_heads, pool, class_token, with_cp, frozen, **kwargs)
        key = self.key
        if interpolate_antialias and interpolate_mode not in ("bilinear", "bicubic"):
            raise ConfigError(f"{key('interpolate_antialias')} needs interpolate_mode bilinear or bicubic, "
                              f"got {interpolate_mode!r}")
        if pool == "token_mean" and fc_norm:
            raise ConfigError(f'{key()}: pool="token_mean" concatenates two tokens after the final norm (DINOv2); '
                              "it takes no fc_norm (set fc_norm: false)")

        self.patch_size = patch_size
        self.interpolate_mode = interpolate_mode
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = float(interpolate_offset)
        # Width of the pooled features (what a classification head reads).
        self.num_features = 2 * embed_dim if pool == "token_mean" else embed_dim
        self.num_pos_prefix_tokens = 1 if class_token else 0  # the class token has a position embedding
        self.num_reg_tokens = num_reg_tokens
        self.num_prefix_tokens = self.num_pos_prefix_tokens + num_reg_tokens
        self.window_size, self.global_indices = window_size, tuple(sorted(global_indices))
        self.use_rel_pos = bool(use_rel_pos)
        if (self.window_size or self.use_rel_pos) and self.num_prefix_tokens:
            raise ConfigError(
                f"{key()}: window_size and use_rel_pos work on the patch grid alone (as ViTDet): set "
                "class_token: false, num_reg_tokens: 0 and pool: mean or none (a checkpoint's class token "
                "is dropped on loading)"
            )
        self.use_rel_pos_bias = bool(use_rel_pos_bias)
        self.use_shared_rel_pos_bias = bool(use_shared_rel_pos_bias)
        if self.use_rel_pos_bias or self.use_shared_rel_pos_bias:
            which = key("use_rel_pos_bias" if self.use_rel_pos_bias else "use_shared_rel_pos_bias")
            problem = ("(a table per block) and use_shared_rel_pos_bias (one table) exclude each other; a shared "
                       "checkpoint table loads into every block with use_rel_pos_bias"
                       if self.use_rel_pos_bias and self.use_shared_rel_pos_bias else
                       "needs global attention (BEiT's table): set window_size: 0" if self.window_size else
                       "has entries for the class token only (BEiT's table): set num_reg_tokens: 0" if num_reg_tokens
                       else "needs every block to see the whole patch grid: remove token_reduction"
                       if token_reduction is not None else None)
            if problem:
                raise ConfigError(f"{which} {problem}")

        self.stem = self.build_stem(stem, in_channels, embed_dim, patch_size, default="PatchEmbed",
                                    choices=("PatchEmbed", "ConvStem", "ResNetStem"))
        self.stride = self.stem.stride
        self.img_size = img_size
        self.grid_size = self.grid_of(img_size, self.stride, "img_size")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, num_reg_tokens, embed_dim)) if num_reg_tokens else None
        self.pos_grid = self.grid_size if pretrain_img_size is None else self.grid_of(pretrain_img_size, self.stride,
                                                                                     "pretrain_img_size")
        num_pos = self.num_pos_prefix_tokens + self.pos_grid[0] * self.pos_grid[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, embed_dim))
        self.pos_drop = nn.Dropout(self.drop_rate) if self.drop_rate > 0 else nn.Identity()

        dpr = self.drop_path_rates(self.drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                embed_dim, num_heads, drop_path=dpr[i], **self.block_kwargs,
                window_size=0 if i in self.global_indices else self.window_size,
                use_rel_pos=self.use_rel_pos, input_size=self.grid_size, rel_pos_zero_init=rel_pos_zero_init,
                use_rel_pos_bias=self.use_rel_pos_bias,
            )
            for i in range(depth)
        )
        self.rel_pos_bias = RelativePositionBias(self.grid_size, num_heads) if self.use_shared_rel_pos_bias else None
        self.norm, self.fc_norm = self.final_norms(embed_dim, self.norm_eps, pool, fc_norm, final_norm)
        self.out_indices = out_indices
        self.init_embeddings([self.pos_embed], [self.cls_token, self.reg_token])
        self.init_linears([self.blocks])
        # After the initialisation: the reduction initialises its own layers.
        self.token_reduction = build_token_reduction(
            token_reduction, embed_dim=embed_dim, depth=depth, window_sizes=[b.window_size for b in self.blocks],
            use_rel_pos=self.use_rel_pos, out_indices=self.out_indices,
        )
        if self.frozen:
            self.requires_grad_(False)
            self.train(False)

    # ---------------------------------------------------------------------------- optimizer

    def get_layer_id(self, param_name: str) -> int:
        """:meth:`ViTBackbone.get_layer_id`; a block's relative-position tables
        (``blocks.<i>.attn.rel_pos_*``) count as the block, a token reduction's parameters as
        the block they serve."""
        first, _, rest = param_name.partition(".")
        if first == "token_reduction":
            return self.token_reduction.layer_id(rest)
        return super().get_layer_id(param_name)

    def no_weight_decay(self) -> set:
        """Position embeddings, class and register tokens, relative-position tables."""
        names = super().no_weight_decay()
        names.update(
            n for n, _ in self.blocks.named_parameters(prefix="blocks") if n.rsplit(".", 1)[-1] in REL_POS_NAMES
        )
        names.update(n for n, _ in self.named_parameters() if n.endswith(REL_POS_BIAS_SUFFIX))
        return names

    # ---------------------------------------------------------------------------- position embeddings

    def _resample_pos_embed(self, pos: torch.Tensor, new_grid, old_grid) -> torch.Tensor:
        """Position embeddings on ``old_grid`` -> ``new_grid`` by this backbone's rule
        (``interpolate_mode``, ``interpolate_antialias``, ``interpolate_offset``)."""
        return resample_abs_pos_embed(
            pos, new_grid, old_grid, self.num_pos_prefix_tokens, mode=self.interpolate_mode,
            antialias=self.interpolate_antialias, offset=self.interpolate_offset,
        )

    def _pos_embed_for(self, grid: Tuple[int, int]) -> torch.Tensor:
        if grid == self.pos_grid:
            return self.pos_embed
        return self._resample_pos_embed(self.pos_embed, grid, self.pos_grid)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint trained at another resolution: resample its position embeddings to this
        # model's grid before the usual copy (which would fail on the shape).
        key = prefix + "pos_embed"
        value = state_dict.get(key)
        if (
            isinstance(value, torch.Tensor)
            and self.cls_token is None
            and value.ndim == 3
            and _is_square(value.shape[1] - 1)
            and not _is_square(value.shape[1])
        ):
            # A class-token checkpoint loaded into a model without one (ViTDet): drop the class
            # token's embedding, as detectron2 does.
            value = state_dict[key] = value[:, 1:]
            print_log(f"Dropped the class token's position embedding from {key}", logger="current")
        if isinstance(value, torch.Tensor) and value.shape != self.pos_embed.shape:
            if value.ndim == 3 and value.shape[0] == 1 and value.shape[2] == self.embed_dim:
                num_grid = value.shape[1] - self.num_pos_prefix_tokens
                side = math.isqrt(max(num_grid, 0))
                if side * side != num_grid:
                    raise CheckpointError(
                        f"{key}: the checkpoint's position embeddings have shape {tuple(value.shape)}; this model "
                        f"expects (1, {self.num_pos_prefix_tokens} + H*W, {self.embed_dim}) "
                        f"({self.num_pos_prefix_tokens} for the class token) and can resample only a square "
                        "H x W grid; convert the checkpoint (tools/convert_checkpoint.py) or build the model "
                        "at the checkpoint's img_size"
                    )
                state_dict[key] = self._resample_pos_embed(value, self.pos_grid, (side, side))
                print_log(
                    f"Resampled {key} from a {side}x{side} to a {self.pos_grid[0]}x{self.pos_grid[1]} grid",
                    logger="current",
                )
        self._share_rel_pos_bias(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _share_rel_pos_bias(self, state_dict, prefix: str) -> None:
        """A checkpoint's shared table (BEiT pre-training, ``rel_pos_bias.table``) loaded into a
        model with a table per block: copied into every block that the checkpoint gives none
        (BEiT's fine-tuning does the same); each block resamples it to its grid."""
        key = prefix + REL_POS_BIAS_SUFFIX
        if self.use_rel_pos_bias and isinstance(state_dict.get(key), torch.Tensor):
            shared = state_dict.pop(key)
            for i in range(self.depth):
                state_dict.setdefault(f"{prefix}blocks.{i}.attn.{REL_POS_BIAS_SUFFIX}", shared.clone())
            print_log(f"Copied the shared {key} into the table of every block", logger="current")

    def _shared_bias(self, grid: Tuple[int, int], num_tokens: int) -> Optional[torch.Tensor]:
        """The shared relative position bias (1, heads, N, N) for this forward, or None."""
        if self.rel_pos_bias is None:
            return None
        return self.rel_pos_bias(grid, num_tokens - grid[0] * grid[1])

    # ---------------------------------------------------------------------------- forward

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Image -> tokens (B, N, C) with position embeddings, and the patch grid (h, w)."""
        B, _, H, W = x.shape
        self.check_input((H, W), (self.stride, self.stride))
        x = self.stem(x)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, C), a view
        pos = self._pos_embed_for(grid)
        prefix: List[torch.Tensor] = []
        if self.cls_token is not None:
            prefix.append((self.cls_token + pos[:, :1]).expand(B, -1, -1))
            pos = pos[:, 1:]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(B, -1, -1))
        x = x + pos
        # The concatenation (or contiguous()) gives the blocks one contiguous (B, N, C) tensor.
        x = torch.cat(prefix + [x], dim=1) if prefix else x.contiguous()
        return self.pos_drop(x), grid

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, Sequence[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        norm_last_block: bool = False,
        pooled: bool = False,
    ):
        """Features of intermediate blocks, with timm's name and contract.

        Args:
            x: images (B, in_channels, H, W).
            indices: an int n (the last n blocks), a list of block indices (negative counts from
                the end), or None (every block).
            norm: apply the final ``norm`` to every intermediate.
            stop_early: run no block after the last one asked for (the final features are then
                those of that block).
            output_fmt: ``"NCHW"`` maps (B, C, H/stride, W/stride) or ``"NLC"`` tokens
                (B, h*w, C); prefix tokens are dropped either way.
            intermediates_only: return only the list of intermediates.
            norm_last_block: vitasks' (OpenMMLab's) convention: the final ``norm`` on the map of
                the last block (``depth - 1``) only, as ``forward`` with ``out_indices`` does.
            pooled: the final features pooled as :meth:`forward` pools them (``pool``, then
                ``fc_norm``; a token reduction's own mean) instead of all tokens.

        Returns:
            ``(final_features, intermediates)``: the tokens after the blocks and the final
            ``norm`` (B, N, C) (or the pooled (B, C) with ``pooled``) and the list of
            intermediates in the order of ``indices``; or that list alone with
            ``intermediates_only``. With a token reduction the final tokens are the reduced ones
            and the intermediates lie on the full patch grid (unmerged, fused or projected back).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"forward_intermediates: output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        if indices is None or isinstance(indices, int):
            count = self.depth if indices is None else indices
            if not 0 < count <= self.depth:
                raise ValueError(f"forward_intermediates: indices={indices} asks for the last {count} of "
                                 f"{self.depth} blocks")
            take = list(range(self.depth - count, self.depth))
        else:
            take = [i + self.depth if i < 0 else i for i in indices]
            if any(not 0 <= i < self.depth for i in take):
                raise ValueError(f"forward_intermediates: block indices {list(indices)} out of range for depth "
                                 f"{self.depth}")
        B = x.shape[0]
        x, (h, w) = self._embed(x)
        count = max(take, default=-1) + 1 if stop_early else self.depth

        def output(i: int, y: torch.Tensor) -> torch.Tensor:
            if norm or (norm_last_block and i == self.depth - 1):
                y = self.norm(y)
            y = y[:, y.shape[1] - h * w :]  # the patch tokens
            if output_fmt == "NLC":
                return y
            return y.transpose(1, 2).reshape(B, self.embed_dim, h, w).contiguous()

        # Each output is taken as soon as its block has run (the backward then sums the gradients
        # in the order it always has: same weights after training, bit for bit).
        state, kept = None, {}
        if self.token_reduction is not None:
            x, grids, state = self.token_reduction.run(self.blocks[:count], x, (h, w), self.num_prefix_tokens,
                                                       frozenset(take), self.run_block)
            kept = {i: output(i, grids[i]) for i in take}
        else:
            bias = self._shared_bias((h, w), x.shape[1])
            for i in range(count):
                x = self.run_block(self.blocks[i], x, (h, w), bias)
                if i in take:
                    kept[i] = output(i, x)
        intermediates = [kept[i] for i in take]
        if intermediates_only:
            return intermediates
        x = self.norm(x)
        return (self.pool_tokens(x, state) if pooled else x), intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens (B, N, C) after the blocks and the final ``norm`` (not ``fc_norm``); with a
        token reduction, the reduced tokens."""
        return self.forward_intermediates(x, indices=[])[0]

    def pool_tokens(self, x: torch.Tensor, state: object = None) -> torch.Tensor:
        """Tokens from :meth:`forward_features` -> pooled (B, C) (or tokens for pool="none"),
        then ``fc_norm``; with a token reduction its mean of the reduced tokens (``state``: what
        its ``run`` returned)."""
        mean = None
        if self.token_reduction is not None and self.pool in ("mean", "token_mean"):
            mean = self.token_reduction.pool_mean(x, state, self.num_prefix_tokens)
        return super().pool_tokens(x, mean)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(B, in_channels, H, W) images, H and W divisible by ``stride`` -> tuple of features
        (see the class docstring)."""
        if self.out_indices is not None:
            return tuple(self.forward_intermediates(x, self.out_indices, stop_early=True, intermediates_only=True,
                                                    norm_last_block=True))
        return (self.forward_intermediates(x, indices=[], pooled=True)[0],)

    def forward_with_attention(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Tokens as :meth:`forward_features` and each block's attention probabilities
        (B, heads, N, N), computed explicitly (slower; for visualisation: call it in eval mode,
        under ``torch.no_grad()`` unless gradients are wanted). With a token reduction the
        token count changes from block to block (see :meth:`forward_with_attention_flow`)."""
        if self.token_reduction is not None:
            x, attentions, _ = self.forward_with_attention_flow(x)
            return x, attentions
        x, grid = self._embed(x)
        bias = self._shared_bias(grid, x.shape[1])
        attentions = []
        for block in self.blocks:
            x, attn = block.forward_with_attention(x, grid, bias)
            attentions.append(attn)
        return self.norm(x), attentions

    def forward_with_attention_flow(
        self, x: torch.Tensor
    ) -> Tuple[torch.Tensor, List[torch.Tensor], List[Optional[torch.Tensor]]]:
        """:meth:`forward_with_attention` plus, for a rollout through a token reduction,
        ``depth + 1`` transitions: ``transitions[i]`` (B, N_i, N') carries the tokens before
        block i's attention from those after the previous one (ToMe's merges, a tokenizer's
        weights), the last one follows the last block; None where the token set is unchanged
        (always, without a reduction)."""
        if self.token_reduction is None:
            x, attentions = self.forward_with_attention(x)
            return x, attentions, [None] * (len(attentions) + 1)
        x, grid = self._embed(x)
        x, attentions, transitions = self.token_reduction.run_with_attention(
            self.blocks, x, grid, self.num_prefix_tokens
        )
        return self.norm(x), attentions, transitions
