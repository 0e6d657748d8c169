"""Optimizer wrapper constructors: layer-wise learning-rate decay for ViT fine-tuning.

Layer-wise lr decay (BEiT, MAE fine-tuning): the parameters of layer ``i`` (0 = embeddings,
1..depth = blocks, depth + 1 = final norm and everything outside the backbone) train with
``lr * decay ** (depth + 1 - i)``, so early layers move less than the head.
"""

import inspect
import logging
from typing import Dict, List, Optional, Tuple

import torch
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS, OPTIMIZERS
from torch import nn

from vitasks.checks import in_range, one_of, options, strings
from vitasks.errors import ConfigError
from vitasks.registry import OPTIM_WRAPPER_CONSTRUCTORS

_PARAMWISE_KEYS = ("layer_decay_rate", "no_decay_names", "weight_decay_rule")

# Which parameters get no weight decay, by the rule of the codebase a recipe comes from (besides
# the names in ``no_decay_names``, which every rule exempts too):
# - timm: 1-D parameters (biases, norms, LayerScale) and those a module declares through
#   ``no_weight_decay()`` (DeiT, MAE, VideoMAE, timm);
# - detectron2: the parameters of torch's norm modules only (``get_default_optimizer_params(
#   weight_decay_norm=0)``): biases and relative-position tables are decayed, and so are the
#   channel LayerNorms of the neck and heads (detectron2's ``LayerNorm`` is its own class, not in
#   its norm list; vitasks' ``LayerNorm2d`` plays it);
# - mmseg: 1-D parameters only (mmseg's ``LayerDecayOptimizerConstructor`` for BEiT/MAE: its
#   ``pos_embed`` / ``cls_token`` test compares full names, so those tables are decayed too);
# - names: only ``no_decay_names`` (mmengine's default constructor with ``custom_keys``).
WEIGHT_DECAY_RULES = ("timm", "detectron2", "mmseg", "names")
_TORCH_NORMS = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm1d,
    nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
)


def declared_no_decay(model: nn.Module) -> set:
    """Full names of the parameters that the model's modules declare free of weight decay.

    A module declares them, as in timm, with a ``no_weight_decay()`` method returning names
    relative to itself (the ViT: ``pos_embed``, ``cls_token``, ``reg_token``), so a new backbone
    or token type needs no change here.
    """
    names = set()
    for prefix, module in model.named_modules():
        declare = getattr(module, "no_weight_decay", None)
        if callable(declare):
            names.update(f"{prefix}.{name}" if prefix else name for name in declare())
    return names


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class LayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """Parameter groups with layer-wise lr decay and the usual no-weight-decay rule.

    ``paramwise_cfg``:

    - ``layer_decay_rate`` (float, default 1.0): the decay per layer. A parameter
      ``backbone.<rest>`` gets layer id ``model.backbone.get_layer_id(<rest>)``; any other
      parameter (heads, necks) gets ``depth + 1``; its lr is
      ``base_lr * layer_decay_rate ** (depth + 1 - layer_id)``. A model whose backbone has no
      ``get_layer_id`` gets the base lr everywhere.
    - ``no_decay_names`` (list of str): parameters whose name contains one of these also get
      weight decay 0 (besides those that always do: 1-D parameters such as biases and norms, and
      those a module declares through ``no_weight_decay()``, see :func:`declared_no_decay`:
      the ViT's ``pos_embed``, ``cls_token`` and ``reg_token``).
    - ``weight_decay_rule`` (``timm`` default, ``detectron2``, ``mmseg`` or ``names``): which
      parameters are exempt besides ``no_decay_names`` (see ``WEIGHT_DECAY_RULES``): ``timm``
      as above; ``detectron2`` the parameters of torch norm modules but not of the channel
      ``LayerNorm2d`` (ViTDet's rule: biases and relative-position tables decay); ``mmseg``
      1-D parameters only; ``names`` none.

    Frozen parameters (``requires_grad=False``) are left out. Parameters with the same (lr
    scale, weight decay) share one group; each group also carries ``lr_scale``.

    Example::

        optim_wrapper:
          optimizer: {type: AdamW, lr: 5.0e-4, weight_decay: 0.05}
          constructor: LayerDecayOptimizerConstructor
          paramwise_cfg: {layer_decay_rate: 0.65}
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None) -> None:
        options(optim_wrapper_cfg, "optim_wrapper", what="a dict with an `optimizer` (e.g. {type: AdamW, lr: 1e-3})",
                required=("optimizer",))
        paramwise_cfg = options({} if paramwise_cfg is None else paramwise_cfg, "optim_wrapper.paramwise_cfg",
                                _PARAMWISE_KEYS, owner="LayerDecayOptimizerConstructor")
        key = "optim_wrapper.paramwise_cfg."
        rate = in_range(paramwise_cfg.get("layer_decay_rate", 1.0), key + "layer_decay_rate", 0, 1, low_open=True)
        names = strings(paramwise_cfg.get("no_decay_names", []), key + "no_decay_names")
        rule = one_of(paramwise_cfg.get("weight_decay_rule", "timm"), WEIGHT_DECAY_RULES, key + "weight_decay_rule")
        super().__init__(optim_wrapper_cfg, paramwise_cfg)
        self.weight_decay_rule = rule
        if self.base_lr is None:
            raise ConfigError("optim_wrapper.optimizer.lr is required by LayerDecayOptimizerConstructor")
        self.layer_decay_rate = float(rate)
        self.no_decay_names = tuple(names)

    def __call__(self, model: nn.Module) -> OptimWrapper:
        if is_model_wrapper(model):
            model = model.module
        optim_wrapper_cfg = self.optim_wrapper_cfg.copy()
        optim_wrapper_cfg.setdefault("type", "OptimWrapper")
        optimizer_cfg = self.optimizer_cfg.copy()
        optimizer_cls = optimizer_cfg["type"]
        if isinstance(optimizer_cls, str):
            with OPTIMIZERS.switch_scope_and_registry(None) as registry:
                optimizer_cls = registry.get(optimizer_cls)
        if optimizer_cls is None:
            raise ConfigError(f"optim_wrapper.optimizer.type: unknown optimizer {self.optimizer_cfg['type']!r}")
        # Most optimizers take `params`; some (e.g. colossalai's) name it differently.
        first_arg = next(iter(inspect.signature(optimizer_cls).parameters))
        params: List[dict] = []
        self.add_params(params, model)
        optimizer_cfg[first_arg] = params
        optimizer = OPTIMIZERS.build(optimizer_cfg)
        return OPTIM_WRAPPERS.build(optim_wrapper_cfg, default_args=dict(optimizer=optimizer))

    def _no_decay(self, name: str, param: torch.Tensor, declared: set) -> bool:
        if any(key in name for key in self.no_decay_names):
            return True
        if self.weight_decay_rule == "timm":
            return param.ndim <= 1 or name in declared
        if self.weight_decay_rule == "mmseg":
            return param.ndim <= 1
        if self.weight_decay_rule == "detectron2":
            return name in declared
        return False

    def _exempt(self, module: nn.Module) -> set:
        """The names ``_no_decay`` reads as ``declared`` under this constructor's rule."""
        if self.weight_decay_rule == "timm":
            return declared_no_decay(module)
        if self.weight_decay_rule == "detectron2":
            from vitasks.models.layers.norm import LayerNorm2d

            return {
                f"{prefix}.{name}" if prefix else name
                for prefix, sub in module.named_modules()
                if isinstance(sub, _TORCH_NORMS) and not isinstance(sub, LayerNorm2d)
                for name, _ in sub.named_parameters(recurse=False)
            }
        return set()

    def add_params(self, params: List[dict], module: nn.Module, **kwargs) -> None:
        """Append the parameter groups of ``module`` (the task model) to ``params``."""
        backbone = getattr(module, "backbone", None)
        get_layer_id = getattr(backbone, "get_layer_id", None)
        depth = getattr(backbone, "depth", None)
        use_layers = callable(get_layer_id) and isinstance(depth, int)
        if self.layer_decay_rate != 1.0 and not use_layers:
            print_log(
                "LayerDecayOptimizerConstructor: the model has no backbone.get_layer_id / backbone.depth; "
                "layer_decay_rate is not applied",
                logger="current",
                level=logging.WARNING,
            )
        declared = self._exempt(module)
        groups: Dict[Tuple[float, Optional[float]], dict] = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            scale = 1.0
            if use_layers:
                layer_id = get_layer_id(name[len("backbone."):]) if name.startswith("backbone.") else depth + 1
                scale = self.layer_decay_rate ** (depth + 1 - layer_id)
            # Without weight_decay in the optimizer config the decayed groups keep the
            # optimizer's own default; the no-decay ones get 0 explicitly.
            wd = 0.0 if self._no_decay(name, param, declared) else self.base_wd
            key = (scale, wd)
            if key not in groups:
                groups[key] = dict(params=[], lr=self.base_lr * scale, lr_scale=scale)
                if wd is not None:
                    groups[key]["weight_decay"] = wd
            groups[key]["params"].append(param)
        # Smallest lr first: the embedding layer, then the blocks in order, then the head;
        # within a layer the decayed group first.
        params.extend(groups[k] for k in sorted(groups, key=lambda k: (k[0], k[1] == 0.0)))
