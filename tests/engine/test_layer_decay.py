import re

import pytest
import torch
from mmengine.optim import build_optim_wrapper
from torch import nn

from vitasks.engine.optimizers import LayerDecayOptimizerConstructor
from vitasks.errors import ConfigError
from vitasks.models.backbones import VisionTransformer

BASE_LR, BASE_WD, DECAY, DEPTH = 1e-3, 0.05, 0.65, 3


class TaskModel(nn.Module):
    def __init__(self, **backbone_kw):
        super().__init__()
        self.backbone = VisionTransformer(img_size=32, embed_dim=16, depth=DEPTH, num_heads=2, mlp_ratio=1.0, **backbone_kw)
        self.neck = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)


def expected_layer_id(name: str) -> int:
    """Layer ids written out independently of the backbone's get_layer_id."""
    m = re.match(r"backbone\.blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    if re.match(r"backbone\.(stem\.|pos_embed$|cls_token$|reg_token$)", name):
        return 0
    return DEPTH + 1


def param_groups(model, paramwise_cfg, optimizer=None):
    cfg = dict(optimizer=optimizer or dict(type="AdamW", lr=BASE_LR, weight_decay=BASE_WD))
    wrapper = LayerDecayOptimizerConstructor(cfg, paramwise_cfg)(model)
    return wrapper.optimizer.param_groups


def lookup(groups, param):
    found = [g for g in groups if any(p is param for p in g["params"])]
    assert len(found) <= 1
    return found[0] if found else None


def test_every_parameter_follows_the_decay_rule():
    model = TaskModel(num_reg_tokens=2, layer_scale_init_value=0.1)
    model.backbone.blocks[0].attn.qkv.weight.requires_grad_(False)  # frozen: left out
    groups = param_groups(model, dict(layer_decay_rate=DECAY, no_decay_names=["neck.weight"]))
    n_params = 0
    for name, param in model.named_parameters():
        group = lookup(groups, param)
        if not param.requires_grad:
            assert group is None, name
            continue
        n_params += 1
        lr = BASE_LR * DECAY ** (DEPTH + 1 - expected_layer_id(name))
        no_decay = param.ndim == 1 or name.split(".")[-1] in ("pos_embed", "cls_token", "reg_token") or name == "neck.weight"
        assert group["lr"] == pytest.approx(lr, rel=1e-12), name
        assert group["weight_decay"] == (0.0 if no_decay else BASE_WD), name
    assert sum(len(g["params"]) for g in groups) == n_params
    # One decayed and one non-decayed group per layer at most.
    assert len(groups) <= 2 * (DEPTH + 2)
    keys = [(g["lr"], g["weight_decay"]) for g in groups]
    assert len(keys) == len(set(keys))
    assert groups[0]["lr"] == pytest.approx(BASE_LR * DECAY ** (DEPTH + 1))


def test_head_and_final_norm_get_the_base_lr():
    model = TaskModel(pool="mean")
    groups = param_groups(model, dict(layer_decay_rate=DECAY))
    assert lookup(groups, model.head.weight)["lr"] == BASE_LR
    assert lookup(groups, model.backbone.fc_norm.weight)["lr"] == BASE_LR
    assert lookup(groups, model.backbone.fc_norm.weight)["weight_decay"] == 0.0
    assert lookup(groups, model.backbone.pos_embed)["lr"] == pytest.approx(BASE_LR * DECAY**4)


def test_model_without_layer_ids_gets_plain_groups():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    groups = param_groups(model, dict(layer_decay_rate=DECAY))
    assert len(groups) == 2
    for name, param in model.named_parameters():
        g = lookup(groups, param)
        assert g["lr"] == BASE_LR
        assert g["weight_decay"] == (0.0 if param.ndim == 1 else BASE_WD), name


def test_without_weight_decay_in_config_the_optimizer_default_applies():
    model = TaskModel()
    groups = param_groups(model, {}, optimizer=dict(type="AdamW", lr=BASE_LR))
    assert lookup(groups, model.head.weight)["weight_decay"] == 0.01  # AdamW's default
    assert lookup(groups, model.head.bias)["weight_decay"] == 0.0
    assert all(g["lr"] == BASE_LR for g in groups)


def test_built_through_mmengine_by_registry_name():
    model = TaskModel()
    cfg = dict(
        type="OptimWrapper",
        optimizer=dict(type="SGD", lr=0.1, momentum=0.9, weight_decay=1e-4),
        constructor="vitasks.LayerDecayOptimizerConstructor",
        paramwise_cfg=dict(layer_decay_rate=0.5),
    )
    wrapper = build_optim_wrapper(model, cfg)
    lrs = sorted({g["lr"] for g in wrapper.optimizer.param_groups})
    assert lrs == pytest.approx([0.1 * 0.5**k for k in range(DEPTH + 1, -1, -1)])


@pytest.mark.parametrize(
    "paramwise_cfg,optimizer,match",
    [
        (dict(layer_decay=0.65), None, "unknown keys"),
        (dict(layer_decay_rate=1.5), None, "layer_decay_rate"),
        (dict(no_decay_names="pos_embed"), None, "no_decay_names"),
        ({}, dict(type="AdamW"), "lr"),
    ],
)
def test_bad_settings(paramwise_cfg, optimizer, match):
    cfg = dict(optimizer=optimizer or dict(type="AdamW", lr=1e-3))
    with pytest.raises(ConfigError, match=match):
        LayerDecayOptimizerConstructor(cfg, paramwise_cfg)


class QueryHead(nn.Module):
    """A head with learned 2-D queries that it declares free of weight decay (timm's convention)."""

    def __init__(self):
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(4, 16))
        self.proj = nn.Linear(16, 5)

    def no_weight_decay(self):
        return {"queries"}


def test_modules_declare_their_own_no_decay_parameters():
    model = TaskModel(num_reg_tokens=1)
    model.head = QueryHead()
    groups = param_groups(model, dict(layer_decay_rate=DECAY))
    declared = {"backbone.pos_embed", "backbone.cls_token", "backbone.reg_token", "head.queries"}
    assert declared <= {name for name, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        expected = 0.0 if (param.ndim == 1 or name in declared) else BASE_WD
        assert lookup(groups, param)["weight_decay"] == expected, name
    # 2-D parameters that nobody declares keep their weight decay.
    assert lookup(groups, model.head.proj.weight)["weight_decay"] == BASE_WD
    assert lookup(groups, model.backbone.blocks[0].attn.qkv.weight)["weight_decay"] == BASE_WD


def test_deit_schedule_uses_the_declared_no_decay_rule():
    import os

    from vitasks.config import load_config

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "_base_", "schedules",
                                   "deit_300e.yaml"))
    from mmengine.registry import DefaultScope

    model = TaskModel()
    with DefaultScope.overwrite_default_scope("vitasks"):  # as the Runner sets it
        groups = build_optim_wrapper(model, cfg.optim_wrapper).optimizer.param_groups
    for name, param in model.named_parameters():
        group = lookup(groups, param)
        assert group["lr"] == pytest.approx(5.0e-4), name  # no layer-wise decay
        no_decay = param.ndim == 1 or name in ("backbone.pos_embed", "backbone.cls_token")
        assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
