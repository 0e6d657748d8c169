from . import multilevel  # noqa: F401  (segmentation helper: Feature2Pyramid)
