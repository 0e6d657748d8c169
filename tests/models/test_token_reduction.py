"""Token reduction on the shared ViT (ToMe, TokenLearner, visual tokens): each tokenizer and the
projector against its equation computed explicitly, switched-off reductions bit-identical to the
plain model, proportional attention against duplicated tokens, merging against a brute-force
matching, unmerge and the source map, dense-output shapes with every stem, rollout through
merges, and the layouts that are refused."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitasks.benchmarks.throughput import count_model_flops
from vitasks.errors import ConfigError
from vitasks.models.backbones import VisionTransformer
from vitasks.models.layers.attention import Attention
from vitasks.models.layers.token_reduction import (
    FilterTokenizer,
    Matching,
    MergeState,
    Projector,
    RecurrentTokenizer,
    TokenFuser,
    TokenLearnerV11,
    bipartite_soft_matching,
    count_tokens,
    merge_tokens,
)
from vitasks.visualization.rollout import attention_rollout, membership_matrices

STEMS = {
    "patch": dict(type="PatchEmbed"),
    "conv": dict(type="ConvStem", channels=[8, 16], strides=[2, 2]),
    "resnet": dict(type="ResNetStem", layers=[1, 1], widths=[16, 32], stem_channels=8, num_groups=4),
}
REDUCTIONS = {
    "tome": dict(type="ToMe", r=3),
    "tokenlearner": dict(type="TokenLearner", num_tokens=4, at_block=1, fuser=True),
    "visual_tokens": dict(type="VisualTokens", num_tokens=5, at_block=0, recurrent_at=[2]),
}


def tiny(stem="patch", **kw):
    patch = {"patch": 8, "conv": 4, "resnet": 8}[stem]
    cfg = dict(img_size=32, patch_size=patch, embed_dim=24, depth=4, num_heads=2, mlp_ratio=2.0, stem=STEMS[stem])
    cfg.update(kw)
    torch.manual_seed(0)
    return VisionTransformer(**cfg).eval()


def twin(plain, **kw):
    """A model with ``kw`` carrying ``plain``'s weights (its own extra layers stay as built)."""
    model = tiny(**kw)
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("token_reduction.") for k in missing)
    return model


# ------------------------------------------------------------------ tokenizers and projector


@torch.no_grad()
def test_tokenlearner_v11_is_its_equation():
    torch.manual_seed(1)
    learner = TokenLearnerV11(6, num_tokens=3, bottleneck_dim=5).double()
    for p in learner.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    tokens, weights = learner(x)
    for b in range(2):
        X = x[b].numpy()
        mu, var = X.mean(1, keepdims=True), X.var(1, keepdims=True)
        ln = (X - mu) / np.sqrt(var + 1e-6) * learner.norm.weight.detach().numpy() + learner.norm.bias.detach().numpy()
        h = ln @ learner.fc1.weight.detach().numpy().T + learner.fc1.bias.detach().numpy()
        h = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))  # tanh GELU
        logits = h @ learner.fc2.weight.detach().numpy().T + learner.fc2.bias.detach().numpy()  # (N, S)
        maps = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)  # softmax over positions
        np.testing.assert_allclose(weights[b].numpy(), maps.T, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(tokens[b].numpy(), maps.T @ X, rtol=1e-10, atol=1e-12)


@torch.no_grad()
def test_tokenfuser_is_its_equation():
    torch.manual_seed(2)
    fuser = TokenFuser(6, num_tokens=3, bottleneck_dim=5).double()
    for p in fuser.parameters():
        torch.nn.init.normal_(p)
    tokens, grid = torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(2, 7, 6, dtype=torch.float64)
    out = fuser(tokens, grid)
    for b in range(2):
        mixed = fuser.mix_norm1(tokens[b])  # (S, C)
        mixed = torch.stack([mixed[:, c] @ fuser.token_mix.weight.T + fuser.token_mix.bias for c in range(6)], 1)
        mixed = fuser.mix_norm2(mixed)
        h = F.gelu(fuser.fc1(fuser.norm(grid[b])), approximate="tanh")
        weights = torch.sigmoid(fuser.fc2(h))  # (N, S)
        expected = sum(weights[:, s, None] * mixed[s] for s in range(3))
        torch.testing.assert_close(out[b], expected, rtol=1e-10, atol=1e-12)


def test_fresh_tokenfuser_adds_nothing():
    """Scenic starts the token mixing at zero: a new fuser + residual is the identity on the grid."""
    model = tiny(token_reduction=REDUCTIONS["tokenlearner"])
    fuser = model.token_reduction.fusers[0]
    assert torch.equal(fuser(torch.randn(2, 4, 24), torch.randn(2, 16, 24)), torch.zeros(2, 16, 24))


@torch.no_grad()
def test_filter_tokenizer_recurrent_tokenizer_and_projector_are_their_equations():
    torch.manual_seed(3)
    C, N, L = 6, 9, 4
    filt, rec, proj = FilterTokenizer(C, L).double(), RecurrentTokenizer(C).double(), Projector(C).double()
    x, t_in = torch.randn(2, N, C, dtype=torch.float64), torch.randn(2, L, C, dtype=torch.float64)

    def softmax(a, axis):
        e = np.exp(a - a.max(axis, keepdims=True))
        return e / e.sum(axis, keepdims=True)

    W_A = filt.weight_a.weight.detach().numpy().T  # (C, L)
    W_TR = rec.token_to_filter.weight.detach().numpy().T  # (C, C)
    W_Q, W_K = proj.query.weight.detach().numpy().T, proj.key.weight.detach().numpy().T
    tokens, weights = filt(x)
    rec_tokens, _ = rec(x, t_in)
    out = proj(x, t_in)
    for b in range(2):
        X, T_in = x[b].numpy(), t_in[b].numpy()
        A = softmax(X @ W_A, 0)  # softmax over HW
        np.testing.assert_allclose(tokens[b].numpy(), A.T @ X, rtol=1e-10)
        np.testing.assert_allclose(weights[b].numpy(), A.T, rtol=1e-10)
        W_R = T_in @ W_TR  # (L, C)
        np.testing.assert_allclose(rec_tokens[b].numpy(), softmax(X @ W_R.T, 0).T @ X, rtol=1e-10)
        expected = X + softmax((X @ W_Q) @ (T_in @ W_K).T, 1) @ T_in  # softmax over L
        np.testing.assert_allclose(out[b].numpy(), expected, rtol=1e-10)


# ------------------------------------------------------------------ switched off = plain model


@pytest.mark.parametrize(
    "reduction",
    [dict(type="ToMe", r=0), dict(type="TokenLearner", num_tokens=0, at_block=1, fuser=True),
     dict(type="VisualTokens", num_tokens=0, at_block=0)],
    ids=["tome_r0", "tokenlearner_off", "visual_tokens_off"],
)
@pytest.mark.parametrize("layout", [dict(), dict(num_reg_tokens=2, pool="mean"), dict(out_indices=[1, 3])])
def test_switched_off_is_bit_identical_to_the_plain_model(reduction, layout):
    plain = tiny(**layout)
    model = twin(plain, token_reduction=reduction, **layout)
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        for a, b in zip(plain(x), model(x)):
            assert torch.equal(a, b)
        assert torch.equal(plain.forward_features(x), model.forward_features(x))
        (ta, aa), (tb, ab) = plain.forward_with_attention(x), model.forward_with_attention(x)
        assert torch.equal(ta, tb) and all(torch.equal(p, q) for p, q in zip(aa, ab))


# ------------------------------------------------------------------ ToMe


@torch.no_grad()
def test_merged_token_under_proportional_attention_equals_its_copies():
    """A token of size s with log(s) added to its logits is attended as s copies of it."""
    torch.manual_seed(4)
    attn = Attention(16, num_heads=2).double().eval()
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    s, j = 3, 2
    copies = torch.cat([x[:, :j], x[:, j : j + 1].expand(-1, s, -1), x[:, j + 1 :]], dim=1)  # 5 + s - 1 tokens
    sizes = torch.ones(1, 5, 1, dtype=torch.float64)
    sizes[0, j] = s
    merged_out, _, _ = attn.forward_with_keys(x, sizes.log()[:, None, None, :, 0])
    merged_explicit, _, probs = attn.forward_with_keys(x, sizes.log()[:, None, None, :, 0], return_attention=True)
    copies_out = attn(copies)
    keep = [0, 1, 2, 5, 6]  # the copies' rows are all the merged token's row
    torch.testing.assert_close(merged_out, copies_out[:, keep], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(merged_explicit, merged_out, rtol=1e-10, atol=1e-12)
    for k in (3, 4):
        torch.testing.assert_close(copies_out[:, k], copies_out[:, j], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 2, 5, dtype=torch.float64))


# The published algorithm (facebookresearch/ToMe: tome/merge.py's bipartite_soft_matching and
# merge_wavg, tome/patch/timm.py's block), written again with plain Python loops, one sample at a
# time: the reference for vitasks' batched ToMe.


def reference_merge(x, sizes, metric, r, num_prefix):
    """One merge of one sample: x (N, C), sizes (N,), metric (N, d). Sets alternate over the
    whole sequence (A: even positions, B: odd); protected A tokens have no match, protected B
    tokens are nobody's match; the r A tokens with the most similar best B token merge into it.
    Returns (groups, values, sizes): groups[j] lists the input positions merged into output token
    j, in output order [prefix, unmerged A (position order with a prefix, similarity order
    without), B]."""
    N = x.shape[0]
    r = min(r, (N - num_prefix) // 2)
    if r <= 0:
        return [[i] for i in range(N)], x, sizes
    unit = metric / metric.norm(dim=-1, keepdim=True)
    sims = (unit @ unit.T).tolist()
    a_pos, b_pos = list(range(0, N, 2)), list(range(1, N, 2))
    best = []  # (similarity, B position) per A token
    for a in a_pos:
        if a < num_prefix:
            best.append((-math.inf, None))
            continue
        match = None
        for b in b_pos:
            if b >= num_prefix and (match is None or sims[a][b] > match[0]):
                match = (sims[a][b], b)
        best.append(match)
    order = sorted(range(len(a_pos)), key=lambda i: -best[i][0])  # stable, most similar first
    merged, unmerged = order[:r], order[r:]
    if num_prefix:
        unmerged = sorted(unmerged)
    into = {b: [b] for b in b_pos}
    for i in merged:
        into[best[i][1]].append(a_pos[i])
    groups = [[p] for p in range(num_prefix)]
    groups += [[a_pos[i]] for i in unmerged if a_pos[i] >= num_prefix]
    groups += [into[b] for b in b_pos if b >= num_prefix]
    new_sizes = torch.stack([sum(sizes[p] for p in g) for g in groups])
    values = torch.stack([sum(sizes[p] * x[p] for p in g) / new_sizes[j] for j, g in enumerate(groups)])
    return groups, values, new_sizes


def reference_tome_blocks(blocks, x, r, num_prefix, proportional_attention=True):
    """ToMe's patched timm blocks on tokens x (B, N, C) (timm's or vitasks' blocks: the same
    submodule names), sample by sample and head by head: attention with log(size) added to the
    logits, merge between attention and MLP. Returns the final tokens per sample and, per sample,
    the original token positions each final token holds."""
    outputs, holdings = [], []
    for t in x:
        sizes = torch.ones(t.shape[0], dtype=t.dtype)
        holds = [[p] for p in range(t.shape[0])]
        for block in blocks:
            attn = block.attn
            h = block.norm1(t)
            N, C = h.shape
            q, k, v = attn.qkv(h).reshape(N, 3, attn.num_heads, C // attn.num_heads).unbind(1)
            heads = []
            for i in range(attn.num_heads):
                logits = q[:, i] @ k[:, i].T * (C // attn.num_heads) ** -0.5
                if proportional_attention:
                    logits = logits + sizes.log()[None, :]
                heads.append(logits.softmax(-1) @ v[:, i])
            t = t + block.ls1(attn.proj(torch.cat(heads, dim=-1)))
            groups, t, sizes = reference_merge(t, sizes, k.mean(dim=1), r, num_prefix)
            holds = [sum((holds[p] for p in g), []) for g in groups]
            t = t + block.ls2(block.mlp(block.norm2(t)))
        outputs.append(t)
        holdings.append(holds)
    return outputs, holdings


def _circle(degrees):
    """2-d unit metric vectors at the given angles: cosine similarity = cos(angle difference)."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=-1)[None]


def _groups_of(matching, num_tokens):
    """Output token j -> sorted input positions merged into it, from a Matching."""
    index = matching.new_index()[0].tolist()
    groups = [[] for _ in range(num_tokens - matching.src.shape[1])]
    for old, new in enumerate(index):
        groups[new].append(old)
    return groups


# Worked by hand. Cosine similarities are cos(angle difference).
HAND_CASES = {
    # class token + 6 patches: A = {0 (class), 2, 4, 6}, B = {1, 3, 5}. Best matches: 2 -> 1
    # (10 deg), 4 -> 3 (5 deg), 6 -> 5 (30 deg); the class token (5 deg from 1) is protected.
    # r = 2 merges 4 and 2; unmerged A in position order [0, 6]; then B [1+2, 3+4, 5].
    "class_token": dict(angles=[5, 0, 10, 90, 95, 180, 150], r=2, num_prefix=1,
                        groups=[[0], [6], [1, 2], [3, 4], [5]], sizes=[1, 1, 2, 2, 1]),
    # no prefix (mean pooled, no class token), 6 tokens: A = {0, 2, 4}, B = {1, 3, 5}. Best:
    # 0 -> 3 (30 deg), 2 -> 5 (10 deg), 4 -> 1 (20 deg). r = 1 merges 2 into 5; the unmerged A
    # stay in similarity order: 4 (20 deg) before 0 (30 deg).
    "no_prefix": dict(angles=[60, 0, 170, 90, 20, 180], r=1, num_prefix=0,
                      groups=[[4], [0], [1], [3], [2, 5]], sizes=[1, 1, 1, 1, 2]),
    # class + distillation token (2 protected; 1 is in B and nobody's match): 2 would match 1 at
    # 5 deg but takes 3 (85 deg); 4 -> 5 (10 deg) is merged; order [0, 1, 2, 3, 4+5].
    "two_prefix": dict(angles=[0, 0, 5, 90, 170, 180], r=1, num_prefix=2,
                       groups=[[0], [1], [2], [3], [4, 5]], sizes=[1, 1, 1, 1, 2]),
    # r above the cap (N - prefix) // 2 = 3: A = {0, 2, 4, 6}; all three patch A tokens merge.
    "capped": dict(angles=[0, 0, 10, 90, 95, 180, 150], r=9, num_prefix=1,
                   groups=[[0], [1, 2], [3, 4], [5, 6]], sizes=[1, 2, 2, 2]),
}


@pytest.mark.parametrize("case", list(HAND_CASES))
def test_tome_matching_on_hand_made_cases(case):
    """Merge groups, output order and sizes of the official algorithm, worked out by hand (and
    the loop reference agrees)."""
    c = HAND_CASES[case]
    metric = _circle(c["angles"])
    N = metric.shape[1]
    x = torch.randn(1, N, 3, dtype=torch.float64)
    matching = bipartite_soft_matching(metric, c["r"], c["num_prefix"])
    groups = _groups_of(matching, N)
    assert [sorted(g) for g in groups] == [sorted(g) for g in c["groups"]]
    merged, sizes = merge_tokens(x, torch.ones(1, N, 1, dtype=torch.float64), matching)
    assert sizes[0, :, 0].tolist() == c["sizes"]
    for j, g in enumerate(c["groups"]):
        torch.testing.assert_close(merged[0, j], x[0, g].mean(0), rtol=1e-12, atol=1e-12)
    ref_groups, ref_values, ref_sizes = reference_merge(x[0], torch.ones(N, dtype=torch.float64), metric[0], c["r"], c["num_prefix"])
    assert [sorted(g) for g in ref_groups] == [sorted(g) for g in c["groups"]]


def test_tome_matching_weighs_by_size():
    """Hand-made: merging a size-3 token into a size-1 token gives (3 a + b) / 4 and size 4."""
    metric = _circle([0, 0, 10, 90, 170])  # class, B 1, A 2 -> 1, B 3, A 4 -> 3 at 80 deg: r = 1 takes 2
    x = torch.arange(5 * 2, dtype=torch.float64).reshape(1, 5, 2)
    sizes = torch.tensor([1.0, 1.0, 3.0, 2.0, 1.0], dtype=torch.float64).reshape(1, 5, 1)
    merged, new_sizes = merge_tokens(x, sizes, bipartite_soft_matching(metric, 1, 1))
    assert new_sizes[0, :, 0].tolist() == [1.0, 1.0, 4.0, 2.0]  # [class, 4, 1+2, 3]
    torch.testing.assert_close(merged[0, 2], (3 * x[0, 2] + x[0, 1]) / 4)
    assert torch.equal(merged[0, :2], x[0, [0, 4]]) and torch.equal(merged[0, 3], x[0, 3])


@pytest.mark.parametrize("num_prefix", [0, 1, 2, 3])
def test_merge_matches_the_loop_reference_and_keeps_totals(num_prefix):
    torch.manual_seed(5)
    B, N, C, r = 2, num_prefix + 11, 5, 4
    x = torch.randn(B, N, C, dtype=torch.float64)
    sizes = torch.randint(1, 4, (B, N, 1)).double()
    metric = torch.randn(B, N, 8, dtype=torch.float64)
    matching = bipartite_soft_matching(metric, r, num_prefix)
    merged, new_sizes = merge_tokens(x, sizes, matching)
    assert merged.shape == (B, N - r, C) and new_sizes.shape == (B, N - r, 1)
    torch.testing.assert_close(new_sizes.sum(1), sizes.sum(1))
    torch.testing.assert_close((merged * new_sizes).sum(1), (x * sizes).sum(1), rtol=1e-12, atol=1e-12)
    assert torch.equal(merged[:, :num_prefix], x[:, :num_prefix])
    for b in range(B):
        groups, values, ref_sizes = reference_merge(x[b], sizes[b, :, 0], metric[b], r, num_prefix)
        one = Matching(matching.src[b : b + 1], matching.dst[b : b + 1], matching.base[b : b + 1], N, num_prefix)
        assert _groups_of(one, N) == [sorted(g) for g in groups]
        torch.testing.assert_close(merged[b], values, rtol=1e-12, atol=1e-12)  # same order
        torch.testing.assert_close(new_sizes[b, :, 0], ref_sizes)


def test_matching_caps_r_and_zero_merges_nothing():
    metric = torch.randn(1, 1 + 6, 4)
    assert bipartite_soft_matching(metric, 0, 1) is None
    assert bipartite_soft_matching(metric, 100, 1).src.shape == (1, 3)  # (7 - 1) // 2
    assert bipartite_soft_matching(torch.randn(1, 7, 4), 100, 0).src.shape == (1, 3)  # 7 // 2


def test_unmerge_of_an_unmerged_grid_is_the_identity():
    x = torch.randn(2, 1 + 12, 8)
    state = MergeState(x, num_prefix=1, proportional_attention=True)
    assert torch.equal(state.unmerge(x), x[:, 1:])
    assert torch.equal(state.merge(x, None), x) and state.attn_bias() is None
    assert torch.equal(state.unmerge(x), x[:, 1:])


@pytest.mark.parametrize("num_prefix", [0, 1])
def test_unmerge_gives_each_patch_its_merged_token(num_prefix):
    torch.manual_seed(6)
    N = num_prefix + 16
    x = torch.randn(2, N, 8, dtype=torch.float64)
    state = MergeState(x, num_prefix=num_prefix, proportional_attention=True)
    holds = [[[p] for p in range(N)] for _ in range(2)]
    y, ref = x, [x[b] for b in range(2)]
    sizes = [torch.ones(N, dtype=torch.float64) for _ in range(2)]
    for step in range(3):
        metric = torch.randn(2, y.shape[1], 4, dtype=torch.float64)
        y = state.merge(y, bipartite_soft_matching(metric, 3, num_prefix))
        for b in range(2):
            groups, ref[b], sizes[b] = reference_merge(ref[b], sizes[b], metric[b], 3, num_prefix)
            holds[b] = [sum((holds[b][p] for p in g), []) for g in groups]
    grid = state.unmerge(y)
    for b in range(2):
        torch.testing.assert_close(y[b], ref[b])
        assert state.sizes[b, :, 0].tolist() == [float(len(h)) for h in holds[b]]
        for t, h in enumerate(holds[b]):
            torch.testing.assert_close(y[b, t], x[b, h].mean(0))  # sizes were all 1
            for p in h:
                if p >= num_prefix:
                    assert torch.equal(grid[b, p - num_prefix], y[b, t])
    from vitasks.models.layers.token_reduction import ToMe

    # Pooling: the official patch's plain mean of the merged tokens; size-weighted on request, the
    # mean over the original patches (merged tokens are their members' means here).
    torch.testing.assert_close(ToMe(8, 4).pool_mean(y, state, num_prefix), y[:, num_prefix:].mean(1))
    torch.testing.assert_close(ToMe(8, 4, size_weighted_mean=True).pool_mean(y, state, num_prefix), x[:, num_prefix:].mean(1))
    torch.testing.assert_close(grid.mean(1), x[:, num_prefix:].mean(1))


@torch.no_grad()
@pytest.mark.parametrize(
    "layout", [dict(), dict(class_token=False, pool="mean"), dict(num_reg_tokens=2, pool="token")]
)
def test_tome_backbone_is_the_loop_reference_on_its_own_blocks(layout):
    """vitasks' ToMe (batched, SDPA with the log-size mask) against the loop reference on the
    same blocks: pooled features, and the unmerged dense map of the last block."""
    plain = tiny(img_size=48, **layout).double()  # 36 patches
    num_prefix = plain.num_prefix_tokens
    model = twin(plain, img_size=48, token_reduction=dict(type="ToMe", r=5), **layout).double()
    dense = twin(plain, img_size=48, token_reduction=dict(type="ToMe", r=5), out_indices=[3], **layout).double()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    tokens, _ = plain._embed(x)
    outs, holdings = reference_tome_blocks(plain.blocks, tokens, 5, num_prefix)
    assert outs[0].shape[0] == tokens.shape[1] - 4 * 5 and sorted(sum(holdings[0], [])) == list(range(tokens.shape[1]))
    for b in range(2):
        final = plain.norm(outs[b])
        pooled = final[0] if plain.pool == "token" else final[num_prefix:].mean(0)  # timm: plain mean
        torch.testing.assert_close(model(x)[0][b], plain.fc_norm(pooled), rtol=1e-9, atol=1e-9)
        grid = torch.empty(36, plain.embed_dim, dtype=torch.float64)
        for t, h in enumerate(holdings[b]):
            for p in h:
                if p >= num_prefix:
                    grid[p - num_prefix] = final[t]
        torch.testing.assert_close(dense(x)[0][b].flatten(1).T, grid, rtol=1e-9, atol=1e-9)


@pytest.mark.torch_leg
@pytest.mark.parametrize("name,kw", [
    ("vit_base_patch16_224", {}),  # ViT-B/16, class token
    ("vit_small_patch16_224", dict(class_token=False, global_pool="avg")),  # mean pooled (ViT-S: time)
])
def test_tome_on_converted_timm_vit_gives_the_official_logits(tmp_path, name, kw):
    """Random-init timm ViT-B/16 (class token) and a mean-pooled ViT-S/16 without one, converted to
    vitasks with ToMe r=13, against the official ToMe algorithm (the loop reference) on timm's own
    model. (Before the sets alternated over the whole sequence, ViT-B/16 differed by 5.6e-2.)"""
    timm = pytest.importorskip("timm")
    from vitasks.convert import convert_checkpoint
    from vitasks.registry import MODELS

    pool = kw.get("global_pool", "token")
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    ck = convert_checkpoint("timm", str(tmp_path / "timm.pth"), str(tmp_path / "out.pth"), verbose=False)
    backbone = dict(type="VisionTransformer", **ck["meta"]["config_hint"], token_reduction=dict(type="ToMe", r=13))
    model = MODELS.build(dict(type="ImageClassifier", backbone=backbone, head=dict(ck["meta"]["head_hint"]))).eval()
    model.load_state_dict(ck["state_dict"])
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = ref.norm_pre(ref._pos_embed(ref.patch_embed(x)))
        outs, _ = reference_tome_blocks(ref.blocks, tokens, 13, ref.num_prefix_tokens)
        assert outs[0].shape[0] == (197 if pool == "token" else 196) - 12 * 13
        expected = ref.forward_head(ref.norm(torch.stack(outs)))
        got = model(x, mode="tensor")
    err = ((got - expected).abs().max() / expected.abs().max()).item()
    assert err < 1e-5, err


class TaskLike(torch.nn.Module):
    """A backbone with the task models' call, ``model(x, mode="tensor")``."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x, mode="tensor"):
        return self.backbone(x)


def test_tome_shrinks_the_tokens_and_the_flops():
    plain = TaskLike(tiny())
    model = TaskLike(twin(plain.backbone, token_reduction=dict(type="ToMe", r=3)))
    x = torch.randn(2, 3, 32, 32)
    assert count_tokens(plain, x) == [17] * 4
    assert count_tokens(model, x) == [17, 14, 11, 8]
    assert count_model_flops(model, x) < count_model_flops(plain, x)


def test_tome_rollout_follows_the_source_map():
    """The transitions' product puts each original patch in the merged token that holds it."""
    model = tiny(token_reduction=dict(type="ToMe", r=3), num_reg_tokens=1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, attentions, transitions = model.forward_with_attention_flow(x)
        maps = model(x)  # noqa: F841 (runs the same merges)
    assert [a.shape[-1] for a in attentions] == [18, 15, 12, 9]
    assert transitions[0] is None and transitions[-1].shape == (2, 6, 9)
    members = membership_matrices(attentions, transitions)
    for t in transitions[1:]:
        torch.testing.assert_close(t.sum(-1), torch.ones(t.shape[:2]))
    # Columns: each input token in exactly one merged token (prefix tokens in themselves).
    last = members[-1]
    assert torch.equal((last > 0).sum(1), torch.ones(2, 18, dtype=torch.long))
    rollout, layers = attention_rollout(attentions, (4, 4), num_prefix_tokens=2, transitions=transitions)
    assert rollout.shape == (2, 4, 4) and layers.shape == (2, 4, 4, 4)
    # Rollout rows stay distributions over the input tokens.
    from vitasks.visualization.rollout import rollout_matrix

    torch.testing.assert_close(rollout_matrix(attentions, transitions=transitions).sum(-1), torch.ones(2, 6))


# ------------------------------------------------------------------ every method, every stem


@pytest.mark.parametrize("stem", list(STEMS))
@pytest.mark.parametrize("name", list(REDUCTIONS))
def test_dense_outputs_keep_their_shapes(stem, name):
    plain = tiny(stem, out_indices=[0, 1, 3], num_reg_tokens=1)
    model = tiny(stem, out_indices=[0, 1, 3], num_reg_tokens=1, token_reduction=REDUCTIONS[name])
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        assert [m.shape for m in model(x)] == [m.shape for m in plain(x)]


@pytest.mark.parametrize("name", list(REDUCTIONS))
def test_classification_pools_and_trains(name):
    model = tiny(pool="mean", token_reduction=REDUCTIONS[name]).train()
    (pooled,) = model(torch.randn(2, 3, 32, 32))
    assert pooled.shape == (2, 24)
    pooled.square().sum().backward()
    assert all(p.grad is not None for p in model.blocks.parameters())
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("token_reduction.")]
    if name == "tome":
        assert not grads  # no parameters of its own
        return
    # Every parameter takes part (DDP needs no find_unused_parameters) and some learn at once
    # (a fresh TokenFuser's zero token mixing holds the learners' gradient back at first, as Scenic).
    assert grads and all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


WITH_CP_CASES = {
    **REDUCTIONS,
    "tome_r0": dict(type="ToMe", r=0),
    "tome_list": dict(type="ToMe", r=[0, 2, 0, 3]),
    "tokenlearner_no_fuser": dict(type="TokenLearner", num_tokens=4, at_block=2),
}


@pytest.mark.parametrize("layout", [dict(pool="mean"), dict(out_indices=[1, 3])])
@pytest.mark.parametrize("name", list(WITH_CP_CASES))
def test_with_cp_checkpoints_every_block_under_every_reduction(name, layout, monkeypatch):
    """``with_cp`` puts every block (ToMe: block and merge) under gradient checkpointing, for every
    reduction, and the gradients are those without it (the recompute starts from the same sizes)."""
    import vitasks.models.backbones.base as vit_module  # the block call (ViTBackbone.run_block)

    if name == "tokenlearner_no_fuser" and "out_indices" in layout:
        layout = dict(out_indices=[0, 1])
    calls = []
    real = vit_module.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(vit_module, "checkpoint", counting)
    plain = tiny(token_reduction=WITH_CP_CASES[name], **layout).train()
    cp = twin(plain, token_reduction=WITH_CP_CASES[name], with_cp=True, **layout).train()
    cp.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for model in (plain, cp):
        calls.clear()
        sum(o.square().sum() for o in model(x)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    expected_blocks = 4 if "out_indices" not in layout else max(layout["out_indices"]) + 1
    assert len(calls) == expected_blocks
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        calls.clear()
        cp(x)
        assert not calls  # no checkpointing without gradients


def test_visual_tokens_pool_the_tokens_and_tokenlearner_without_fuser_pools_the_learned_ones():
    for reduction in (dict(type="VisualTokens", num_tokens=5, at_block=0), dict(type="TokenLearner", num_tokens=4, at_block=1)):
        model = tiny(pool="mean", class_token=False, token_reduction=reduction)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            tokens = model.forward_features(x)
            (pooled,) = model(x)
        assert tokens.shape[1] == reduction["num_tokens"]
        torch.testing.assert_close(pooled, model.fc_norm(tokens.mean(1)))


# ------------------------------------------------------------------ layouts that are refused


def test_unsupported_layouts_raise_config_errors():
    with pytest.raises(ConfigError, match="ToMe merges tokens in block 0, which has window attention"):
        tiny(class_token=False, pool="mean", window_size=2, token_reduction=dict(type="ToMe", r=2))
    with pytest.raises(ConfigError, match="use_rel_pos"):
        tiny(class_token=False, pool="mean", use_rel_pos=True, token_reduction=dict(type="TokenLearner", at_block=1))
    with pytest.raises(ConfigError, match="blocks \\[2\\] use window attention"):
        tiny(class_token=False, pool="mean", window_size=2, global_indices=[1, 3],
             token_reduction=dict(type="VisualTokens", at_block=1))
    with pytest.raises(ConfigError, match="set fuser: true"):
        tiny(out_indices=[0, 3], token_reduction=dict(type="TokenLearner", at_block=1))
    with pytest.raises(ConfigError, match="did you mean 'ToMe'"):
        tiny(token_reduction=dict(type="Tome", r=2))
    with pytest.raises(ConfigError, match="unknown keys \\['k'\\]"):
        tiny(token_reduction=dict(type="ToMe", k=2))
    with pytest.raises(ConfigError, match="one entry per block"):
        tiny(token_reduction=dict(type="ToMe", r=[1, 2]))


def test_window_blocks_before_the_reduction_are_allowed():
    """ViTDet's layout: windows in the early blocks, reduction once only global blocks follow."""
    layout = dict(class_token=False, pool="mean", window_size=2, global_indices=[2, 3], out_indices=[3])
    plain = tiny(**layout)
    for reduction in (dict(type="ToMe", r=[0, 0, 3, 3]), dict(type="TokenLearner", num_tokens=3, at_block=2, fuser=True),
                      dict(type="VisualTokens", num_tokens=3, at_block=2)):
        model = twin(plain, token_reduction=reduction, **layout)
        with torch.no_grad():
            assert model(torch.randn(1, 3, 32, 32))[0].shape == (1, 24, 4, 4)
    model = twin(plain, token_reduction=dict(type="ToMe", r=[0, 0, 0, 0]), **layout)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x)[0], plain(x)[0])


def test_rollout_through_a_fuser_says_it_cannot():
    model = tiny(token_reduction=REDUCTIONS["tokenlearner"])
    with pytest.raises(ConfigError, match="TokenFuser"):
        model.forward_with_attention_flow(torch.randn(1, 3, 32, 32))
