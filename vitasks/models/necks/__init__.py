from . import multilevel  # noqa: F401  (segmentation helper: Feature2Pyramid)
from . import simple_fpn  # noqa: F401  (ViTDet: SimpleFeaturePyramid)
