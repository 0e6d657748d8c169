"""Drawing predictions (per-task drawers) and attention maps (rollout)."""

from .drawers import ClsPredictionDrawer, PredictionDrawer, registered_drawers, select_drawers
from .rollout import attention_rollout, fuse_heads, rollout_matrix, upsample_map
from .seg_drawer import SegPredictionDrawer, legend_layout, seg_palette

__all__ = [
    "ClsPredictionDrawer",
    "PredictionDrawer",
    "SegPredictionDrawer",
    "attention_rollout",
    "fuse_heads",
    "legend_layout",
    "registered_drawers",
    "rollout_matrix",
    "seg_palette",
    "select_drawers",
    "upsample_map",
]
