from . import base, classifier  # noqa: F401
from . import segmentor  # noqa: F401  (segmentation helper)
