from . import data_preprocessors, losses  # noqa: F401  (classification helper)
from . import heads, tasks  # noqa: F401  (classification helper: registers heads and task models)
from . import backbones, layers  # noqa: F401  (backbone helper: registers the ViT and its stems)
from . import necks  # noqa: F401  (segmentation helper)
