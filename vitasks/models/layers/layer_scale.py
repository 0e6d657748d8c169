"""LayerScale (Touvron et al. 2021, CaiT): a learned per-channel gain on a residual branch."""

import torch
from torch import nn


class LayerScale(nn.Module):
    """Multiply the last dimension by a learned vector ``gamma`` initialised to ``init_value``.

    Args:
        dim: number of channels.
        init_value: initial value of every entry of ``gamma`` (small, e.g. 1e-5, so each block
            starts close to the identity).
    """

    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma
