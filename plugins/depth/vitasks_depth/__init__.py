"""vitasks plugin: monocular depth estimation.

Importing this package registers (see plugins/README.md):

- MODELS: ``DepthHead`` (an FCN head with one output channel, predicting log depth),
  ``SILogLoss`` (scale-invariant log loss, Eigen et al. 2014), ``DepthEstimator`` (the task model:
  a segmentor whose prediction is ``pred_depth``), ``DepthDataPreprocessor`` (the segmentation
  preprocessor, padding ``gt_depth`` with 0 too);
- DATASETS: ``DepthFolderDataset`` (RGB images + 16-bit PNG depth in millimetres, 0 = invalid);
- TRANSFORMS: ``LoadDepth``, ``DepthResize``, ``DepthRandomResizeCrop``, ``DepthRandomFlip``,
  ``PackDepthInputs``;
- METRICS: ``DepthMetric`` (``depth/abs_rel``, ``depth/rmse``, ``depth/delta1``).

``python -m vitasks_depth.generate OUT`` writes a small generated dataset in that layout.
"""

from .data import (DepthFolderDataset, DepthRandomFlip, DepthRandomResizeCrop, DepthResize, LoadDepth,
                   PackDepthInputs)
from .head import DepthHead, SILogLoss
from .metric import DepthMetric, depth_errors
from .model import DepthEstimator
from .preprocessor import DepthDataPreprocessor

__all__ = ["DepthHead", "SILogLoss", "DepthEstimator", "DepthDataPreprocessor", "DepthFolderDataset",
           "LoadDepth", "DepthResize", "DepthRandomResizeCrop", "DepthRandomFlip", "PackDepthInputs",
           "DepthMetric", "depth_errors"]
