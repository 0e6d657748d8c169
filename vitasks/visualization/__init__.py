"""Drawing predictions (per-task drawers), attention maps (rollout), training samples as the
pipeline makes them (browse) and training curves from logs (log_curves)."""

from .browse import GroundTruthDrawer, browse_dataset, draw_sample
from .det_drawer import DetPredictionDrawer
from .drawers import ClsPredictionDrawer, PredictionDrawer, registered_drawers, select_drawers
from .log_curves import load_work_dir_logs, plot_curves
from .rollout import attention_rollout, fuse_heads, rollout_matrix, upsample_map
from .seg_drawer import SegPredictionDrawer, legend_layout, seg_palette
from .video_drawer import VideoPredictionDrawer

__all__ = [
    "ClsPredictionDrawer",
    "DetPredictionDrawer",
    "GroundTruthDrawer",
    "PredictionDrawer",
    "SegPredictionDrawer",
    "VideoPredictionDrawer",
    "attention_rollout",
    "browse_dataset",
    "draw_sample",
    "fuse_heads",
    "legend_layout",
    "load_work_dir_logs",
    "plot_curves",
    "registered_drawers",
    "rollout_matrix",
    "seg_palette",
    "select_drawers",
    "upsample_map",
]
