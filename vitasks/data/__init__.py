from . import seeding  # noqa: F401  (seeded samplers)
from . import randaugment  # noqa: F401  (timm's RandAugment)
from . import imagenet, transforms  # noqa: F401
from . import ade, seg_transforms  # noqa: F401  (segmentation helper)
from . import coco, det_transforms  # noqa: F401  (detection helper)
from . import video, video_transforms  # noqa: F401  (video data helper)
