"""Reproducible data: every random draw of a training sample derives from the config's seed and
the sample's place in the training stream, never from a worker's or a library's global state.

Why: a data loader's workers each hold their own copy of the random state, and albumentations'
transforms hold generators of their own, so with global seeding the augmentation a sample gets
depends on which worker loaded it, on ``num_workers``, and on everything drawn before; a resumed
run cannot reproduce it. Here instead:

- the training samplers (:class:`SeededSampler` for epochs, :class:`SeededInfiniteSampler` for
  iteration-based loops, :class:`RepeatAugSampler` for repeated augmentation) yield :class:`SeededIndex` values: plain ``int`` indices that also carry a
  seed, ``derive_seed(config seed, epoch, position)`` (or ``(config seed, position)`` in the
  infinite stream); the position counts over the global, pre-rank order, so it does not depend on
  the worker that loads it;
- datasets with :class:`SeededSampleMixin` turn that seed into a ``numpy.random.Generator`` that the
  pipeline finds under ``results["rng"]`` (:func:`sample_rng`); random transforms draw from it, in
  pipeline order; python's ``random`` and numpy's global state are seeded from it too, for
  third-party transforms and mmengine's re-fetch of a skipped sample;
- the main process's torch generator (drop path, dropout, Mixup/CutMix) is re-seeded before each
  training iteration from ``(seed, iteration, rank)`` by :class:`~vitasks.engine.hooks.IterationSeedHook`.

Nothing has to be saved in a checkpoint for this: a resumed run recomputes the same seeds.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
from mmengine.dataset import DefaultSampler, InfiniteSampler
from torch.utils.data import Sampler

from vitasks.checks import NonNegativeInt, PositiveInt, checked
from vitasks.registry import DATA_SAMPLERS

__all__ = [
    "derive_seed",
    "SeededIndex",
    "SeededSampler",
    "SeededInfiniteSampler",
    "RepeatAugSampler",
    "SeededSampleMixin",
    "sample_rng",
    "SAMPLE_RNG_KEY",
]

# Where a dataset puts the sample's generator in the pipeline's ``results`` dict.
SAMPLE_RNG_KEY = "rng"


def derive_seed(*parts: int) -> int:
    """A 32-bit seed mixed from integers (numpy's SeedSequence: nearby inputs give unrelated
    seeds, unlike ``seed + epoch``)."""
    return int(np.random.SeedSequence([int(p) % (1 << 63) for p in parts]).generate_state(1)[0])


class SeededIndex(int):
    """A dataset index that also carries the seed of the sample's random draws.

    An ``int`` subclass, so code that only wants the index (dataset wrappers, mmengine's
    ``BaseDataset``) can use it as one.
    """

    seed: int

    def __new__(cls, index: int, seed: int) -> "SeededIndex":
        obj = super().__new__(cls, index)
        obj.seed = int(seed)
        return obj

    def __getnewargs__(self):  # pickling to worker processes keeps the seed
        return int(self), self.seed

    def __repr__(self) -> str:
        return f"SeededIndex({int(self)}, seed={self.seed})"


@DATA_SAMPLERS.register_module()
class SeededSampler(DefaultSampler):
    """mmengine's ``DefaultSampler`` (same order: shuffled by ``seed + epoch``, split by rank)
    yielding :class:`SeededIndex` with seed ``derive_seed(seed, epoch, global position)``."""

    _skip = 0

    def skip(self, num_samples: int) -> None:
        """Leave out this rank's first ``num_samples`` of the next epoch's order (resuming an
        epoch half done), without loading them."""
        self._skip = int(num_samples)

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        for i, index in enumerate(super().__iter__()):
            if i < skip:
                continue
            position = self.rank + i * self.world_size
            yield SeededIndex(index, derive_seed(self.seed, self.epoch, position))


@DATA_SAMPLERS.register_module()
class SeededInfiniteSampler(InfiniteSampler):
    """mmengine's ``InfiniteSampler`` yielding :class:`SeededIndex` with seed
    ``derive_seed(seed, global position in the stream)``."""

    def _indices_of_rank(self) -> Iterator[int]:
        for i, index in enumerate(super()._indices_of_rank()):
            position = self.rank + i * self.world_size
            yield SeededIndex(index, derive_seed(self.seed, position))

    def skip(self, num_samples: int) -> None:
        """Restart this rank's stream after its first ``num_samples`` (resuming), without
        loading them."""
        self.indices = itertools.islice(self._indices_of_rank(), int(num_samples), None)


@DATA_SAMPLERS.register_module()
class RepeatAugSampler(Sampler):
    """Repeated augmentation (Hoffer et al. 2020; DeiT's ``RASampler``; VideoMAE's ``num_sample``):
    every sample of an epoch is used ``num_repeats`` times, each time with its own augmentation,
    and yielded as :class:`SeededIndex` like :class:`SeededSampler` (same seed, same indices and
    sample seeds; :meth:`skip` resumes an epoch exactly).

    With ``spread`` (DeiT): the dataset's order (shuffled by ``seed + epoch``, mmengine's rule;
    DeiT seeds with the epoch alone, the same for ``seed: 0``) has each index repeated
    ``num_repeats`` times in a row, padded with its own start to a multiple of the world size and
    dealt out by rank (rank r takes positions r, r + world, ...), so the repeats of a sample go to
    different processes. With ``keep_epoch_length`` each rank then keeps its first
    ``floor(len // selected_round * selected_round / world)`` indices (DeiT: ``selected_round``
    256), or ``ceil(len / world)`` with ``selected_round: 0``: an epoch has as many samples as
    without repetition, so the schedule in epochs is unchanged and each epoch sees about a third
    of the distinct samples three times.

    Without ``spread`` and without ``keep_epoch_length`` (VideoMAE's ``num_sample``): rank r takes
    the samples r, r + world, ... of the order (torch's ``DistributedSampler``, padded with its
    start) and yields each ``num_repeats`` times in a row, so a sample's repeats fall in the same
    batch: with the batch size multiplied by ``num_repeats`` an epoch has the iterations it had,
    each sample with ``num_repeats`` augmentations. (VideoMAE decodes the clip once and augments
    it twice; here each repeat is loaded on its own, so the frame sampling differs too.)

    Args:
        dataset: the training dataset (given by the Runner).
        num_repeats: uses of each sample (DeiT: 3).
        shuffle: shuffle the order each epoch.
        seed: the shuffling and sample seed; None takes a random one shared by the ranks (the
            Runner passes ``randomness.seed``).
        selected_round: see above (DeiT: 256; 0: ``ceil(len / world)``).
        spread: repeats on different ranks (DeiT) or in a row on one rank (VideoMAE).
        keep_epoch_length: truncate each rank's share to the epoch length of one pass (DeiT);
            False keeps every repeat (``num_repeats`` times the samples per epoch).
    """

    _skip = 0
    config_key = "train_dataloader.sampler"  # the training loader's, the only one that repeats

    @checked
    def __init__(
        self, dataset, num_repeats: PositiveInt = 3, shuffle: bool = True, seed: Optional[int] = None,
        selected_round: NonNegativeInt = 256, spread: bool = True, keep_epoch_length: bool = True,
    ) -> None:
        from mmengine.dist import get_dist_info, sync_random_seed

        from vitasks.errors import ConfigError

        where = self.config_key
        self.rank, self.world_size = get_dist_info()
        self.dataset = dataset
        self.num_repeats = num_repeats
        self.shuffle = bool(shuffle)
        self.seed = sync_random_seed() if seed is None else int(seed)
        self.selected_round = selected_round
        self.spread = bool(spread)
        self.keep_epoch_length = bool(keep_epoch_length)
        self.epoch = 0
        n = len(dataset)
        if self.spread:
            self.num_samples = math.ceil(n * num_repeats / self.world_size)  # per rank, padded
        else:
            self.num_samples = math.ceil(n / self.world_size) * num_repeats
        if not self.keep_epoch_length:
            self.num_selected = self.num_samples
        elif selected_round:
            self.num_selected = int(n // selected_round * selected_round // self.world_size)
        else:
            self.num_selected = math.ceil(n / self.world_size)
        self.num_selected = min(self.num_selected, self.num_samples)
        if self.num_selected == 0:
            raise ConfigError(
                f"{where}: RepeatAugSampler keeps floor(len // selected_round * selected_round / world) = 0 "
                f"samples per process for a dataset of {n} with selected_round {selected_round} on "
                f"{self.world_size} process(es); set {where}.selected_round to 0 (ceil(len / world)) or a "
                "smaller multiple"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_selected

    def skip(self, num_samples: int) -> None:
        """Leave out this rank's first ``num_samples`` of the next epoch (resuming an epoch half
        done), without loading them."""
        self._skip = int(num_samples)

    def _order(self) -> List[int]:
        n = len(self.dataset)
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(n, generator=g).tolist()

    def _indices_and_positions(self) -> Tuple[List[int], List[int]]:
        """This rank's indices of the epoch (before truncation) and their positions in the
        global, pre-rank order (which the sample seeds derive from)."""
        order, world, R = self._order(), self.world_size, self.num_repeats
        if self.spread:
            repeated = [i for i in order for _ in range(R)]
            total = self.num_samples * world
            while len(repeated) < total:  # pad with the start (less than `world` indices)
                repeated += repeated[: total - len(repeated)]
            positions = list(range(self.rank, total, world))
            return [repeated[p] for p in positions], positions
        per_rank = self.num_samples // R
        total = per_rank * world
        while len(order) < total:
            order += order[: total - len(order)]
        mine = range(self.rank, total, world)
        return [order[j] for j in mine for _ in range(R)], [j * R + k for j in mine for k in range(R)]

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        indices, positions = self._indices_and_positions()
        for index, position in zip(indices[skip : self.num_selected], positions[skip : self.num_selected]):
            yield SeededIndex(index, derive_seed(self.seed, self.epoch, position))


def can_skip_samples(dataloader) -> bool:
    """Whether resuming may skip the trained batches in ``dataloader``'s sampler instead of
    loading them: a seeded sampler batched by torch's plain ``BatchSampler`` (a grouping batch
    sampler may form other batches from a shorter stream)."""
    from torch.utils.data import BatchSampler

    return type(getattr(dataloader, "batch_sampler", None)) is BatchSampler and hasattr(
        getattr(dataloader, "sampler", None), "skip"
    )


# mmengine sampler names that the Runner swaps for the seeded ones in training.
SEEDED_SAMPLERS = {
    "DefaultSampler": SeededSampler,
    "InfiniteSampler": SeededInfiniteSampler,
}


def sample_rng(results: dict) -> np.random.Generator:
    """The generator for a transform's random draws on this sample.

    The one the dataset put in ``results`` (seeded training); outside a seeded loader (a
    pipeline called by hand, ``tools/browse_dataset.py``) a generator seeded from numpy's global
    state, which ``randomness.seed`` seeds, is made and kept for the rest of the pipeline.
    """
    rng = results.get(SAMPLE_RNG_KEY)
    if rng is None:
        rng = np.random.default_rng(np.random.randint(0, 2**31 - 1))
        results[SAMPLE_RNG_KEY] = rng
    return rng


def seed_from(rng: np.random.Generator) -> int:
    """A 32-bit seed drawn from ``rng``, for a library object with a generator of its own."""
    return int(rng.integers(0, 2**32 - 1))


class SeededSampleMixin:
    """For mmengine ``BaseDataset`` subclasses: a :class:`SeededIndex` seeds the sample.

    ``get_data_info`` adds ``results["rng"]`` (a fresh generator for this sample and index, so a
    re-fetched replacement sample gets a stream of its own), and python's and numpy's global
    states are seeded for the duration of the fetch.
    """

    _sample_seed: Optional[int] = None

    def __getitem__(self, idx):
        seed = getattr(idx, "seed", None)
        if seed is None:
            return super().__getitem__(idx)  # type: ignore[misc]
        self._sample_seed = seed
        random.seed(seed)
        np.random.seed(seed)
        try:
            return super().__getitem__(int(idx))  # type: ignore[misc]
        finally:
            self._sample_seed = None

    def get_data_info(self, idx: int) -> dict:
        info = super().get_data_info(idx)  # type: ignore[misc]
        if self._sample_seed is not None:
            info[SAMPLE_RNG_KEY] = np.random.default_rng(derive_seed(self._sample_seed, int(idx)))
        return info
