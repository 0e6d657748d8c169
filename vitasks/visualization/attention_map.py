"""Attention maps of a ViT over an image: rollout and per-layer class-token attention, computed
and drawn. ``tools/attention_map.py CONFIG CKPT IMAGE --out F.png`` (the ``attention-map``
command of :mod:`vitasks.cli`) builds the model through :func:`vitasks.apis.attention_map`."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from vitasks.checks import int_pair
from vitasks.errors import ConfigError, VitasksError
from vitasks.visualization.rollout import HEAD_FUSIONS, attention_rollout, upsample_map


def backbone_of(model: nn.Module) -> nn.Module:
    """The ViT of a task model (or the model itself when it is one)."""
    backbone = getattr(model, "backbone", model)
    if not hasattr(backbone, "forward_with_attention"):
        raise ConfigError(
            f"attention maps need a backbone with forward_with_attention (a VisionTransformer); "
            f"{type(model).__name__} has {type(backbone).__name__}"
        )
    return backbone


@torch.no_grad()
def compute_attention_maps(
    backbone: nn.Module,
    inputs: torch.Tensor,
    head_fusion: str = "mean",
    add_residual: bool = True,
) -> dict[str, torch.Tensor]:
    """Rollout and per-layer maps of normalised ``inputs`` (B, C, H, W), upsampled to (H, W).

    Returns ``{"rollout": (B, H, W), "layers": (B, L, H, W), "rollout_grid": (B, h, w),
    "layers_grid": (B, L, h, w)}``; upsampled maps are scaled to [0, 1] per map.
    """
    height, width = inputs.shape[-2:]
    sh, sw = int_pair(getattr(backbone, "stride", 16), f"{type(backbone).__name__}.stride")
    if height % sh or width % sw:
        raise VitasksError(f"input size {height}x{width} is not divisible by the backbone's stride {sh}x{sw}")
    grid = (height // sh, width // sw)
    transitions = None
    if getattr(backbone, "token_reduction", None) is not None:
        # A reduced token set: the rollout follows the tokens through merges and tokenizers.
        _, attentions, transitions = backbone.forward_with_attention_flow(inputs)
    else:
        _, attentions = backbone.forward_with_attention(inputs)
    num_prefix = int(getattr(backbone, "num_prefix_tokens", 1))
    class_token = getattr(backbone, "cls_token", None) is not None
    rollout, layers = attention_rollout(
        attentions, grid, num_prefix_tokens=num_prefix, class_token=class_token,
        head_fusion=head_fusion, add_residual=add_residual, transitions=transitions,
    )
    return {
        "rollout_grid": rollout,
        "layers_grid": layers,
        "rollout": upsample_map(rollout, (height, width)),
        "layers": upsample_map(layers, (height, width)),
    }


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a [0, 1] heat map (H, W) as a jet colour map over an RGB uint8 image."""
    import cv2

    colored = cv2.applyColorMap(np.clip(heat * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    colored = cv2.cvtColor(colored, cv2.COLOR_BGR2RGB)
    return np.clip((1 - alpha) * image.astype(np.float32) + alpha * colored, 0, 255).astype(np.uint8)


def save_attention_grid(
    image: np.ndarray, rollout: np.ndarray, layers: np.ndarray, out: str, title: str | None = None,
    max_cols: int = 6,
) -> None:
    """One PNG: the image, the rollout overlay, then one overlay per layer."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = [("image", image), ("rollout", overlay(image, rollout))]
    panels += [(f"layer {i + 1}", overlay(image, m)) for i, m in enumerate(layers)]
    cols = min(max_cols, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.5 * rows + (0.3 if title else 0)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, picture) in zip(axes.flat, panels):
        ax.imshow(picture)
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
