"""Every shipped task config loads, validates, builds its model, and can be retargeted with
``--cfg-options data_root=DIR num_classes=K`` (the DESIGN.md contract)."""

from pathlib import Path

import pytest
import torch.nn as nn

from vitasks.benchmarks.throughput import init_on_meta
from vitasks.config import load_config, validate_config
from vitasks.registry import MODELS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TASK_CONFIGS = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml") if "_base_" not in p.parts)


def _head_classes(model: nn.Module) -> int:
    head = getattr(model, "head", None) or getattr(model, "decode_head", None) or getattr(model, "roi_head")
    return head.num_classes


def test_every_task_config_is_listed():
    assert {"cls_imagenet.yaml", "cls_imagenet_convstem.yaml", "cls_imagenet_hybrid.yaml", "seg_ade20k.yaml",
            "seg_ade20k_setr_pup.yaml", "seg_ade20k_segmenter.yaml", "demo/cls_synthetic.yaml",
            "demo/seg_synthetic.yaml"} <= set(TASK_CONFIGS)


MULTI_TASK = [n for n in TASK_CONFIGS if "multitask" in n]


@pytest.mark.parametrize("name", [n for n in TASK_CONFIGS if n not in MULTI_TASK])
def test_config_validates_builds_and_retargets(name, tmp_path):
    cfg = load_config(str(CONFIGS / name), [f"data_root={tmp_path}", "num_classes=7"])
    validate_config(cfg)
    # Every nested dataset follows the top-level data_root.
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        if cfg.get(loader):
            assert cfg[loader]["dataset"]["data_root"] == str(tmp_path), (name, loader)
    with init_on_meta():  # shapes only: the large models cost nothing to build
        model = MODELS.build(cfg.model)
    assert _head_classes(model) == 7
    assert type(model.backbone).__name__ in ("VisionTransformer", "VideoVisionTransformer")


@pytest.mark.parametrize("name", MULTI_TASK)
def test_multitask_config_retargets_each_task(name, tmp_path):
    """A multi-task config retargets each task: `<task>_data_root=DIR <task>_classes=K`."""
    cfg = load_config(str(CONFIGS / name))
    tasks = sorted(cfg.model.tasks)
    options = [f"{t}_data_root={tmp_path / t}" for t in tasks] + [f"{t}_classes={5 + i}" for i, t in enumerate(tasks)]
    cfg = load_config(str(CONFIGS / name), options)
    validate_config(cfg)
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        for task, spec in (cfg.get(loader) or {}).get("tasks", {}).items():
            assert spec["dataset"]["data_root"] == str(tmp_path / task), (name, loader, task)
    with init_on_meta():
        model = MODELS.build(cfg.model)
    for i, task in enumerate(tasks):
        assert _head_classes(model.tasks[task]) == 5 + i, task
