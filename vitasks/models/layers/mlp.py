"""The transformer feed-forward block."""

from typing import Optional, Type

import torch
from torch import nn


class Mlp(nn.Module):
    """Linear -> activation -> dropout -> linear -> dropout.

    Args:
        in_features: input width.
        hidden_features: hidden width (default: ``in_features``).
        out_features: output width (default: ``in_features``).
        act_layer: activation module class (GELU, as ViT).
        drop: dropout after the activation and after the second linear layer.
        bias: whether the linear layers have a bias.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer: Type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))
