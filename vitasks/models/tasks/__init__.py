from . import base, classifier  # noqa: F401
from . import segmentor  # noqa: F401  (segmentation helper)
from . import detector  # noqa: F401  (detection helper)
from . import recognizer  # noqa: F401  (video helper)
from . import multitask  # noqa: F401  (multi-task helper)
