"""Fewer tokens, measured: several models timed side by side (``tools/bench_tokens.py``) and the
demos' accuracy against speed per token reduction (``tools/token_tradeoff.py``, docs/tokens.md).

Timing on a shared CPU: every variant runs in ONE process, round-robin over the variants for
several rounds, and each variant's images/s is its batch over the median time of its batches.
A change of the machine's load during the run then slows every variant alike, and the ratios
to the plain model (the numbers to read) stay comparable. Other processes only ever add time,
so the ratio of the fastest batches is reported too: on a busy machine it is the closer
estimate of what each variant costs on a quiet one. The load average is recorded with every
run; :func:`wait_for_quiet` can hold the start until the machine is quieter.

The demo trade-off (:func:`run_tradeoff`) trains the plain demo and each token variant that has
parameters (TokenLearner, visual tokens), evaluates each with the test loop (the same numbers
``tools/test.py`` prints), applies ToMe at several ``r`` to the plain checkpoint without
retraining, and compares every variant's predictions with the plain model's (agreement: the
share of validation images with the same top-1 class; for segmentation the share of pixels
with the same label).
"""

from __future__ import annotations

import json
import os
import os.path as osp
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from vitasks.benchmarks.machine import load_average
from vitasks.checks import one_of
from vitasks.errors import CheckpointError, ConfigError
from vitasks.last_checkpoint import LAST_CHECKPOINT, read_last_checkpoint

DEMO_CONFIGS = {
    "cls": "configs/demo/cls_synthetic{}.yaml",
    "seg": "configs/demo/seg_synthetic{}.yaml",
}
#: ToMe's r per block applied to the plain demo checkpoint (cls: 8 x 8 patch tokens; seg: 12 x 12).
DEFAULT_TOME_R = {"cls": (4, 8, 16), "seg": (8, 16, 32)}
#: The metric the table reports per task (names as in metrics.json).
MAIN_METRIC = {"cls": "accuracy/top1", "seg": "mIoU"}


# ------------------------------------------------------------------------------------ timing


def interleaved_times(
    steps: Mapping[str, Callable[[], object]], rounds: int, iters: int = 1, warmup: int = 1
) -> Dict[str, List[float]]:
    """Wall time of each call in ``steps`` ({name: step}), measured round-robin: ``warmup``
    untimed calls each, then ``rounds`` rounds in which every step runs ``iters`` timed times.
    Returns {name: [seconds per call]}."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            for _ in range(iters):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return times


def wait_for_quiet(max_load: Optional[float], timeout_s: float = 1800.0, poll_s: float = 20.0) -> Tuple[float, float]:
    """Wait until the 1-minute load average is at most ``max_load`` (None: don't wait), at most
    ``timeout_s``. Returns (the load average at the start of the measurement, seconds waited)."""
    start = time.monotonic()
    while max_load is not None and (load_average() or [0.0])[0] > max_load and time.monotonic() - start < timeout_s:
        time.sleep(poll_s)
    return (load_average() or [0.0])[0], time.monotonic() - start


def images_per_second(models: Mapping[str, torch.nn.Module], inputs: torch.Tensor, rounds: int, iters: int = 1,
                      warmup: int = 1) -> Tuple[Dict[str, float], Dict[str, List[float]]]:
    """Inference images/s of each model on ``inputs`` (``model(inputs, mode="tensor")`` without
    gradients), interleaved. Returns ({name: images/s}, {name: [seconds per batch]})."""

    def step(model: torch.nn.Module) -> Callable[[], object]:
        def run():
            with torch.no_grad():
                return model(inputs, mode="tensor")

        return run

    times = interleaved_times({name: step(m) for name, m in models.items()}, rounds, iters, warmup)
    return {name: inputs.shape[0] / statistics.median(t) for name, t in times.items()}, times


# -------------------------------------------------------------------------------- agreement


def cls_agreement(reference_jsonl: str, other_jsonl: str) -> float:
    """Percent of images with the same top-1 class in two classification dumps (JSON lines
    ``{"file", "pred", ...}`` as ``tools/test.py --dump`` writes them), matched by file."""
    ref, other = _read_cls_dump(reference_jsonl), _read_cls_dump(other_jsonl)
    _same_images(ref, other, reference_jsonl, other_jsonl, "predictions")
    return 100.0 * sum(ref[f] == other[f] for f in ref) / max(len(ref), 1)


def _same_images(names: Iterable[str], other: Iterable[str], where: str, other_where: str, what: str) -> None:
    """Two dumps to compare must cover the same images."""
    if set(names) != set(other):
        raise ConfigError(f"{where} and {other_where} hold {what} for different images")


def _read_cls_dump(path: str) -> Dict[str, int]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {row["file"]: int(row["pred"]) for row in rows}


def seg_agreement(reference_dir: str, other_dir: str) -> float:
    """Percent of pixels with the same label in two segmentation dumps (one PNG label map per
    image, as ``tools/test.py --dump`` writes them), matched by relative path."""
    from PIL import Image

    names = sorted(_pngs(reference_dir))
    _same_images(names, _pngs(other_dir), reference_dir, other_dir, "label maps")
    same = total = 0
    for name in names:
        a = np.asarray(Image.open(osp.join(reference_dir, name)))
        b = np.asarray(Image.open(osp.join(other_dir, name)))
        same += int((a == b).sum())
        total += a.size
    return 100.0 * same / max(total, 1)


def _pngs(folder: str) -> List[str]:
    return [osp.relpath(osp.join(root, f), folder) for root, _, files in os.walk(folder) for f in files
            if f.endswith(".png")]


# -------------------------------------------------------------------------- demo trade-off


@dataclass
class Variant:
    """One row of the trade-off table: a config (+ overrides) and whose checkpoint it runs.
    ``weights_of`` names the variant whose training gives the weights (itself: trained)."""

    name: str
    config: str
    weights_of: str
    options: List[str] = field(default_factory=list)

    @property
    def trained(self) -> bool:
        return self.weights_of == self.name


def demo_variants(kind: str, tome_r: Sequence[int]) -> List[Variant]:
    """The plain demo of ``kind`` (cls, seg), its TokenLearner and visual-token variants
    (trained) and ToMe at each ``r`` on the plain checkpoint (not retrained)."""
    path = DEMO_CONFIGS[one_of(kind, sorted(DEMO_CONFIGS), "demo kind")].format
    variants = [
        Variant("plain", path(""), "plain"),
        Variant("TokenLearner", path("_tokenlearner"), "TokenLearner"),
        Variant("visual tokens", path("_vt"), "visual tokens"),
    ]
    variants += [
        Variant(f"ToMe r={r} (plain weights)", path("_tome"), "plain", [f"model.backbone.token_reduction.r={r}"])
        for r in tome_r
    ]
    return variants


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def run_tradeoff(
    kind: str,
    work_dir: str,
    tome_r: Optional[Sequence[int]] = None,
    train_options: Sequence[str] = (),
    options: Sequence[str] = (),
    retrain: bool = False,
    rounds: int = 5,
    batch_size: Optional[int] = None,
    max_load: Optional[float] = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train (where no checkpoint exists yet, or ``retrain``), evaluate and time the demo
    variants of ``kind``; return the table as a dict (also written to ``work_dir/tradeoff.json``).

    ``options`` (``KEY=VALUE``) apply to every variant (e.g. ``data_root=DIR``);
    ``train_options`` to the training only (e.g. a shorter schedule for a quick look).
    Images/s: ``batch_size`` (default: the test loader's) random images at the config's
    ``img_size``, every variant in this process, interleaved over ``rounds`` rounds."""
    from vitasks.apis import init_model
    from vitasks.engine import launch

    variants = demo_variants(kind, tome_r if tome_r is not None else DEFAULT_TOME_R[kind])
    checkpoints: Dict[str, str] = {}
    for v in variants:
        if not v.trained:
            continue
        train_dir = osp.join(work_dir, _slug(v.name), "train")
        ckpt = None if retrain else read_last_checkpoint(train_dir, required=False)
        if ckpt is None or not osp.isfile(ckpt):  # not trained yet, or its checkpoint is gone
            log(f"[{v.name}] training {v.config} in {train_dir}")
            launch.train(v.config, work_dir=train_dir, cfg_options=[*options, *v.options, *train_options])
            ckpt = read_last_checkpoint(train_dir)
            if not osp.isfile(ckpt):
                raise CheckpointError(
                    f"training {v.config} in {train_dir} left {osp.join(train_dir, LAST_CHECKPOINT)} "
                    f"naming {ckpt!r}, which does not exist"
                )
        checkpoints[v.name] = ckpt

    rows = []
    for v in variants:
        test_dir = osp.join(work_dir, _slug(v.name), "test")
        dump = osp.join(test_dir, "predictions.jsonl" if kind == "cls" else "label_maps")
        log(f"[{v.name}] evaluating {v.config} {' '.join(v.options)} with {checkpoints[v.weights_of]}")
        metrics = launch.test(v.config, checkpoints[v.weights_of], work_dir=test_dir, dump=dump,
                              cfg_options=[*options, *v.options])
        rows.append(dict(name=v.name, config=v.config, options=v.options, checkpoint=checkpoints[v.weights_of],
                         trained=v.trained, metrics=metrics, dump=dump))
    reference = rows[0]["dump"]
    agree = cls_agreement if kind == "cls" else seg_agreement
    for row in rows:
        row["agreement"] = agree(reference, row["dump"])

    models = {v.name: init_model(v.config, checkpoints[v.weights_of], cfg_options=[*options, *v.options])
              for v in variants}
    cfg = models["plain"].cfg
    size = int(cfg.get("img_size", 224))
    batch = batch_size or int(cfg.test_dataloader.batch_size)
    torch.manual_seed(0)
    inputs = torch.randn(batch, 3, size, size)
    load, waited = wait_for_quiet(max_load)
    ips, times = images_per_second(models, inputs, rounds)
    load_after = (load_average() or [0.0])[0]
    for row in rows:
        row["images_per_s"] = ips[row["name"]]
        row["speedup"] = ips[row["name"]] / ips["plain"]
        row["speedup_fastest"] = min(times["plain"]) / min(times[row["name"]])
        row["times_s"] = times[row["name"]]
    result = dict(kind=kind, metric=MAIN_METRIC[kind], batch_size=batch, img_size=size, rounds=rounds,
                  threads=torch.get_num_threads(), load_average=[load, load_after], waited_s=waited, rows=rows)
    os.makedirs(work_dir, exist_ok=True)
    with open(osp.join(work_dir, "tradeoff.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def format_tradeoff(result: dict) -> str:
    """The trade-off as a Markdown table (one row per variant)."""
    metric = result["metric"]
    lines = [
        f"| variant | weights | {metric} | agreement with plain | images/s | vs plain | vs plain, fastest batches |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        weights = "trained with it" if row["trained"] else "plain model's"
        lines.append(
            f"| {row['name']} | {weights} | {row['metrics'][metric]:.2f} | {row['agreement']:.1f} % | "
            f"{row['images_per_s']:.1f} | {row['speedup']:.2f}x | {row['speedup_fastest']:.2f}x |"
        )
    load = result["load_average"]
    lines.append("")
    lines.append(
        f"(batch {result['batch_size']} at {result['img_size']} px, fp32, {result['threads']} threads, "
        f"{result['rounds']} interleaved rounds, images/s from the median batch; load average {load[0]:.1f} -> "
        f"{load[1]:.1f})"
    )
    return "\n".join(lines)


__all__ = [
    "DEFAULT_TOME_R", "Variant", "cls_agreement", "demo_variants", "format_tradeoff", "images_per_second",
    "interleaved_times", "run_tradeoff", "seg_agreement", "wait_for_quiet",
]
