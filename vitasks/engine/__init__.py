from . import optimizers  # noqa: F401  (backbone helper: LayerDecayOptimizerConstructor)
from . import amp, checkpoint, distributed, hooks, runner  # noqa: F401,E402  (runtime helper)
from . import multitask_loop  # noqa: F401,E402  (multi-task helper: MultiTaskTrainLoop, MultiTaskValLoop)
