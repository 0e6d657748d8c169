"""Batch augmentations of classification training: Mixup, CutMix, and one chosen per batch;
timm's RandomErasing, per sample.

They act on a normalised float batch (Mixup and CutMix also on soft targets ``(N, K)``), inside
:class:`~vitasks.models.data_preprocessors.ClsDataPreprocessor` (and the video preprocessor).
"""

import math
import random
from typing import List, Optional, Sequence, Tuple

import torch

from vitasks.checks import (
    InRange, ListOf, NonNegativeInt, OrNone, PositiveInt, building, checked, config_errors, config_key, one_of, options,
    positive_int,
)
from vitasks.errors import ConfigError
from vitasks.registry import MODELS

__all__ = ["CutMix", "Mixup", "RandomBatchAugment", "RandomErasing", "build_batch_augments", "build_random_erasing",
           "mix_batch"]


def _sample_beta(alpha: float) -> float:
    """One draw from Beta(alpha, alpha) using torch's global RNG (seeded by mmengine)."""
    return float(torch.distributions.Beta(alpha, alpha).sample())


class _BetaMix:
    """What Mixup and CutMix share: ``alpha`` of the Beta(alpha, alpha) mixing weight, and the
    targets mixed as the inputs are."""

    config_key = "model.data_preprocessor.batch_augments.augments"

    @checked
    def __init__(self, alpha: InRange(0, low_open=True) = 1.0) -> None:
        self.alpha = float(alpha)

    @staticmethod
    def mix_targets(targets: torch.Tensor, lam: float, perm: torch.Tensor) -> torch.Tensor:
        return lam * targets + (1.0 - lam) * targets[perm]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alpha={self.alpha})"


@MODELS.register_module()
class Mixup(_BetaMix):
    """Mixup (Zhang et al., 2018): ``x = lam x + (1 - lam) x[perm]``, targets mixed alike, with
    ``lam ~ Beta(alpha, alpha)`` drawn once per batch.

    Args:
        alpha: Beta distribution parameter (0.8 in DeiT).
    """

    @checked
    def __init__(self, alpha: InRange(0, low_open=True) = 0.8) -> None:
        super().__init__(alpha)

    def mix(
        self, inputs: torch.Tensor, targets: torch.Tensor, lam: float, perm: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Deterministic part, for a given ``lam`` and permutation."""
        return lam * inputs + (1.0 - lam) * inputs[perm], self.mix_targets(targets, lam, perm)

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mix a batch: inputs (N, C, H, W) float, targets (N, K) float."""
        lam = _sample_beta(self.alpha)
        perm = torch.randperm(inputs.shape[0], device=inputs.device)
        return self.mix(inputs, targets, lam, perm)


@MODELS.register_module()
class CutMix(_BetaMix):
    """CutMix (Yun et al., 2019): a box of another sample is pasted into each image; the targets
    are mixed by the pasted area's fraction (after clipping the box to the image, so the weights
    are exact).

    The box has side ratio ``sqrt(1 - lam)`` of the image, ``lam ~ Beta(alpha, alpha)``, and a
    uniformly drawn centre.

    Args:
        alpha: Beta distribution parameter (1.0 in DeiT).
    """

    @staticmethod
    def box(height: int, width: int, lam: float, cy: int, cx: int) -> Tuple[int, int, int, int]:
        """Box ``(y0, y1, x0, x1)`` of side ratio sqrt(1 - lam) centred at (cy, cx), clipped."""
        ratio = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        return y0, y1, x0, x1

    def mix(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        box: Tuple[int, int, int, int],
        perm: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Deterministic part: paste ``inputs[perm]`` in ``box``; weight = kept-area fraction."""
        y0, y1, x0, x1 = box
        height, width = inputs.shape[-2:]
        mixed = inputs.clone()
        mixed[..., y0:y1, x0:x1] = inputs[perm][..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
        return mixed, self.mix_targets(targets, lam, perm)

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mix a batch: inputs (N, C, H, W) float, targets (N, K) float."""
        height, width = inputs.shape[-2:]
        lam = _sample_beta(self.alpha)
        cy = int(torch.randint(height, ()).item())
        cx = int(torch.randint(width, ()).item())
        perm = torch.randperm(inputs.shape[0], device=inputs.device)
        return self.mix(inputs, targets, self.box(height, width, lam, cy, cx), perm)


class RandomBatchAugment:
    """Applies one of ``augments`` per batch, chosen with ``probs`` (the rest of the probability
    mass, if ``sum(probs) < 1``, leaves the batch as it is).

    Args:
        augments: Batch augment configs (``Mixup``, ``CutMix``) or objects.
        probs: Probability of each; default: equal, summing to 1.
    """

    config_key = "model.data_preprocessor.batch_augments"

    @checked
    def __init__(self, augments: ListOf(object, single=dict), probs: Optional[Sequence[float]] = None) -> None:
        where = config_key(default=self.config_key)
        with building("augments", root=where):
            self.augments = [MODELS.build(a) if isinstance(a, dict) else a for a in augments]
        if probs is None:
            probs = [1.0 / len(self.augments)] * len(self.augments)
        probs = [float(p) for p in probs]
        if len(probs) != len(self.augments) or any(p < 0 for p in probs) or sum(probs) > 1.0 + 1e-6:
            raise ConfigError(f"{where}.probs must be one value >= 0 per augment ({len(self.augments)}), "
                              f"summing to at most 1, got {probs}")
        # The last entry is "no augmentation".
        self.probs = probs + [max(0.0, 1.0 - sum(probs))]

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        choice = int(torch.multinomial(torch.tensor(self.probs), 1).item())
        if choice == len(self.augments):
            return inputs, targets
        return self.augments[choice](inputs, targets)


@MODELS.register_module()
class RandomErasing:
    """Random Erasing (Zhong et al., 2020) as timm defines it, on normalised images, per sample.

    timm's definition (``timm.data.random_erasing.RandomErasing``): with probability ``probability``
    a sample gets ``count`` rectangles (``min_count``, or uniform in ``[min_count, max_count]``);
    for each, up to 10 tries draw an area fraction ``U(min_area, max_area) / count`` of the image
    and an aspect ratio ``exp(U(log min_aspect, log max_aspect))`` (``max_aspect = 1 /
    min_aspect`` by default), ``h = round(sqrt(area * aspect))``, ``w = round(sqrt(area /
    aspect))``; the first try with ``h < H`` and ``w < W`` places the box at ``top ~ U{0..H-h}``,
    ``left ~ U{0..W-w}`` and fills it: ``const`` zeros, ``rand`` one normal colour per channel,
    ``pixel`` normal noise per pixel (values in normalised units, as the image after
    normalisation). With ``num_splits > 1`` the first ``N // num_splits`` samples stay clean.

    A clip (inputs ``(N, C, T, H, W)``) gets one draw per clip: the same rectangles on every frame
    and up to 100 tries, with the fill drawn per frame (SlowFast's and VideoMAE's cube erasing).

    Random draws: the rectangles come from a ``random.Random`` seeded from torch's generator, the
    fill from torch's generator on the batch's device; the training loop re-seeds torch before
    every iteration from the config's seed, the iteration and the rank, so a run and its resumed
    copy erase the same boxes.

    Args:
        probability: chance that a sample is erased (DeiT: 0.25). ``prob`` is accepted too.
        min_area, max_area: range of the erased area as a fraction of the image.
        min_aspect, max_aspect: aspect ratio range (``h / w``), drawn log-uniformly.
        mode: ``const``, ``rand`` or ``pixel`` (DeiT, VideoMAE).
        min_count, max_count: number of rectangles per erased sample.
        num_splits: leave the first ``N // num_splits`` samples of a batch untouched (0: none).
        max_attempts: tries per rectangle; default 10 for images, 100 for clips.
    """

    config_key = "RandomErasing"  # built alone; inside a preprocessor its key there

    @checked
    def __init__(
        self,
        probability: InRange(0, 1) = 0.5,
        min_area: InRange(0, 1, low_open=True) = 0.02,
        max_area: InRange(0, 1, low_open=True) = 1 / 3,
        min_aspect: InRange(0, low_open=True) = 0.3,
        max_aspect: OrNone(InRange(0, low_open=True)) = None,
        mode: str = "const",
        min_count: PositiveInt = 1,
        max_count: OrNone(PositiveInt) = None,
        num_splits: NonNegativeInt = 0,
        max_attempts: OrNone(PositiveInt) = None,
        prob: OrNone(InRange(0, 1)) = None,
    ) -> None:
        where = config_key(default=self.config_key)
        probability = probability if prob is None else prob
        max_aspect = max_aspect or 1.0 / min_aspect
        max_count = max_count or min_count
        for name, low, high in (("area", min_area, max_area), ("aspect", min_aspect, max_aspect),
                                ("count", min_count, max_count)):
            if low > high:
                raise ConfigError(f"{where}: need min_{name} <= max_{name}, got {low} and {high}")
        mode = one_of((mode or "const").lower(), ("const", "rand", "pixel"), f"{where}.mode")
        self.probability = float(probability)
        self.min_area, self.max_area = float(min_area), float(max_area)
        self.min_aspect, self.max_aspect = float(min_aspect), float(max_aspect)
        self.log_aspect_ratio = (math.log(self.min_aspect), math.log(self.max_aspect))
        self.mode = mode
        self.min_count, self.max_count = int(min_count), int(max_count)
        self.num_splits = int(num_splits)
        self.max_attempts = None if max_attempts is None else int(max_attempts)

    def draw_boxes(
        self, rng: random.Random, height: int, width: int, attempts: int = 10
    ) -> List[Tuple[int, int, int, int]]:
        """Rectangles ``(top, left, h, w)`` for one sample, timm's draws in timm's order."""
        if rng.random() > self.probability:
            return []
        area = height * width
        count = self.min_count if self.min_count == self.max_count else rng.randint(self.min_count, self.max_count)
        boxes = []
        for _ in range(count):
            for _ in range(attempts):
                target_area = rng.uniform(self.min_area, self.max_area) * area / count
                aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
                h = int(round(math.sqrt(target_area * aspect)))
                w = int(round(math.sqrt(target_area / aspect)))
                if w < width and h < height:
                    top = rng.randint(0, height - h)
                    left = rng.randint(0, width - w)
                    boxes.append((top, left, h, w))
                    break
        return boxes

    def fill(self, shape: Tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The values of one erased rectangle ``(C, h, w)`` (broadcastable)."""
        if self.mode == "pixel":
            return torch.empty(shape, dtype=dtype, device=device).normal_()
        if self.mode == "rand":
            return torch.empty((shape[0], 1, 1), dtype=dtype, device=device).normal_()
        return torch.zeros((shape[0], 1, 1), dtype=dtype, device=device)

    def __call__(self, inputs: torch.Tensor, rng: Optional[random.Random] = None) -> torch.Tensor:
        """Erase in place and return ``inputs``: images ``(N, C, H, W)`` or clips
        ``(N, C, T, H, W)``. ``rng`` gives the rectangles' draws (default: seeded from torch)."""
        if rng is None:
            rng = random.Random(int(torch.randint(0, 2**62, (1,)).item()))
        if inputs.dim() not in (4, 5):
            raise ValueError(f"RandomErasing: expected (N, C, H, W) or (N, C, T, H, W), got {tuple(inputs.shape)}")
        clips = inputs.dim() == 5
        attempts = self.max_attempts or (100 if clips else 10)
        num = inputs.shape[0]
        channels, height, width = inputs.shape[1], inputs.shape[-2], inputs.shape[-1]
        start = num // self.num_splits if self.num_splits > 1 else 0
        for i in range(start, num):
            for top, left, h, w in self.draw_boxes(rng, height, width, attempts):
                if clips:
                    for t in range(inputs.shape[2]):
                        inputs[i, :, t, top:top + h, left:left + w] = self.fill(
                            (channels, h, w), inputs.dtype, inputs.device)
                else:
                    inputs[i, :, top:top + h, left:left + w] = self.fill((channels, h, w), inputs.dtype, inputs.device)
        return inputs

    def __repr__(self) -> str:
        return (
            f"RandomErasing(probability={self.probability}, area=({self.min_area}, {self.max_area}), "
            f"aspect=({self.min_aspect}, {self.max_aspect}), mode={self.mode!r}, "
            f"count=({self.min_count}, {self.max_count}), num_splits={self.num_splits})"
        )


def build_batch_augments(cfg: Optional[dict], num_classes: Optional[int], owner: str) -> Optional[RandomBatchAugment]:
    """The ``batch_augments`` option of the preprocessor at config key ``owner``: ``None``, or
    ``{augments: [...], probs: [...]}`` with ``num_classes`` set (for the soft targets)."""
    if cfg is None:
        return None
    cfg = options(cfg, f"{owner}.batch_augments", ("augments", "probs"), required=("augments",),
                  what="a dict with `augments` (and optional `probs`)")
    positive_int(num_classes, f"{owner}.num_classes", what="a positive integer (e.g. ${num_classes}) for "
                 "batch_augments' soft targets")
    with building("batch_augments", root=owner):
        return RandomBatchAugment(**cfg)


def mix_batch(augment: RandomBatchAugment, inputs: torch.Tensor, samples: Sequence, num_classes: int,
              owner: str) -> torch.Tensor:
    """Mixup/CutMix ``inputs`` (a sample per row) with ``augment``; each sample's one-hot label
    mixed alike goes into its ``gt_score``."""
    labels = torch.cat([s.gt_label.reshape(-1) for s in samples]).to(inputs.device).long()
    if labels.numel() != len(samples):
        raise ValueError("Mixup/CutMix need exactly one gt_label per sample")
    if int(labels.max()) >= num_classes or int(labels.min()) < 0:
        raise ConfigError(f"{owner}: a label ({int(labels.max())}) is outside 0..{num_classes - 1}; "
                          "check `num_classes`")
    targets = torch.nn.functional.one_hot(labels, num_classes).to(inputs.dtype)
    inputs, targets = augment(inputs, targets)
    for sample, target in zip(samples, targets):
        sample.gt_score = target
    return inputs


def build_random_erasing(cfg, owner: str) -> Optional[RandomErasing]:
    """The ``random_erasing`` option of the preprocessor at config key ``owner``: ``None``, a dict
    (``type`` optional, default ``RandomErasing``) or an object."""
    if cfg is None or isinstance(cfg, RandomErasing):
        return cfg
    cfg = options(cfg, f"{owner}.random_erasing",
                  what="a dict like {type: RandomErasing, probability: 0.25, mode: pixel}")
    cfg.setdefault("type", "RandomErasing")
    with config_errors(f"{owner}.random_erasing", TypeError), building("random_erasing", root=owner):
        return MODELS.build(cfg)
