"""The transformer feed-forward block, and the activations a config may choose for it."""

import functools
from typing import Callable, Optional

import torch
from torch import nn

from vitasks.checks import one_of

#: MLP activations by config name. ``gelu`` is the exact (erf) GELU of PyTorch/timm-trained
#: models; ``gelu_tanh`` the tanh approximation 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))),
#: which JAX's ``nn.gelu`` computes by default (so Google's ViT checkpoints were trained with it).
MLP_ACTS = {
    "gelu": nn.GELU,
    "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"),
}


def mlp_act_layer(name: str, key: str = "mlp_act") -> Callable[[], nn.Module]:
    """The activation-module factory for config name ``name`` (one of :data:`MLP_ACTS`); an
    unknown name raises a ConfigError naming ``key`` (the config key it came from)."""
    return MLP_ACTS[one_of(name, list(MLP_ACTS), key)]


class Mlp(nn.Module):
    """Linear -> activation -> dropout -> linear -> dropout.

    Args:
        in_features: input width.
        hidden_features: hidden width (default: ``in_features``).
        out_features: output width (default: ``in_features``).
        act_layer: activation module factory (GELU, as ViT; see :func:`mlp_act_layer`).
        drop: dropout after the activation and after the second linear layer.
        bias: whether the linear layers have a bias.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
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
