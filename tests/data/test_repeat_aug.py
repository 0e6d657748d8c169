"""Repeated augmentation (``RepeatAugSampler``): the index lists against DeiT's ``RASampler``
written again from its definition, for several dataset lengths, world sizes, ranks and epochs;
VideoMAE's layout (repeats in a row on one rank, every repeat kept); sample seeds; resuming with
``skip``; building it from a config."""

import math

import pytest
import torch

from vitasks.data.seeding import RepeatAugSampler, SeededIndex, derive_seed
from vitasks.errors import ConfigError


def deit_rasampler(n, world, rank, epoch, num_repeats=3, seed=0):
    """DeiT's RASampler (facebookresearch/deit samplers.py), from its definition: the epoch's
    permutation (a generator seeded with the epoch; + seed, mmengine's rule, which is DeiT's for
    seed 0), each index repeated num_repeats times in a row, padded with its start to
    num_samples * world, every world-th from rank on, the first num_selected_samples kept."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g)
    num_samples = int(math.ceil(n * num_repeats / world))
    total = num_samples * world
    indices = torch.repeat_interleave(order, repeats=num_repeats, dim=0).tolist()
    indices += indices[: total - len(indices)]
    assert len(indices) == total
    indices = indices[rank:total:world]
    num_selected = int(math.floor(n // 256 * 256 / world))
    return indices[:num_selected]


def make(n, world, rank, monkeypatch, **kw):
    monkeypatch.setattr("mmengine.dist.get_dist_info", lambda: (rank, world))
    return RepeatAugSampler(list(range(n)), **kw)


@pytest.mark.parametrize(
    "n,world,rank,epoch",
    [(1000, 1, 0, 0), (1000, 4, 3, 2), (777, 3, 1, 5), (2560, 8, 7, 1), (300, 2, 0, 0), (5000, 7, 4, 9)],
)
def test_index_lists_are_deits(n, world, rank, epoch, monkeypatch):
    sampler = make(n, world, rank, monkeypatch, seed=0)
    sampler.set_epoch(epoch)
    got = list(sampler)
    assert got == deit_rasampler(n, world, rank, epoch)
    assert len(sampler) == len(got) == n // 256 * 256 // world
    # With another seed: the permutation of seed + epoch.
    sampler = make(n, world, rank, monkeypatch, seed=11)
    sampler.set_epoch(epoch)
    assert list(sampler) == deit_rasampler(n, world, rank, epoch, seed=11)


def test_repeats_go_to_different_ranks_and_every_sample_thrice(monkeypatch):
    n, world = 40, 4
    per_rank = [list(make(n, world, r, monkeypatch, seed=3, selected_round=0, keep_epoch_length=False)) for r in range(world)]
    # Before truncation every sample is used 3 times, on 3 different ranks...
    ranks = {}
    for r in range(world):
        for i in per_rank[r]:
            ranks.setdefault(i, []).append(r)
    assert set(ranks) == set(range(n)) and all(len(set(rs)) == len(rs) == 3 for rs in ranks.values())
    # ... and with the epoch length kept (selected_round 0: ceil(n / world) per rank) an epoch
    # has n samples in all.
    kept = [make(n, world, r, monkeypatch, seed=3, selected_round=0) for r in range(world)]
    assert sum(len(list(s)) for s in kept) == n and all(len(s) == 10 for s in kept)


def test_num_repeats_and_no_shuffle(monkeypatch):
    sampler = make(6, 1, 0, monkeypatch, seed=0, num_repeats=2, shuffle=False, selected_round=0, keep_epoch_length=False)
    assert list(sampler) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_videomae_layout_keeps_repeats_together(monkeypatch):
    """spread: false, keep_epoch_length: false: rank r takes torch DistributedSampler's share and
    uses each sample num_repeats times in a row."""
    n, world, epoch, seed = 11, 3, 4, 5
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g).tolist()
    total = math.ceil(n / world) * world
    order += order[: total - n]
    for rank in range(world):
        sampler = make(n, world, rank, monkeypatch, seed=seed, num_repeats=2, spread=False, keep_epoch_length=False)
        sampler.set_epoch(epoch)
        got = list(sampler)
        assert got == [i for i in order[rank:total:world] for _ in range(2)]
        assert len({s.seed for s in got}) == len(got)  # each repeat its own augmentation


def test_sample_seeds_resume_and_same_seed(monkeypatch):
    sampler = make(600, 2, 1, monkeypatch, seed=7)
    sampler.set_epoch(3)
    full = list(sampler)
    assert all(isinstance(i, SeededIndex) for i in full)
    # The seed of an index is derive_seed(seed, epoch, position in the global order).
    assert full[0].seed == derive_seed(7, 3, 1) and full[5].seed == derive_seed(7, 3, 1 + 5 * 2)
    # The three repeats of a sample get three seeds.
    assert len({i.seed for i in full}) == len(full)
    again = make(600, 2, 1, monkeypatch, seed=7)
    again.set_epoch(3)
    assert [(int(i), i.seed) for i in again] == [(int(i), i.seed) for i in full]
    again.skip(37)
    assert [(int(i), i.seed) for i in again] == [(int(i), i.seed) for i in full[37:]]
    assert [(int(i), i.seed) for i in again] == [(int(i), i.seed) for i in full]  # skip is once


def test_bad_settings_are_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="selected_round"):
        make(100, 1, 0, monkeypatch, seed=0)  # DeiT's 256-rounding leaves nothing of 100 samples
    with pytest.raises(ConfigError, match="num_repeats"):
        make(100, 1, 0, monkeypatch, seed=0, num_repeats=0)


def test_built_from_config_by_the_runner_dataloader():
    from mmengine.registry import DefaultScope

    from vitasks.data.seeding import can_skip_samples
    from vitasks.engine.runner import VitasksRunner

    with DefaultScope.overwrite_default_scope("vitasks"):
        loader = VitasksRunner.build_dataloader(
            dict(dataset=list(range(20)), batch_size=4, sampler=dict(type="RepeatAugSampler", selected_round=0),
                 collate_fn=dict(type="default_collate")),
            seed=1,
        )
    assert type(loader.sampler).__name__ == "RepeatAugSampler" and loader.sampler.seed == 1
    assert len(loader) == 5 and can_skip_samples(loader)
