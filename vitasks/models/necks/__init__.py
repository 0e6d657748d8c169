from . import multilevel  # noqa: F401  (segmentation helper: Feature2Pyramid)
from . import simple_fpn  # noqa: F401  (ViTDet: SimpleFeaturePyramid)
from . import multilevel_neck  # noqa: F401  (mmseg ViT: MultiLevelNeck)
