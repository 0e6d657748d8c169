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
