"""Batch augmentations of classification training: Mixup, CutMix, and one chosen per batch.

They act on a normalised float batch and soft targets ``(N, K)``, inside
:class:`~vitasks.models.data_preprocessors.ClsDataPreprocessor`.
"""

import math
from typing import Optional, Sequence, Tuple

import torch

from vitasks.errors import ConfigError
from vitasks.registry import MODELS

__all__ = ["CutMix", "Mixup", "RandomBatchAugment"]


def _sample_beta(alpha: float) -> float:
    """One draw from Beta(alpha, alpha) using torch's global RNG (seeded by mmengine)."""
    return float(torch.distributions.Beta(alpha, alpha).sample())


@MODELS.register_module()
class Mixup:
    """Mixup (Zhang et al., 2018): ``x = lam x + (1 - lam) x[perm]``, targets mixed alike, with
    ``lam ~ Beta(alpha, alpha)`` drawn once per batch.

    Args:
        alpha: Beta distribution parameter (0.8 in DeiT).
    """

    def __init__(self, alpha: float = 0.8) -> None:
        if alpha <= 0:
            raise ConfigError(f"Mixup: alpha must be > 0, got {alpha}")
        self.alpha = float(alpha)

    def mix(
        self, inputs: torch.Tensor, targets: torch.Tensor, lam: float, perm: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Deterministic part, for a given ``lam`` and permutation."""
        mixed = lam * inputs + (1.0 - lam) * inputs[perm]
        return mixed, lam * targets + (1.0 - lam) * targets[perm]

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mix a batch: inputs (N, C, H, W) float, targets (N, K) float."""
        lam = _sample_beta(self.alpha)
        perm = torch.randperm(inputs.shape[0], device=inputs.device)
        return self.mix(inputs, targets, lam, perm)

    def __repr__(self) -> str:
        return f"Mixup(alpha={self.alpha})"


@MODELS.register_module()
class CutMix:
    """CutMix (Yun et al., 2019): a box of another sample is pasted into each image; the targets
    are mixed by the pasted area's fraction (after clipping the box to the image, so the weights
    are exact).

    The box has side ratio ``sqrt(1 - lam)`` of the image, ``lam ~ Beta(alpha, alpha)``, and a
    uniformly drawn centre.

    Args:
        alpha: Beta distribution parameter (1.0 in DeiT).
    """

    def __init__(self, alpha: float = 1.0) -> None:
        if alpha <= 0:
            raise ConfigError(f"CutMix: alpha must be > 0, got {alpha}")
        self.alpha = float(alpha)

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
        return mixed, lam * targets + (1.0 - lam) * targets[perm]

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mix a batch: inputs (N, C, H, W) float, targets (N, K) float."""
        height, width = inputs.shape[-2:]
        lam = _sample_beta(self.alpha)
        cy = int(torch.randint(height, ()).item())
        cx = int(torch.randint(width, ()).item())
        perm = torch.randperm(inputs.shape[0], device=inputs.device)
        return self.mix(inputs, targets, self.box(height, width, lam, cy, cx), perm)

    def __repr__(self) -> str:
        return f"CutMix(alpha={self.alpha})"


class RandomBatchAugment:
    """Applies one of ``augments`` per batch, chosen with ``probs`` (the rest of the probability
    mass, if ``sum(probs) < 1``, leaves the batch as it is).

    Args:
        augments: Batch augment configs (``Mixup``, ``CutMix``) or objects.
        probs: Probability of each; default: equal, summing to 1.
    """

    def __init__(self, augments: Sequence, probs: Optional[Sequence[float]] = None) -> None:
        if isinstance(augments, dict):
            augments = [augments]
        self.augments = [MODELS.build(a) if isinstance(a, dict) else a for a in augments]
        if not self.augments:
            raise ConfigError("batch_augments.augments is empty: name at least one (Mixup, CutMix)")
        if probs is None:
            probs = [1.0 / len(self.augments)] * len(self.augments)
        probs = [float(p) for p in probs]
        if len(probs) != len(self.augments):
            raise ConfigError(
                f"batch_augments.probs has {len(probs)} values for {len(self.augments)} augments"
            )
        if any(p < 0 for p in probs) or sum(probs) > 1.0 + 1e-6:
            raise ConfigError(f"batch_augments.probs must be >= 0 and sum to at most 1, got {probs}")
        # The last entry is "no augmentation".
        self.probs = probs + [max(0.0, 1.0 - sum(probs))]

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        choice = int(torch.multinomial(torch.tensor(self.probs), 1).item())
        if choice == len(self.augments):
            return inputs, targets
        return self.augments[choice](inputs, targets)
