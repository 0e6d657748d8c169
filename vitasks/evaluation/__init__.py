from . import accuracy, dump  # noqa: F401
from . import iou  # noqa: F401  (segmentation helper)
from . import coco  # noqa: F401  (detection helper)
from . import video  # noqa: F401  (video data helper)
