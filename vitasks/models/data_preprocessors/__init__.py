"""Data preprocessors: what a task model does to a collated batch before the backbone.

One module per task (:mod:`.cls`, :mod:`.seg`, :mod:`.det`, :mod:`.video`), the batch augments of classification
(:mod:`.batch_augments`) and the normalisation statistics they share (:mod:`.normalization`).
Importing the package registers them all in ``MODELS`` under their class names.
"""

from .batch_augments import CutMix, Mixup, RandomBatchAugment, RandomErasing
from .cls import ClsDataPreprocessor
from .det import DetDataPreprocessor
from .normalization import IMAGENET_MEAN, IMAGENET_STD
from .seg import SegDataPreprocessor
from .video import VideoDataPreprocessor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ClsDataPreprocessor",
    "DetDataPreprocessor",
    "CutMix",
    "Mixup",
    "RandomBatchAugment",
    "RandomErasing",
    "SegDataPreprocessor",
    "VideoDataPreprocessor",
]
