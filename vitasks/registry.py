"""The registries of vitasks: children of mmengine's root registries, scope ``vitasks``.

A config chooses a component by ``type``; mmengine's Runner looks names up in the root registry
and, because the default scope is ``vitasks``, switches to these children. ``locations`` lists
the modules that register into each child, so a lookup imports them lazily.
"""

from mmengine.registry import DATA_SAMPLERS as MMENGINE_DATA_SAMPLERS
from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import EVALUATOR as MMENGINE_EVALUATOR
from mmengine.registry import FUNCTIONS as MMENGINE_FUNCTIONS
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import LOOPS as MMENGINE_LOOPS
from mmengine.registry import METRICS as MMENGINE_METRICS
from mmengine.registry import MODEL_WRAPPERS as MMENGINE_MODEL_WRAPPERS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS as MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.registry import OPTIM_WRAPPERS as MMENGINE_OPTIM_WRAPPERS
from mmengine.registry import OPTIMIZERS as MMENGINE_OPTIMIZERS
from mmengine.registry import PARAM_SCHEDULERS as MMENGINE_PARAM_SCHEDULERS
from mmengine.registry import TRANSFORMS as MMENGINE_TRANSFORMS
from mmengine.registry import VISBACKENDS as MMENGINE_VISBACKENDS
from mmengine.registry import VISUALIZERS as MMENGINE_VISUALIZERS
from mmengine.registry import Registry

SCOPE = "vitasks"


def _child(name, parent, locations):
    return Registry(name, parent=parent, scope=SCOPE, locations=locations)


# Backbones, stems, necks, heads, losses, data preprocessors and task models.
MODELS = _child("model", MMENGINE_MODELS, ["vitasks.models"])
DATASETS = _child("dataset", MMENGINE_DATASETS, ["vitasks.data"])
TRANSFORMS = _child("transform", MMENGINE_TRANSFORMS, ["vitasks.data"])
DATA_SAMPLERS = _child("data sampler", MMENGINE_DATA_SAMPLERS, ["vitasks.data"])
METRICS = _child("metric", MMENGINE_METRICS, ["vitasks.evaluation"])
EVALUATOR = _child("evaluator", MMENGINE_EVALUATOR, ["vitasks.evaluation"])
HOOKS = _child("hook", MMENGINE_HOOKS, ["vitasks.engine"])
LOOPS = _child("loop", MMENGINE_LOOPS, ["vitasks.engine"])
OPTIMIZERS = _child("optimizer", MMENGINE_OPTIMIZERS, ["vitasks.engine"])
OPTIM_WRAPPERS = _child("optim_wrapper", MMENGINE_OPTIM_WRAPPERS, ["vitasks.engine"])
OPTIM_WRAPPER_CONSTRUCTORS = _child(
    "optimizer wrapper constructor", MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS, ["vitasks.engine"]
)
PARAM_SCHEDULERS = _child("parameter scheduler", MMENGINE_PARAM_SCHEDULERS, ["vitasks.engine"])
MODEL_WRAPPERS = _child("model_wrapper", MMENGINE_MODEL_WRAPPERS, ["vitasks.engine"])
VISUALIZERS = _child("visualizer", MMENGINE_VISUALIZERS, ["vitasks.visualization"])
# mmengine looks visualiser backends up in the default scope too; without a child it warns.
VISBACKENDS = _child("vis_backend", MMENGINE_VISBACKENDS, ["vitasks.visualization"])
FUNCTIONS = _child("function", MMENGINE_FUNCTIONS, ["vitasks.data"])

# Every child by the name users type in `vitasks list REGISTRY`.
ALL_REGISTRIES = {
    "models": MODELS,
    "datasets": DATASETS,
    "transforms": TRANSFORMS,
    "data_samplers": DATA_SAMPLERS,
    "metrics": METRICS,
    "evaluators": EVALUATOR,
    "hooks": HOOKS,
    "loops": LOOPS,
    "optimizers": OPTIMIZERS,
    "optim_wrappers": OPTIM_WRAPPERS,
    "optim_wrapper_constructors": OPTIM_WRAPPER_CONSTRUCTORS,
    "param_schedulers": PARAM_SCHEDULERS,
    "model_wrappers": MODEL_WRAPPERS,
    "visualizers": VISUALIZERS,
    "vis_backends": VISBACKENDS,
    "functions": FUNCTIONS,
}
