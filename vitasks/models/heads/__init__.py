from . import cls_heads  # noqa: F401
from . import decode_head, seg_heads  # noqa: F401  (segmentation helper)
from . import skip_head  # noqa: F401  (segmentation: CascadedUpHead, skips from StemSkipViT)
from . import rpn_head, rcnn_heads, roi_heads  # noqa: F401  (detection helper)
from . import video_head  # noqa: F401  (video helper)
