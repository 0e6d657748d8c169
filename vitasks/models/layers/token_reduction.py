"""Fewer tokens on the shared ViT: ``model.backbone.token_reduction``.

A ViT's cost grows with its token count. Three ways to spend fewer tokens, each one option of the
same :class:`~vitasks.models.backbones.VisionTransformer` (chosen by ``type`` from MODELS):

- :class:`ToMe` (token merging, Bolya et al. 2023): in every block, after the attention, bipartite
  soft matching merges the ``r`` most similar pairs of patch tokens (similarity: cosine of the
  attention keys averaged over heads) into their size-weighted average; proportional attention
  adds log(size) to the attention logits so a merged token weighs as the patches it stands for.
  No parameters: it works off the shelf on converted timm / MAE / DeiT weights and gives what
  facebookresearch/ToMe's timm patch gives (same sets, merges, token order, pooling). ``unmerge``
  gives every original patch its merged token's value, so dense heads get the full grid.
- :class:`TokenLearner` (Ryoo et al. 2021, Scenic's v1.1 module): at block ``at_block`` spatial
  attention maps (LayerNorm, a GELU MLP, softmax over the positions) pool the grid into
  ``num_tokens`` tokens and the remaining blocks run on them; with ``fuser`` each block from
  ``at_block`` on learns its tokens from the grid, runs on them, and TokenFuser maps them back
  onto the grid (plus the grid as residual), as Scenic's ``EncoderModFuser``, so dense outputs
  keep their shapes.
- :class:`VisualTokens` (Wu et al. 2020, "Visual Transformers"): at block ``at_block`` a
  filter-based tokenizer T = softmax_HW(X W_A)^T X replaces the grid X by L visual tokens; groups
  of blocks may start with a recurrent tokenizer (W_R = T_in W_(T->R)); the projector
  X_out = X_in + softmax_L((X_in W_Q)(T W_K)^T) T puts the tokens back onto the map for dense
  heads. Classification pools the tokens.

Class and register tokens are never reduced: they stay in front of the (reduced) patch tokens,
so ``pool: token`` reads the class token as before.

The backbone calls a reduction through :meth:`TokenReduction.run` (the blocks, dense maps on
the patch grid for ``out_indices``, the pooling state) and :meth:`TokenReduction.run_with_attention`
(attention maps: per-block probabilities over the tokens of the moment, and the matrices that
carry the token set from one block to the next, so a rollout can follow tokens through merges).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from vitasks.checks import BlockIndex, NonNegativeInt, PositiveInt, block_indices, building, checked, component_class, non_negative_int, options
from vitasks.errors import ConfigError
from vitasks.registry import MODELS

WHERE = "model.backbone.token_reduction"
#: The reduction types a config can name (``type``).
REDUCTION_TYPES = ("ToMe", "TokenLearner", "VisualTokens")

# A block call as the backbone makes it (gradient checkpointing included): (block, x, grid) -> x.
# ``block`` may be any function of (x, grid) (ToMe's block with its merge), so every reduction keeps
# ``with_cp``.
BlockCall = Callable[[nn.Module, Tensor, Tuple[int, int]], Tensor]


def _with_prefix(x: Tensor, num_prefix: int, tokens: Tensor) -> Tensor:
    """Class and register tokens of ``x`` in front of ``tokens``."""
    return torch.cat([x[:, :num_prefix], tokens], dim=1) if num_prefix else tokens


def _prefix_transition(weights: Tensor, num_prefix: int) -> Tensor:
    """(B, M, N) token weights -> (B, P + M, P + N): the prefix tokens map to themselves."""
    if not num_prefix:
        return weights
    B, M, N = weights.shape
    out = weights.new_zeros(B, num_prefix + M, num_prefix + N)
    out[:, :num_prefix, :num_prefix] = torch.eye(num_prefix, dtype=weights.dtype, device=weights.device)
    out[:, num_prefix:, num_prefix:] = weights
    return out


class TokenReduction(nn.Module):
    """What the backbone needs from a token reduction. Subclasses set ``first_reduced_block``:
    the first block whose attention sees a reduced token set (``depth``: none, switched off).

    Args:
        embed_dim: token width C (given by the backbone).
        depth: number of blocks (given by the backbone).
    """

    config_key = WHERE

    def __init__(self, embed_dim: int, depth: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.depth = depth
        self.first_reduced_block = depth

    @property
    def enabled(self) -> bool:
        return self.first_reduced_block < self.depth

    def validate(self, window_sizes: Sequence[int], use_rel_pos: bool, out_indices: Optional[Sequence[int]]) -> None:
        """ConfigError where the backbone's layout does not allow this reduction: window attention
        and the relative position bias work on the full patch grid, so every block from
        ``first_reduced_block`` on must have global attention without it."""
        start = self.first_reduced_block
        windowed = [i for i in range(start, self.depth) if window_sizes[i]]
        problem = (
            f"blocks {windowed} use window attention, which needs the full patch grid (ViTDet); reduce only after "
            "the last window block (a later at_block, or for ToMe an `r` list that is 0 up to there) or set "
            "window_size: 0" if windowed else
            "use_rel_pos adds a relative position bias over the patch grid in every block; set use_rel_pos: false"
            if use_rel_pos and start < self.depth else None
        )
        if problem:
            raise ConfigError(f"{WHERE}: {type(self).__name__} reduces the tokens from block {start} on, but {problem}")

    # The interface the backbone calls -------------------------------------------------------

    def run(
        self, blocks: Sequence[nn.Module], x: Tensor, grid: Tuple[int, int], num_prefix: int,
        dense_at: frozenset, call_block: BlockCall,
    ) -> Tuple[Tensor, Dict[int, Tensor], object]:
        """Run ``blocks`` on the embedded tokens ``x`` (B, P + h*w, C). Returns the final tokens
        (prefix first), the patch-grid tokens (B, h*w, C) after each block in ``dense_at``, and
        the state :meth:`pool_mean` needs."""
        raise NotImplementedError

    def pool_mean(self, x: Tensor, state: object, num_prefix: int) -> Tensor:
        """Mean pooling of the (reduced) patch tokens."""
        return x[:, num_prefix:].mean(dim=1)

    def run_with_attention(
        self, blocks: Sequence[nn.Module], x: Tensor, grid: Tuple[int, int], num_prefix: int
    ) -> Tuple[Tensor, List[Tensor], List[Optional[Tensor]]]:
        """Tokens, each block's attention probabilities (B, heads, N_i, N_i) and ``len(blocks) + 1``
        transitions: ``transitions[i]`` (B, N_i, N') carries the tokens before block i's attention
        from those after the previous one (None: unchanged); the last one follows the last
        attention. Rows are weights over the earlier tokens (rows sum to 1)."""
        raise NotImplementedError

    def layer_id(self, param_name: str) -> int:
        """Layer id (layer-wise lr decay) of a parameter of this module, named relative to it:
        the block it serves + 1."""
        return self.first_reduced_block + 1

    def no_attention_maps(self) -> Optional[str]:
        """Why :meth:`run_with_attention` cannot draw this reduction's maps (a step that is not an
        attention over tokens, and what to change), or None."""
        return None

    def check_attention_maps(self) -> None:
        """A ConfigError saying :meth:`no_attention_maps`, if anything."""
        reason = self.no_attention_maps()
        if reason:
            raise ConfigError(f"{WHERE}: attention maps cannot follow {reason}")


# ------------------------------------------------------------------------------------------- ToMe


@dataclass
class Matching:
    """ToMe's bipartite soft matching of one block, over the whole token sequence (N tokens,
    prefix included) as facebookresearch/ToMe's ``bipartite_soft_matching``: tokens at even
    positions form set A (the class token, position 0, among them), odd positions set B.
    ``src`` (B, r) are the A tokens (as indices into A: token ``2 * src``) merged into the B
    tokens ``dst`` (B, r) (token ``2 * dst + 1``); ``base`` (B, N - r) is, for each token after
    the merge, the position (before it) of the token it starts from: the prefix tokens in their
    order, the unmerged A tokens, then every B token in its order (a B token absorbs the A
    tokens merged into it)."""

    src: Tensor
    dst: Tensor
    base: Tensor
    num_tokens: int
    num_prefix: int = 0

    def dst_index(self) -> Tensor:
        """(B, r): the positions after the merge of the B tokens ``dst`` (the unprotected B
        tokens close the sequence, in their order)."""
        first_b = self.base.shape[1] - (self.num_tokens // 2 - self.num_prefix // 2)
        return first_b + self.dst - self.num_prefix // 2

    def new_index(self) -> Tensor:
        """(B, num_tokens): where each token ends up after the merge."""
        B, n_new = self.base.shape
        index = self.base.new_empty(B, self.num_tokens)
        index.scatter_(1, self.base, torch.arange(n_new, device=self.base.device).expand(B, -1))
        return index.scatter_(1, 2 * self.src, self.dst_index())


def bipartite_soft_matching(metric: Tensor, r: int, num_prefix: int = 0) -> Optional[Matching]:
    """ToMe's matching (Bolya et al. 2023; facebookresearch/ToMe ``tome/merge.py``) of the tokens
    of ``metric`` (B, N, d), the keys averaged over heads; the first ``num_prefix`` tokens
    (class, register tokens) are protected.

    The sequence alternates between sets A (even positions) and B (odd). Each A token finds its
    most similar B token (cosine similarity); the ``r`` A tokens with the most similar matches
    (sorted by that similarity, descending) merge into them. Protected A tokens never match
    (their rows are -inf, ToMe's class token) and protected B tokens are never matched (their
    columns -inf, ToMe's distillation token). ``r`` is capped at ``(N - num_prefix) // 2``.
    The merged sequence is [prefix tokens, unmerged A tokens, B tokens]: with a prefix the
    unmerged A tokens are in their order in the sequence, without one (a mean-pooled model
    without class token) in the order of the similarity sort, most similar first, as ToMe keeps
    them. (The sort is stable here: ties go to the earlier token on every device.) Returns None
    when nothing is merged. No gradient flows through the choice.
    """
    N = metric.shape[1]
    r = min(r, (N - num_prefix) // 2)
    if r <= 0:
        return None
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        scores = metric[:, 0::2] @ metric[:, 1::2].transpose(-1, -2)  # (B, |A|, |B|)
        protected_a, protected_b = (num_prefix + 1) // 2, num_prefix // 2
        if protected_a:
            scores[:, :protected_a, :] = -math.inf
        if protected_b:
            scores[:, :, :protected_b] = -math.inf
        best, best_b = scores.max(dim=-1)
        order = best.sort(dim=-1, descending=True, stable=True).indices
        src = order[:, :r]
        unmerged = order[:, r:]
        if num_prefix:
            unmerged = unmerged.sort(dim=-1).values  # the protected A tokens come first
        dst = best_b.gather(1, src)
        B, num_b = scores.shape[0], scores.shape[2]
        device = metric.device
        base = torch.cat([
            torch.arange(num_prefix, device=device).expand(B, -1),
            2 * unmerged[:, protected_a:],
            torch.arange(2 * protected_b + 1, 2 * num_b, 2, device=device).expand(B, -1),
        ], dim=1)
    return Matching(src=src, dst=dst, base=base, num_tokens=N, num_prefix=num_prefix)


def merge_tokens(x: Tensor, sizes: Tensor, matching: Matching) -> Tuple[Tensor, Tensor]:
    """Merge the tokens of ``x`` (B, N, C) with token sizes ``sizes`` (B, N, 1) as ``matching``
    says: each merged token is the size-weighted average of its members and its size their sum
    (ToMe's ``merge_wavg``). Returns (tokens, sizes) in the matching's order.

    One gather copies every surviving token to its new place; only the ``r`` merged rows are
    then corrected. (A sum-then-divide merge, weighting and re-normalising every token, makes
    several full passes over the tokens per block; on a CPU each pass is a parallel region whose
    cost, on a busy machine, is far above its arithmetic. Unmerged tokens keep their values
    exactly here.)
    """
    C = x.shape[-1]
    base = matching.base
    src = 2 * matching.src  # (B, r): the merged A tokens' positions in x
    dst_old = 2 * matching.dst + 1  # (B, r): their B tokens' positions in x
    dst = matching.dst_index()  # ... and after the merge
    src_sizes = sizes.gather(1, src[..., None])
    merged_sizes = sizes.gather(1, base[..., None]).scatter_add(1, dst[..., None], src_sizes)
    merged = x.gather(1, base[..., None].expand(-1, -1, C))
    # (s_b x_b + sum_a s_a x_a) / S  =  x_b + sum_a (s_a / S) (x_a - x_b),  S = s_b + sum_a s_a:
    # each A token adds its share of itself, and takes the same share of its B token's value
    # (read from x, so the in-place add below changes nothing autograd has saved).
    share = src_sizes / merged_sizes.gather(1, dst[..., None])  # (B, r, 1)
    pairs = torch.cat([src, dst_old], dim=1)  # the A tokens, then their B tokens
    terms = x.gather(1, pairs[..., None].expand(-1, -1, C)) * torch.cat([share, -share], dim=1)
    into = torch.cat([dst, dst], dim=1)[..., None].expand(-1, -1, C)
    return merged.scatter_add_(1, into, terms), merged_sizes


class MergeState:
    """The token set of one ToMe forward pass: token sizes (B, N, 1) (None while every token is
    one patch) and ``origin`` (B, num_patches), for each original patch the position of the
    (merged) token that holds it now: the source map that :meth:`unmerge` and the rollout use."""

    def __init__(self, x: Tensor, num_prefix: int, proportional_attention: bool) -> None:
        B, N, _ = x.shape
        self.num_prefix = num_prefix
        self.proportional_attention = proportional_attention
        self.sizes: Optional[Tensor] = None
        self.origin = torch.arange(num_prefix, N, device=x.device).expand(B, -1)

    def attn_bias(self, sizes: Optional[Tensor] = None) -> Optional[Tensor]:
        """log(size) (B, 1, 1, N) for proportional attention; None before the first merge (all
        sizes 1, so the attention is the plain model's, bit for bit)."""
        sizes = self.sizes if sizes is None else sizes
        if sizes is None or not self.proportional_attention:
            return None
        return sizes.log()[:, None, None, :, 0]

    def merge(self, x: Tensor, matching: Optional[Matching]) -> Tensor:
        if matching is None:
            return x
        sizes = self.sizes if self.sizes is not None else x.new_ones(x.shape[0], x.shape[1], 1)
        x, sizes = merge_tokens(x, sizes, matching)
        self.update(sizes, matching.new_index())
        return x

    def update(self, sizes: Tensor, new_index: Tensor) -> None:
        """Record a merge: the new sizes and where each token went."""
        self.sizes = sizes
        self.origin = new_index.gather(1, self.origin)

    def transition(self, matching: Matching, old_sizes: Tensor) -> Tensor:
        """(B, N_new, N_old) for a rollout: a merged token's row weighs its members by size."""
        index = matching.new_index()  # (B, n_old)
        B, n_old = index.shape
        weights = old_sizes.new_zeros(B, self.sizes.shape[1], n_old)
        weights.scatter_(1, index[:, None, :], old_sizes[:, None, :, 0])
        return weights / self.sizes

    def unmerge(self, x: Tensor) -> Tensor:
        """Patch tokens (B, num_patches, C) on the original grid: each patch takes the value of
        the merged token that holds it (identity before any merge)."""
        if self.sizes is None:
            return x[:, self.num_prefix :]
        return x.gather(1, self.origin[..., None].expand(-1, -1, x.shape[-1]))


def _tome_block(block: nn.Module, r: int, num_prefix: int, sizes: Optional[Tensor], prop_attn: bool) -> Callable:
    """Block ``block`` with ToMe's merge as a pure function ``(x, grid) -> (x, sizes, new_index)``
    (``sizes``/``new_index`` None when nothing merged), so the backbone can run it under gradient
    checkpointing: a recompute in the backward pass starts again from the same ``sizes``."""

    def step(x: Tensor, grid) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        merged = {}

        def merge(tokens: Tensor, keys: Tensor) -> Tensor:
            matching = bipartite_soft_matching(keys, r, num_prefix)
            if matching is None:
                return tokens
            current = sizes if sizes is not None else tokens.new_ones(*tokens.shape[:2], 1)
            tokens, merged["sizes"] = merge_tokens(tokens, current, matching)
            merged["index"] = matching.new_index()
            return tokens

        bias = sizes.log()[:, None, None, :, 0] if prop_attn and sizes is not None else None
        x = block.forward_merging(x, merge, bias)
        return x, merged.get("sizes"), merged.get("index")

    return step


@MODELS.register_module()
class ToMe(TokenReduction):
    """Token merging (Bolya et al. 2023, "Token Merging: Your ViT But Faster"), as
    facebookresearch/ToMe's timm patch.

    In every block, between the attention and the MLP, ``r`` tokens are merged by bipartite
    soft matching (:func:`bipartite_soft_matching`: the keys averaged over heads as similarity,
    sets A and B alternating over the whole sequence); class and register tokens are never
    merged. Merged tokens are size-weighted averages and carry their size; with
    ``proportional_attention`` log(size) is added to the attention logits (SDPA's float mask).
    Mean pooling is the plain mean of the merged patch tokens (as timm's pooling in the
    patched model; ``size_weighted_mean`` for the mean over the original patches). Dense outputs are unmerged onto the full grid. No parameters: converted
    timm / MAE / DeiT weights run as they are (ToMe's "off the shelf" use) and give the official
    patch's outputs. Every block goes through the backbone's block call, so ``with_cp`` holds.

    Args:
        embed_dim, depth: given by the backbone.
        r: tokens merged per block: an int for every block, or a list with one entry per block
            (0: no merging there; a backbone with window blocks can merge after the last one).
            0 everywhere is the plain model, bit for bit.
        proportional_attention: add log(token size) to the attention logits.
        size_weighted_mean: ``pool: mean`` weighs each merged token by its size, i.e. averages
            over the original patches (not the official patch's plain mean of the merged tokens,
            which leans towards the unmerged ones). Off by default, so converted weights give
            the official results; on a small mean-pooled model that was trained without merging
            it keeps the accuracy far better (docs/tokens.md).
    """

    def __init__(
        self, embed_dim: int, depth: int, r=0, proportional_attention: bool = True, size_weighted_mean: bool = False
    ) -> None:
        super().__init__(embed_dim, depth)
        if isinstance(r, (list, tuple)):
            if len(r) != depth:
                raise ConfigError(f"{WHERE}.r: a list needs one entry per block ({depth}), got {len(r)}: {list(r)}")
            self.r = tuple(non_negative_int(v, f"{WHERE}.r") for v in r)
        else:
            self.r = (non_negative_int(r, f"{WHERE}.r"),) * depth
        self.proportional_attention = bool(proportional_attention)
        self.size_weighted_mean = bool(size_weighted_mean)
        merging = [i for i, v in enumerate(self.r) if v > 0]
        # The merge of block i follows its attention: block i + 1 is the first to see fewer tokens.
        self.first_reduced_block = merging[0] + 1 if merging else depth

    def validate(self, window_sizes, use_rel_pos, out_indices) -> None:
        first_merge = self.first_reduced_block - 1
        if self.enabled and (window_sizes[first_merge] or use_rel_pos):
            raise ConfigError(
                f"{WHERE}: ToMe merges tokens in block {first_merge}, which has "
                f"{'window attention' if window_sizes[first_merge] else 'a relative position bias'}; merging "
                "needs global attention without relative position bias from its first merging block on "
                "(set r to a list that is 0 up to the last window block, or window_size: 0, use_rel_pos: false)"
            )
        super().validate(window_sizes, use_rel_pos, out_indices)

    def extra_repr(self) -> str:
        r = self.r[0] if len(set(self.r)) == 1 else list(self.r)
        return f"r={r}, proportional_attention={self.proportional_attention}, size_weighted_mean={self.size_weighted_mean}"

    def run(self, blocks, x, grid, num_prefix, dense_at, call_block):
        state = MergeState(x, num_prefix, self.proportional_attention)
        dense: Dict[int, Tensor] = {}
        for i, block in enumerate(blocks):
            if block.window_size or block.attn.use_rel_pos or (self.r[i] == 0 and state.sizes is None):
                x = call_block(block, x, grid)  # no merge yet: the plain block, bit for bit
            else:
                step = _tome_block(block, self.r[i], num_prefix, state.sizes, self.proportional_attention)
                x, sizes, new_index = call_block(step, x, grid)
                if sizes is not None:
                    state.update(sizes, new_index)
            if i in dense_at:
                dense[i] = state.unmerge(x)
        return x, dense, state

    def pool_mean(self, x: Tensor, state: MergeState, num_prefix: int) -> Tensor:
        """The plain mean of the (merged) patch tokens, as timm's pooling in the official patch;
        with ``size_weighted_mean`` each weighed by its size (the mean over the original patches
        of their unmerged values)."""
        patch = x[:, num_prefix:]
        if not self.size_weighted_mean or state.sizes is None:
            return patch.mean(dim=1)
        sizes = state.sizes[:, num_prefix:]
        return (patch * sizes).sum(dim=1) / sizes.sum(dim=1)

    def run_with_attention(self, blocks, x, grid, num_prefix):
        state = MergeState(x, num_prefix, self.proportional_attention)
        attentions: List[Tensor] = []
        transitions: List[Optional[Tensor]] = [None] * (len(blocks) + 1)
        for i, block in enumerate(blocks):
            if block.window_size or block.attn.use_rel_pos:
                x, attn = block.forward_with_attention(x, grid)
            else:
                def merge(tokens: Tensor, keys: Tensor, r: int = self.r[i], i: int = i) -> Tensor:
                    matching = bipartite_soft_matching(keys, r, num_prefix)
                    if matching is None:
                        return tokens
                    old = state.sizes if state.sizes is not None else tokens.new_ones(*tokens.shape[:2], 1)
                    tokens = state.merge(tokens, matching)
                    transitions[i + 1] = state.transition(matching, old)
                    return tokens

                x, attn = block.forward_merging(x, merge, state.attn_bias(), return_attention=True)
            attentions.append(attn)
        return x, attentions, transitions


# ------------------------------------------------------------------------------- TokenLearner


class TokenLearnerV11(nn.Module):
    """Scenic's TokenLearner v1.1 (``TokenLearnerModuleV11``): LayerNorm, an MLP (C -> bottleneck
    -> S, GELU) gives S spatial attention maps, a softmax over the positions normalises each, and
    each token is its map's weighted sum of the (un-normalised) input tokens:
    tokens = softmax_N(MLP(LN(X)))^T X. (v1.0 used convolutions and a sigmoid with mean pooling;
    v1.1, the one here, the MLP and the softmax.) The GELU is the tanh approximation, JAX's
    ``nn.gelu`` default, as in Scenic.

    ``forward(x)`` (B, N, C) -> (tokens (B, S, C), weights (B, S, N)).
    """

    def __init__(self, dim: int, num_tokens: int, bottleneck_dim: int = 64, drop: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)  # flax's LayerNorm epsilon
        self.fc1 = nn.Linear(dim, bottleneck_dim)
        self.act = nn.GELU(approximate="tanh")
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.fc2 = nn.Linear(bottleneck_dim, num_tokens)

    def maps(self, x: Tensor) -> Tensor:
        """Attention maps (B, S, N), each summing to 1 over the positions."""
        logits = self.drop(self.fc2(self.drop(self.act(self.fc1(self.norm(x))))))
        return logits.transpose(1, 2).softmax(dim=-1)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        weights = self.maps(x)
        return weights @ x, weights


class TokenFuser(nn.Module):
    """Scenic's TokenFuser: mixes the S tokens (LayerNorm, a linear map across the tokens,
    LayerNorm) and spreads them back over the grid with per-position weights
    sigmoid(MLP(LN(original))) (B, N, S): out = weights @ mixed tokens (B, N, C). The token
    mixing starts at zero (Scenic's init), so a fresh fuser adds nothing to the residual.

    ``forward(tokens (B, S, C), original (B, N, C))`` -> (B, N, C).
    """

    def __init__(self, dim: int, num_tokens: int, bottleneck_dim: int = 64, drop: float = 0.0) -> None:
        super().__init__()
        self.mix_norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.token_mix = nn.Linear(num_tokens, num_tokens)
        self.mix_norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, bottleneck_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(bottleneck_dim, num_tokens)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, tokens: Tensor, original: Tensor) -> Tensor:
        mixed = self.token_mix(self.mix_norm1(tokens).transpose(1, 2)).transpose(1, 2)
        mixed = self.mix_norm2(mixed)
        weights = self.fc2(self.drop(self.act(self.fc1(self.norm(original))))).sigmoid()  # (B, N, S)
        return self.drop(weights @ mixed)


@MODELS.register_module()
class TokenLearner(TokenReduction):
    """TokenLearner (Ryoo et al. 2021, "TokenLearner: What Can 8 Learned Tokens Do for Images
    and Videos?"), as Scenic's ``projects/token_learner`` with the v1.1 module.

    Without ``fuser`` (Scenic's ``EncoderMod``): at block ``at_block`` a :class:`TokenLearnerV11`
    pools the patch grid into ``num_tokens`` tokens and blocks ``at_block``... run on them (class
    and register tokens kept in front). Mean pooling then averages the learned tokens (Scenic's
    ``gap``); there is no grid for dense outputs after ``at_block``.

    With ``fuser`` (Scenic's ``EncoderModFuser``): every block from ``at_block`` on learns its own
    tokens from the grid, runs on them, and a :class:`TokenFuser` maps them back:
    grid = fuser(block(tokens), grid) + grid. The grid survives every block, so dense outputs
    (``out_indices``) keep their shapes.

    Args:
        embed_dim, depth: given by the backbone.
        num_tokens: learned tokens S (8 in the paper); 0 switches TokenLearner off (the plain
            model, bit for bit).
        at_block: the first block that runs on learned tokens (0 = straight after the stem).
        fuser: TokenFuser after every block from ``at_block`` on.
        bottleneck_dim: hidden width of the learner's and the fuser's MLPs (Scenic: 64).
        drop: dropout in those MLPs.
    """

    @checked
    def __init__(
        self, embed_dim: int, depth: int, num_tokens: NonNegativeInt = 8, at_block: BlockIndex("depth") = 0,
        fuser: bool = False, bottleneck_dim: PositiveInt = 64, drop: float = 0.0,
    ) -> None:
        super().__init__(embed_dim, depth)
        self.num_tokens = num_tokens
        self.at_block = at_block
        self.use_fuser = bool(fuser)
        self.learners = nn.ModuleList()
        self.fusers = nn.ModuleList()
        if self.num_tokens:
            self.first_reduced_block = self.at_block
            count = depth - self.at_block if self.use_fuser else 1
            self.learners.extend(TokenLearnerV11(embed_dim, num_tokens, bottleneck_dim, drop) for _ in range(count))
            if self.use_fuser:
                self.fusers.extend(TokenFuser(embed_dim, num_tokens, bottleneck_dim, drop) for _ in range(count))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)  # Scenic's MlpBlock
                nn.init.zeros_(m.bias)
        for fuser in self.fusers:
            nn.init.zeros_(fuser.token_mix.weight)  # Scenic: the token mixing starts at zero

    def validate(self, window_sizes, use_rel_pos, out_indices) -> None:
        super().validate(window_sizes, use_rel_pos, out_indices)
        late = [i for i in (out_indices or ()) if self.enabled and not self.use_fuser and i >= self.at_block]
        if late:
            raise ConfigError(
                f"{WHERE}: TokenLearner without fuser has no patch grid after block {self.at_block}, but "
                f"out_indices asks for the maps of blocks {late}; set fuser: true (TokenFuser maps the tokens "
                "back onto the grid) or use out_indices before at_block"
            )

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, at_block={self.at_block}, fuser={self.use_fuser}"

    def layer_id(self, param_name: str) -> int:
        parts = param_name.split(".")
        offset = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        return self.at_block + offset + 1

    def _step(self, i: int, block: nn.Module, x: Tensor, grid, num_prefix: int, call: Callable):
        """Block i with its learner/fuser; ``call(block, x)`` runs the block. Returns the tokens
        and the transition into block i (the learner's maps) or None."""
        if not self.enabled or i < self.at_block:
            return call(block, x), None
        if self.use_fuser:
            residual = x[:, num_prefix:]
            k = i - self.at_block
            tokens, weights = self.learners[k](residual)
            y = call(block, _with_prefix(x, num_prefix, tokens))
            fused = self.fusers[k](y[:, num_prefix:], residual) + residual
            return _with_prefix(y, num_prefix, fused), weights
        weights = None
        if i == self.at_block:
            tokens, weights = self.learners[0](x[:, num_prefix:])
            x = _with_prefix(x, num_prefix, tokens)
        return call(block, x), weights

    def run(self, blocks, x, grid, num_prefix, dense_at, call_block):
        dense: Dict[int, Tensor] = {}
        for i, block in enumerate(blocks):
            x, _ = self._step(i, block, x, grid, num_prefix, lambda b, t: call_block(b, t, grid))
            if i in dense_at:
                dense[i] = x[:, num_prefix:]  # the grid (validated)
        return x, dense, None

    def no_attention_maps(self) -> Optional[str]:
        if self.enabled and self.use_fuser:
            return ("TokenFuser (its sigmoid mixing and residual are not an attention over tokens); draw them with "
                    "fuser: false, or without token_reduction")
        return None

    def run_with_attention(self, blocks, x, grid, num_prefix):
        self.check_attention_maps()
        attentions: List[Tensor] = []
        transitions: List[Optional[Tensor]] = [None] * (len(blocks) + 1)

        def call(block: nn.Module, tokens: Tensor) -> Tensor:
            out, attn = block.forward_with_attention(tokens, grid)
            attentions.append(attn)
            return out

        for i, block in enumerate(blocks):
            x, weights = self._step(i, block, x, grid, num_prefix, call)
            if weights is not None:
                transitions[i] = _prefix_transition(weights, num_prefix)
        return x, attentions, transitions


# ------------------------------------------------------------------------------ visual tokens


class FilterTokenizer(nn.Module):
    """Filter-based tokenizer (Wu et al. 2020, eq. 1): T = softmax_HW(X W_A)^T X, with W_A (C, L)
    (``weight_a``, a linear map without bias). ``forward(x (B, N, C))`` -> (T (B, L, C),
    A^T (B, L, N))."""

    def __init__(self, dim: int, num_tokens: int) -> None:
        super().__init__()
        self.weight_a = nn.Linear(dim, num_tokens, bias=False)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        weights = self.weight_a(x).softmax(dim=1).transpose(1, 2)  # softmax over the positions
        return weights @ x, weights


class RecurrentTokenizer(nn.Module):
    """Recurrent tokenizer (Wu et al. 2020, eq. 2): the filters come from the previous tokens,
    W_R = T_in W_(T->R) (L, C), and T = softmax_HW(X W_R^T)^T X. ``token_to_filter`` is W_(T->R)
    (C, C, no bias). ``forward(x (B, N, C), tokens_in (B, L, C))`` -> (T (B, L, C), A^T (B, L, N))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token_to_filter = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, tokens_in: Tensor) -> Tuple[Tensor, Tensor]:
        filters = self.token_to_filter(tokens_in)  # W_R (B, L, C)
        weights = (x @ filters.transpose(1, 2)).softmax(dim=1).transpose(1, 2)
        return weights @ x, weights


class Projector(nn.Module):
    """The projector (Wu et al. 2020, eq. 4): X_out = X_in + softmax_L((X_in W_Q)(T W_K)^T) T,
    with W_Q and W_K (C, C) linear maps without bias (``query``, ``key``).
    ``forward(x_in (B, N, C), tokens (B, L, C))`` -> (B, N, C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)

    def forward(self, x_in: Tensor, tokens: Tensor) -> Tensor:
        weights = (self.query(x_in) @ self.key(tokens).transpose(1, 2)).softmax(dim=-1)  # over the tokens
        return x_in + weights @ tokens


@MODELS.register_module()
class VisualTokens(TokenReduction):
    """Visual tokens (Wu et al. 2020, "Visual Transformers: Token-based Image Representation and
    Processing for Computer Vision"): the tokenizer / transformer / projector pipeline on the ViT.

    At block ``at_block`` (0 = straight after the stem: a conv or ResNet stem's feature map, the
    paper's VT-ResNet) a :class:`FilterTokenizer` turns the patch grid X into ``num_tokens``
    visual tokens and the blocks run on them (class and register tokens kept in front). Each
    block index in ``recurrent_at`` starts a new group: the map is first updated by the previous
    group's :class:`Projector` with its output tokens, then a :class:`RecurrentTokenizer` draws
    new tokens from it, guided by those tokens. A dense output (``out_indices``) after
    ``at_block`` is the current group's projection of its tokens onto its map, so it keeps the
    grid's shape. Classification pools the tokens (``pool: mean``; ``pool: token`` reads the
    class token as usual).

    Args:
        embed_dim, depth, out_indices: given by the backbone. The last group's projector exists
            only when ``out_indices`` asks for a map in that group (a classifier has none, so
            every parameter takes part in its loss, as DDP wants).
        num_tokens: visual tokens L (16 in the paper); 0 switches them off (the plain model,
            bit for bit).
        at_block: the first block that runs on visual tokens.
        recurrent_at: blocks after ``at_block`` that start a group with a recurrent tokenizer.
    """

    @checked
    def __init__(
        self, embed_dim: int, depth: int, num_tokens: NonNegativeInt = 16, at_block: BlockIndex("depth") = 0,
        recurrent_at: Sequence[int] = (), out_indices: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__(embed_dim, depth)
        self.num_tokens = num_tokens
        self.at_block = at_block
        if isinstance(recurrent_at, int) and not isinstance(recurrent_at, bool):
            recurrent_at = [recurrent_at]
        starts = sorted(block_indices(recurrent_at, depth, f"{WHERE}.recurrent_at"))
        if len(set(starts)) != len(starts) or any(i <= self.at_block for i in starts):
            raise ConfigError(
                f"{WHERE}.recurrent_at {list(recurrent_at)} must name distinct blocks after at_block {self.at_block}"
            )
        self.group_starts = (self.at_block, *starts)
        self.tokenizers = nn.ModuleList()
        self.projectors = nn.ModuleList()
        if self.num_tokens:
            self.first_reduced_block = self.at_block
            self.tokenizers.append(FilterTokenizer(embed_dim, num_tokens))
            self.tokenizers.extend(RecurrentTokenizer(embed_dim) for _ in starts)
            dense_in_last_group = any(i >= self.group_starts[-1] for i in (out_indices or ()))
            num_projectors = len(self.group_starts) - (0 if dense_in_last_group else 1)
            self.projectors.extend(Projector(embed_dim) for _ in range(num_projectors))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, at_block={self.at_block}, recurrent_at={list(self.group_starts[1:])}"

    def layer_id(self, param_name: str) -> int:
        parts = param_name.split(".")
        group = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        return self.group_starts[min(group, len(self.group_starts) - 1)] + 1

    def _start_group(self, i: int, x: Tensor, state: dict, num_prefix: int) -> Tuple[Tensor, Optional[Tensor]]:
        """At a group's first block: new visual tokens (and the tokenizer's A^T); else unchanged."""
        if not self.enabled or i not in self.group_starts:
            return x, None
        g = self.group_starts.index(i)
        if g == 0:
            state["map"] = x[:, num_prefix:]
            tokens, weights = self.tokenizers[0](state["map"])
        else:
            previous = x[:, num_prefix:]
            state["map"] = self.projectors[g - 1](state["map"], previous)
            tokens, weights = self.tokenizers[g](state["map"], previous)
        state["group"] = g
        return _with_prefix(x, num_prefix, tokens), weights

    def project(self, x: Tensor, state: dict, num_prefix: int) -> Tensor:
        """Patch-grid tokens (B, h*w, C): before ``at_block`` the patch tokens themselves, after
        it the current group's projection of its visual tokens onto its map."""
        if "map" not in state:
            return x[:, num_prefix:]
        return self.projectors[state["group"]](state["map"], x[:, num_prefix:])

    def run(self, blocks, x, grid, num_prefix, dense_at, call_block):
        state: dict = {}
        dense: Dict[int, Tensor] = {}
        for i, block in enumerate(blocks):
            x, _ = self._start_group(i, x, state, num_prefix)
            x = call_block(block, x, grid)
            if i in dense_at:
                dense[i] = self.project(x, state, num_prefix)
        return x, dense, state

    def no_attention_maps(self) -> Optional[str]:
        if self.enabled and len(self.group_starts) > 1:
            return ("the projector into a recurrent tokenizer (the map it updates is a residual sum, not an "
                    "attention over tokens); draw them without recurrent_at")
        return None

    def run_with_attention(self, blocks, x, grid, num_prefix):
        self.check_attention_maps()
        attentions: List[Tensor] = []
        transitions: List[Optional[Tensor]] = [None] * (len(blocks) + 1)
        state: dict = {}
        for i, block in enumerate(blocks):
            x, weights = self._start_group(i, x, state, num_prefix)
            if weights is not None:
                transitions[i] = _prefix_transition(weights, num_prefix)
            x, attn = block.forward_with_attention(x, grid)
            attentions.append(attn)
        return x, attentions, transitions


# ------------------------------------------------------------------------------------ building


def build_token_reduction(
    cfg: Optional[dict],
    *,
    embed_dim: int,
    depth: int,
    window_sizes: Sequence[int],
    use_rel_pos: bool,
    out_indices: Optional[Sequence[int]],
) -> Optional[TokenReduction]:
    """The reduction ``cfg`` names (``{type: ToMe | TokenLearner | VisualTokens, ...}``), checked
    against the backbone's layout (window attention, relative position bias, ``out_indices``);
    None for ``cfg=None``. ``embed_dim`` and ``depth`` come from the backbone."""
    if cfg is None:
        return None
    cfg = options(cfg, WHERE, what=f"a dict with a `type` ({', '.join(REDUCTION_TYPES)}), e.g. {{type: ToMe, r: 13}}",
                  required=("type",))
    kind = cfg.pop("type")
    cls = component_class(kind, MODELS, WHERE, "token reduction", choices=REDUCTION_TYPES, base=TokenReduction)
    params = inspect.signature(cls).parameters
    given = {k: v for k, v in dict(embed_dim=embed_dim, depth=depth, out_indices=out_indices).items() if k in params}
    cfg = options(cfg, WHERE, list(params), owner=cls.__name__, given=given, parent="model.backbone")
    with building("token_reduction", root="model.backbone"):
        module = cls(**cfg)
    module.validate(list(window_sizes), bool(use_rel_pos), out_indices)
    return module


def count_tokens(model: nn.Module, inputs: Tensor) -> List[int]:
    """Tokens entering each block's attention in ``model``'s ViT backbone for ``inputs`` (any
    device, meta included): how far a token reduction shrinks the set. Empty without ``blocks``.
    (Counted at each block's ``norm1``, which every block path calls.)"""
    backbone = getattr(model, "backbone", model)
    blocks = getattr(backbone, "blocks", None)
    if blocks is None:
        return []
    counts: List[int] = []
    hooks = [
        block.norm1.register_forward_pre_hook(lambda m, args: counts.append(int(args[0].shape[1])))
        for block in blocks
    ]
    try:
        with torch.no_grad():
            if backbone is model:
                model(inputs)
            else:
                model(inputs, mode="tensor")
    finally:
        for hook in hooks:
            hook.remove()
    return counts


__all__ = [
    "FilterTokenizer", "Matching", "MergeState", "Projector", "RecurrentTokenizer", "ToMe", "TokenFuser",
    "TokenLearner", "TokenLearnerV11", "TokenReduction", "VisualTokens", "bipartite_soft_matching",
    "build_token_reduction", "count_tokens", "merge_tokens",
]
