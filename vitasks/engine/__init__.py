from . import optimizers  # noqa: F401  (backbone helper: LayerDecayOptimizerConstructor)
from . import amp, checkpoint, distributed, hooks, runner  # noqa: F401,E402  (runtime helper)
