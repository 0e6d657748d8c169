"""A toy plugin for the runtime tests: a tiny model, dataset and metrics, registered in vitasks.

Configs written by the tests name this module under ``plugins:``, the way a user's plugin is
loaded. Everything is deterministic and fast: 8-dimensional feature vectors, a two-layer MLP.
The model's parameter names mimic a classifier (``backbone.*``, ``head.fc.*``) so that the
``load_from`` rules for task heads can be exercised.
"""

import copy
import json
import os
import signal
import time
from pathlib import Path

import torch
import yaml
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from vitasks.registry import DATASETS, HOOKS, METRICS, MODELS

def _loader(seed: int, shuffle: bool) -> dict:
    return dict(
        batch_size=4,
        num_workers=0,
        dataset=dict(type="ToyVectorDataset", length=16, seed=seed),
        sampler=dict(type="DefaultSampler", shuffle=shuffle),
    )


# A complete config: 16 training vectors, batches of 4 (4 iterations per epoch), 4 epochs.
BASE_CONFIG = dict(
    plugins=["vitasks_toy_plugin"],
    default_scope="vitasks",
    model=dict(type="ToyClassifier"),
    train_dataloader=_loader(seed=0, shuffle=True),
    train_cfg=dict(by_epoch=True, max_epochs=4, val_interval=1),
    val_dataloader=_loader(seed=1, shuffle=False),
    val_cfg=dict(),
    val_evaluator=dict(type="ToyAccuracy"),
    test_dataloader=_loader(seed=1, shuffle=False),
    test_cfg=dict(),
    test_evaluator=dict(type="ToyAccuracy"),
    test_dump=dict(type="ToyDumper"),
    optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9)),
    param_scheduler=[dict(type="MultiStepLR", milestones=[2, 3], gamma=0.5, by_epoch=True)],
    default_hooks=dict(
        checkpoint=dict(type="CheckpointHook", interval=1, save_best="toy/acc", rule="greater"),
        logger=dict(type="LoggerHook", interval=1),
    ),
    randomness=dict(seed=0),
    log_level="WARNING",
)


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and value.get("_delete_"):  # replaces, as in config files
            out[key] = {k: v for k, v in copy.deepcopy(value).items() if k != "_delete_"}
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def write_config(directory, name: str = "toy.yaml", losses: str = None, **overrides) -> str:
    """Write :data:`BASE_CONFIG` merged with ``overrides`` to ``directory/name``; with
    ``losses``, a :class:`RecordLossHook` writing to that path is added to ``custom_hooks``."""
    cfg = _merge(BASE_CONFIG, overrides)
    if losses is not None:
        cfg["custom_hooks"] = list(cfg.get("custom_hooks", [])) + [dict(type="RecordLossHook", path=str(losses))]
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def read_losses(path) -> dict:
    """``{iteration: loss}`` from a :class:`RecordLossHook` file (each iteration trained once)."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    losses = {r["iter"]: r["loss"] for r in records}
    assert len(losses) == len(records), "an iteration was trained twice"
    return losses


# Indices of the samples loaded in this process, in order: the resume tests count them.
LOADED = []

# dtypes seen inside the model's forward, per mode: the amp tests read them.
SEEN_DTYPES = {}


@DATASETS.register_module()
class ToyVectorDataset(Dataset):
    """``length`` random vectors whose label is the argmax of a fixed random projection."""

    def __init__(self, length: int = 16, dim: int = 8, num_classes: int = 3, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(length, dim, generator=gen)
        proj = torch.randn(dim, num_classes, generator=torch.Generator().manual_seed(1234))
        self.y = (self.x @ proj).argmax(1)
        self.metainfo = dict(classes=tuple(f"c{i}" for i in range(num_classes)))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx: int) -> dict:
        LOADED.append(int(idx))
        return dict(inputs=self.x[idx], data_samples=dict(gt_label=int(self.y[idx]), index=idx))


@MODELS.register_module()
class ToyClassifier(BaseModel):
    """Linear -> ReLU -> Linear, named like a vitasks classifier (``backbone``, ``head.fc``)."""

    def __init__(self, dim: int = 8, hidden: int = 16, num_classes: int = 3):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.head = nn.Module()
        self.head.fc = nn.Linear(hidden, num_classes)
        nn.init.zeros_(self.head.fc.weight)
        nn.init.zeros_(self.head.fc.bias)

    def forward(self, inputs, data_samples=None, mode: str = "tensor"):
        x = torch.stack(list(inputs)) if isinstance(inputs, (list, tuple)) else inputs
        feat = self.backbone(x)
        logits = self.head.fc(feat)
        SEEN_DTYPES[mode] = logits.dtype
        if mode == "tensor":
            return logits
        if isinstance(data_samples, dict):  # pseudo_collate turns a list of dicts into lists
            keys = list(data_samples)
            data_samples = [dict(zip(keys, v)) for v in zip(*data_samples.values())]
        labels = torch.tensor([d["gt_label"] for d in data_samples], device=logits.device)
        if mode == "loss":
            return dict(loss=F.cross_entropy(logits.float(), labels))
        preds = logits.float().argmax(1)
        return [
            dict(pred=int(p), gt=int(g), index=d["index"], scores=s.tolist())
            for p, g, d, s in zip(preds, labels, data_samples, logits.float().softmax(1))
        ]


@METRICS.register_module()
class ToyAccuracy(BaseMetric):
    """Percentage of correct predictions, reported as ``toy/acc``; also ``toy/count``."""

    default_prefix = "toy"

    def process(self, data_batch, data_samples) -> None:
        for s in data_samples:
            self.results.append(float(s["pred"] == s["gt"]))

    def compute_metrics(self, results: list) -> dict:
        return dict(acc=100.0 * sum(results) / len(results), count=float(len(results)))


@METRICS.register_module()
class ToyDumper(BaseMetric):
    """Writes one JSON line per sample to ``out_path``; reports no metric."""

    def __init__(self, out_path: str, **kwargs):
        super().__init__(**kwargs)
        self.out_path = out_path

    def process(self, data_batch, data_samples) -> None:
        for s in data_samples:
            self.results.append(dict(index=s["index"], pred=s["pred"]))

    def compute_metrics(self, results: list) -> dict:
        os.makedirs(os.path.dirname(os.path.abspath(self.out_path)), exist_ok=True)
        with open(self.out_path, "w") as f:
            for r in sorted(results, key=lambda r: r["index"]):
                f.write(json.dumps(r) + "\n")
        return {}


@HOOKS.register_module()
class RecordLossHook(Hook):
    """Appends ``{"iter", "epoch", "loss", "lr"}`` per training iteration to the JSON-lines ``path``."""

    def __init__(self, path: str):
        self.path = path

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        lr = runner.optim_wrapper.get_lr()["lr"][0]
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(iter=runner.iter, epoch=runner.epoch, loss=float(outputs["loss"].detach()), lr=lr)) + "\n")


@HOOKS.register_module()
class StopAtIterHook(Hook):
    """Stops training at iteration ``at_iter``: ``KeyboardInterrupt``, SIGTERM or a ``RuntimeError``.

    Raised in ``before_train_iter``: the iteration has not trained yet, as when Ctrl-C arrives
    while a batch is being loaded.
    """

    def __init__(self, at_iter: int, error: str = "KeyboardInterrupt"):
        self.at_iter = at_iter
        self.error = error

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        if runner.iter != self.at_iter:
            return
        if self.error == "KeyboardInterrupt":
            raise KeyboardInterrupt("simulated Ctrl-C")
        if self.error == "SIGTERM":  # what a job scheduler or torchrun sends
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the signal handler raises before this returns
        raise RuntimeError("simulated crash")
