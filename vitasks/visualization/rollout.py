"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", 2020).

Rollout follows how much of each input token flows into each output token through the stack
of attention layers: per layer the heads are fused into one (N, N) row-stochastic matrix,
the residual connection is modelled by averaging it with the identity, and the per-layer
matrices are multiplied from the first block to the last. The class token's row (or, for a
model without one, the mean of the patch rows) over the patch columns is the map.

Token layout follows :class:`vitasks.models.backbones.VisionTransformer`: the
``num_prefix_tokens`` prefix tokens (class token first, then register tokens) come before
the patch tokens in raster order. Prefix tokens take part in the product (attention flows
through them) but are left out of the map.

Reduced token sets (``model.backbone.token_reduction``): the token count changes between
blocks, and ``transitions`` say how: ``transitions[i]`` (B, N_i, N') gives each token before
block i's attention as weights over the tokens after the previous block (ToMe: a merged token
weighs its members by size; TokenLearner / visual tokens: the tokenizer's maps over the
positions). The rollout multiplies them in, so it still ends on the input patches; a per-layer
map spreads each reduced token's attention over the patches it stands for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

HEAD_FUSIONS = ("mean", "max", "min")


def fuse_heads(attn: Tensor, head_fusion: str = "mean") -> Tensor:
    """Fuse the heads of attention probabilities ``(B, heads, N, N)`` into ``(B, N, N)``."""
    if attn.dim() != 4:
        raise ValueError(f"attention must be (B, heads, N, N), got shape {tuple(attn.shape)}")
    if head_fusion == "mean":
        return attn.mean(dim=1)
    if head_fusion == "max":
        return attn.amax(dim=1)
    if head_fusion == "min":
        return attn.amin(dim=1)
    raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")


def _normalize_rows(a: Tensor) -> Tensor:
    # max/min fusion breaks row-stochasticity; rows are renormalised so that each layer
    # redistributes (and neither creates nor destroys) attention mass.
    return a / a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)


def layer_matrices(
    attentions: Sequence[Tensor], head_fusion: str = "mean", add_residual: bool = True
) -> list[Tensor]:
    """The per-layer (B, N, N) matrices that rollout multiplies: fused heads, optionally
    ``0.5 * (A + I)``, rows renormalised."""
    mats = []
    for attn in attentions:
        a = fuse_heads(attn.float(), head_fusion)
        if add_residual:
            eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
            a = 0.5 * (a + eye)
        mats.append(_normalize_rows(a))
    return mats


def _check_transitions(attentions: Sequence[Tensor], transitions) -> list:
    if transitions is None:
        return [None] * (len(attentions) + 1)
    transitions = list(transitions)
    if len(transitions) != len(attentions) + 1:
        raise ValueError(
            f"transitions needs one entry per layer plus one after the last ({len(attentions) + 1}), "
            f"got {len(transitions)}"
        )
    return transitions


def rollout_matrix(
    attentions: Sequence[Tensor], head_fusion: str = "mean", add_residual: bool = True,
    transitions: Sequence[Tensor | None] | None = None,
) -> Tensor:
    """Joint attention ``A_L @ ... @ A_1`` of all layers, shape (B, N_out, N_in) (N_out = N_in
    without a token reduction; with one, the ``transitions`` are multiplied in where they stand).

    Row i is how much token i at the output attends, through every layer, to input token j.
    """
    if len(attentions) == 0:
        raise ValueError("attention rollout needs at least one layer of attention")
    transitions = _check_transitions(attentions, transitions)
    mats = layer_matrices(attentions, head_fusion, add_residual)
    joint = None
    for a, t in zip(mats, transitions):
        if t is not None:
            joint = t.float() if joint is None else torch.bmm(t.float(), joint)
        joint = a if joint is None else torch.bmm(a, joint)
    if transitions[-1] is not None:
        joint = torch.bmm(transitions[-1].float(), joint)
    return joint


def membership_matrices(
    attentions: Sequence[Tensor], transitions: Sequence[Tensor | None] | None
) -> list[Tensor | None]:
    """Per layer, the tokens before its attention as weights over the input tokens (the product
    of the transitions so far, (B, N_i, N_in)); None while the tokens are the input's."""
    transitions = _check_transitions(attentions, transitions)
    result: list[Tensor | None] = []
    product = None
    for t in transitions[:-1]:
        if t is not None:
            product = t.float() if product is None else torch.bmm(t.float(), product)
        result.append(product)
    return result


def token_map(
    matrix: Tensor, num_prefix_tokens: int, class_token: bool, grid: tuple[int, int]
) -> Tensor:
    """Read a (B, H, W) map over patch tokens out of a (B, M, N) attention-like matrix (M rows:
    the output tokens, fewer than N after a token reduction).

    With a class token (index 0) its row is used; otherwise the mean over the non-prefix rows.
    Prefix (class and register) columns are dropped.
    """
    n = matrix.shape[-1]
    num_patches = grid[0] * grid[1]
    if n != num_prefix_tokens + num_patches:
        raise ValueError(
            f"{n} tokens do not match {num_prefix_tokens} prefix tokens + a {grid[0]}x{grid[1]} "
            "patch grid"
        )
    if class_token:
        rows = matrix[:, 0, num_prefix_tokens:]
    else:
        rows = matrix[:, num_prefix_tokens:, num_prefix_tokens:].mean(dim=1)
    return rows.reshape(matrix.shape[0], grid[0], grid[1])


def attention_rollout(
    attentions: Sequence[Tensor],
    grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    class_token: bool = True,
    head_fusion: str = "mean",
    add_residual: bool = True,
    transitions: Sequence[Tensor | None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Rollout map and per-layer maps over the patch grid.

    Args:
        attentions: per block, attention probabilities (B, heads, N, N).
        grid: (H, W) of the patch-token grid (input size // stem stride).
        num_prefix_tokens: class + register tokens in front of the patches.
        class_token: whether token 0 is a class token (else patch rows are averaged).
        head_fusion: "mean", "max" or "min" over heads.
        add_residual: model the skip connection as ``0.5 * (A + I)``.
        transitions: for a reduced token set, ``len(attentions) + 1`` matrices or None (see
            the module docstring), as ``VisionTransformer.forward_with_attention_flow`` gives.

    Returns:
        ``(rollout (B, H, W), per_layer (B, L, H, W))``; per-layer maps are the fused raw
        attention of each block (no residual, no product), read the same way as the rollout.
    """
    if class_token and num_prefix_tokens < 1:
        raise ValueError("class_token=True needs num_prefix_tokens >= 1")
    joint = rollout_matrix(attentions, head_fusion, add_residual, transitions)
    rollout = token_map(joint, num_prefix_tokens, class_token, grid)
    layers = []
    for a, members in zip(attentions, membership_matrices(attentions, transitions)):
        fused = fuse_heads(a.float(), head_fusion)
        if members is not None:
            # Each reduced token's attention shared out over the input tokens it stands for.
            fused = torch.bmm(fused, members)
        layers.append(token_map(fused, num_prefix_tokens, class_token, grid))
    per_layer = torch.stack(layers, dim=1)
    return rollout, per_layer


def upsample_map(maps: Tensor, size: tuple[int, int], normalize: bool = True) -> Tensor:
    """Bilinearly upsample (B, H, W) or (B, L, H, W) maps to ``size`` (H, W), each map scaled
    to [0, 1] when ``normalize``."""
    squeeze = maps.dim() == 3
    x = maps.unsqueeze(1) if squeeze else maps
    x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
    if normalize:
        flat = x.flatten(2)
        lo = flat.amin(dim=-1, keepdim=True)
        hi = flat.amax(dim=-1, keepdim=True)
        # A constant map (e.g. identity attention) shows as uniform mid-grey, not noise.
        span = hi - lo
        flat = torch.where(span > 1e-12, (flat - lo) / span.clamp_min(1e-12), torch.full_like(flat, 0.5))
        x = flat.reshape(x.shape)
    return x.squeeze(1) if squeeze else x
