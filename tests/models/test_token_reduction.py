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

from vitasks.benchmark import count_model_flops
from vitasks.errors import ConfigError
from vitasks.models.backbones import VisionTransformer
from vitasks.models.layers.attention import Attention
from vitasks.models.layers.token_reduction import (
    FilterTokenizer,
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


def brute_force_merge(x, sizes, metric, r, num_prefix):
    """ToMe's bipartite soft matching with Python loops: returns {frozenset of patch indices:
    (size-weighted average, size)} for the patch tokens after merging."""
    n = x.shape[0] - num_prefix
    a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))
    m = metric[num_prefix:] / metric[num_prefix:].norm(dim=-1, keepdim=True)
    best = []
    for i in a_idx:
        sims = [float(m[i] @ m[k]) for k in b_idx]
        best.append((max(sims), i, b_idx[int(np.argmax(sims))]))
    best.sort(key=lambda t: -t[0])
    members = {k: [k] for k in b_idx}
    kept = [i for _, i, _ in best[r:]]
    for _, i, k in best[:r]:
        members[k].append(i)
    groups = [[i] for i in kept] + list(members.values())
    out = {}
    for g in groups:
        w = sizes[num_prefix + torch.tensor(g), 0]
        out[frozenset(g)] = ((x[num_prefix + torch.tensor(g)] * w[:, None]).sum(0) / w.sum(), float(w.sum()))
    return out


@pytest.mark.parametrize("num_prefix", [0, 1, 3])
def test_merge_matches_brute_force_and_keeps_total_size_and_weighted_sum(num_prefix):
    torch.manual_seed(5)
    B, N, C, r = 2, num_prefix + 11, 5, 4
    x = torch.randn(B, N, C, dtype=torch.float64)
    sizes = torch.randint(1, 4, (B, N, 1)).double()
    metric = torch.randn(B, N, 8, dtype=torch.float64)
    matching = bipartite_soft_matching(metric, r, num_prefix)
    merged, new_sizes = merge_tokens(x, sizes, matching, num_prefix)
    assert merged.shape == (B, N - r, C) and new_sizes.shape == (B, N - r, 1)
    # Totals: sizes and the size-weighted sum of the tokens.
    torch.testing.assert_close(new_sizes.sum(1), sizes.sum(1))
    torch.testing.assert_close((merged * new_sizes).sum(1), (x * sizes).sum(1), rtol=1e-12, atol=1e-12)
    # Prefix tokens untouched; patch tokens as the brute force groups them.
    assert torch.equal(merged[:, :num_prefix], x[:, :num_prefix])
    for b in range(B):
        expected = brute_force_merge(x[b], sizes[b], metric[b], r, num_prefix)
        got = {(round(float(s), 6), tuple(np.round(v.numpy(), 9))) for v, s in zip(merged[b, num_prefix:], new_sizes[b, num_prefix:, 0])}
        want = {(round(s, 6), tuple(np.round(v.numpy(), 9))) for v, s in expected.values()}
        assert got == want


def test_matching_caps_r_and_zero_merges_nothing():
    metric = torch.randn(1, 1 + 6, 4)
    assert bipartite_soft_matching(metric, 0, 1) is None
    assert bipartite_soft_matching(metric, 100, 1).src.shape == (1, 3)  # half the patch tokens


def test_unmerge_of_an_unmerged_grid_is_the_identity():
    x = torch.randn(2, 1 + 12, 8)
    state = MergeState(x, num_prefix=1, proportional_attention=True)
    assert torch.equal(state.unmerge(x), x[:, 1:])
    assert torch.equal(state.merge(x, None), x) and state.attn_bias() is None
    assert torch.equal(state.unmerge(x), x[:, 1:])


def test_unmerge_gives_each_patch_its_merged_token_and_pool_is_the_grid_mean():
    torch.manual_seed(6)
    x = torch.randn(2, 1 + 16, 8, dtype=torch.float64)
    state = MergeState(x, num_prefix=1, proportional_attention=True)
    members = [[[p] for p in range(16)] for _ in range(2)]  # brute-force source map
    y = x
    for step in range(3):
        matching = bipartite_soft_matching(torch.randn(2, y.shape[1], 4, dtype=torch.float64), 3, 1)
        new_index = matching.new_index()
        y = state.merge(y, matching)
        for b in range(2):
            groups = [[] for _ in range(y.shape[1] - 1)]
            for old, g in enumerate(members[b]):
                groups[int(new_index[b, old])] += g
            members[b] = groups
    grid = state.unmerge(y)
    for b in range(2):
        for t, g in enumerate(members[b]):
            for p in g:
                assert torch.equal(grid[b, p], y[b, 1 + t])
            # A merged token is the mean of the original patches it holds (sizes were all 1).
            torch.testing.assert_close(y[b, 1 + t], x[b, 1 + torch.tensor(g)].mean(0))
        assert state.sizes[b, 1:, 0].tolist() == [float(len(g)) for g in members[b]]
    from vitasks.models.layers.token_reduction import ToMe

    torch.testing.assert_close(ToMe(8, 4).pool_mean(y, state, 1), x[:, 1:].mean(1))


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
