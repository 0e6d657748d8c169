"""Drawing predictions (per-task drawers) and attention maps (rollout)."""

from .drawers import ClsPredictionDrawer, PredictionDrawer, registered_drawers, select_drawers
from .rollout import attention_rollout, fuse_heads, rollout_matrix, upsample_map

__all__ = [
    "ClsPredictionDrawer",
    "PredictionDrawer",
    "attention_rollout",
    "fuse_heads",
    "registered_drawers",
    "rollout_matrix",
    "select_drawers",
    "upsample_map",
]
