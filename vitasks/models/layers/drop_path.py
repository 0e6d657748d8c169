"""Stochastic depth: drop a residual branch for whole samples (Huang et al. 2016)."""

import torch
from torch import nn


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Zero the branch output ``x`` for a random ``drop_prob`` share of the samples in the batch.

    Kept samples are scaled by ``1 / (1 - drop_prob)`` so the expected value is unchanged; in eval
    mode (or with ``drop_prob == 0``) ``x`` is returned as it is.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    # One Bernoulli draw per sample, broadcast over every other dimension.
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep_prob)
    return x * mask.div_(keep_prob)


class DropPath(nn.Module):
    """Module form of :func:`drop_path`.

    Args:
        drop_prob: probability of dropping the branch for a sample.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"
