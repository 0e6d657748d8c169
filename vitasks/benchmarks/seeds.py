"""One recipe over several seeds, with the plain CNN beside it: what ``tools/seeds.py`` runs.

On a few hundred images one seeded training run is not a measurement: the same recipe scores up
to 20 points apart with ``randomness.seed`` 0 and 1. This trains a config once per seed, each run
in a process of its own (``tools/train.py``, ``--jobs`` at a time), scores each run's last
checkpoint with ``tools/test.py`` (its ``metrics.json``: exactly what a user would read), and
optionally trains ``tools/cnn_baseline.py`` with the same seeds. The result is a Markdown table,
one row per seed, then the mean, min and max over the seeds.

Layout of the work dir ``D``: ``D/seed<s>/`` is the training work dir (checkpoints,
``last_checkpoint``, ``train.log``: the process's output), ``D/seed<s>/test/metrics.json`` the
scores (``test.log``), ``D/seed<s>/baseline.json`` the plain CNN's (``baseline.log``).
"""

from __future__ import annotations

import json
import math
import os
import os.path as osp
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from vitasks.errors import CheckpointError
from vitasks.last_checkpoint import read_last_checkpoint

__all__ = [
    "MAIN_METRICS", "BASELINE_TASKS", "SeedsOptions", "train_command", "test_command", "baseline_command",
    "main_metric_names", "summarize", "markdown_table", "run_seeds", "threads_per_job",
]

# Each task's headline metric (DESIGN's metric names); a multi-task model reports them prefixed
# with the task's name (`cls/accuracy/top1`) and their `mean`.
MAIN_METRICS = ("accuracy/top1", "mIoU", "coco/bbox_mAP_50", "acc/top1")
MULTITASK_MEAN = "mean"
BASELINE_PREFIX = "baseline "
BASELINE_TASKS = ("cls", "seg", "video")  # tools/cnn_baseline.py's tasks
STATS = ("mean", "min", "max")


@dataclass
class SeedsOptions:
    """What ``tools/seeds.py`` was asked for (see its ``--help``)."""

    config: str
    data_root: str
    num_classes: int
    seeds: Sequence[int]
    work_dir: str
    tools_dir: str
    baseline: Optional[str] = None  # "cls" | "seg" | "video"
    baseline_epochs: Optional[int] = None
    jobs: int = 1
    cfg_options: Sequence[str] = ()
    metrics: Optional[Sequence[str]] = None  # None: the main ones; ["all"]: every number


@dataclass
class SeedRun:
    seed: int
    work_dir: str
    metrics: Optional[Dict[str, Optional[float]]] = None
    baseline: Optional[Dict[str, Optional[float]]] = None
    errors: List[str] = field(default_factory=list)
    logs: Dict[str, str] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)


def seed_work_dir(work_dir: str, seed: int) -> str:
    return osp.join(work_dir, f"seed{seed}")


def _retarget(data_root: str, num_classes: int, seed: int, cfg_options: Sequence[str]) -> List[str]:
    return ["--cfg-options", f"data_root={data_root}", f"num_classes={num_classes}",
            f"randomness.seed={seed}", *cfg_options]


def train_command(tools_dir: str, config: str, work_dir: str, data_root: str, num_classes: int,
                  seed: int, cfg_options: Sequence[str] = ()) -> List[str]:
    """``tools/train.py CONFIG --work-dir WORK_DIR/seed<s> --cfg-options data_root=... num_classes=K
    randomness.seed=s [cfg_options]`` with this interpreter."""
    return [sys.executable, osp.join(tools_dir, "train.py"), config,
            "--work-dir", seed_work_dir(work_dir, seed),
            *_retarget(data_root, num_classes, seed, cfg_options)]


def test_command(tools_dir: str, config: str, checkpoint: str, work_dir: str, data_root: str,
                 num_classes: int, seed: int, cfg_options: Sequence[str] = ()) -> List[str]:
    """``tools/test.py CONFIG CKPT --work-dir WORK_DIR/seed<s>/test`` with the training run's options."""
    return [sys.executable, osp.join(tools_dir, "test.py"), config, checkpoint,
            "--work-dir", osp.join(seed_work_dir(work_dir, seed), "test"),
            *_retarget(data_root, num_classes, seed, cfg_options)]


def baseline_command(tools_dir: str, task: str, data_root: str, seed: int, json_path: str,
                     num_classes: Optional[int] = None, epochs: Optional[int] = None) -> List[str]:
    """``tools/cnn_baseline.py {cls,seg,video} DATA --seed s --json OUT`` (seg, video:
    ``--num-classes K``)."""
    argv = [sys.executable, osp.join(tools_dir, "cnn_baseline.py"), task, data_root,
            "--seed", str(seed), "--json", json_path]
    if task in ("seg", "video") and num_classes is not None:
        argv += ["--num-classes", str(num_classes)]
    if epochs is not None:
        argv += ["--epochs", str(epochs)]
    return argv


def threads_per_job(jobs: int, environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """``OMP_NUM_THREADS`` for each process: the cores this process may use shared among ``jobs``;
    None (the environment's) when ``OMP_NUM_THREADS`` is already set."""
    if environ.get("OMP_NUM_THREADS"):
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return str(max(1, cores // max(1, jobs)))


def main_metric_names(metrics: Mapping[str, object]) -> List[str]:
    """The headline metrics in a ``metrics.json``, in its order: each task's main metric, also
    prefixed by a multi-task model's task names, and a multi-task ``mean``."""
    return [name for name in metrics
            if name == MULTITASK_MEAN or any(name == m or name.endswith("/" + m) for m in MAIN_METRICS)]


def _numbers(metrics: Mapping[str, object]) -> Dict[str, Optional[float]]:
    """The numeric entries (None where metrics.json holds null: NaN)."""
    return {k: v for k, v in metrics.items()
            if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))}


def summarize(rows: Sequence[Mapping[str, Optional[float]]], columns: Sequence[str]) -> Dict[str, Dict[str, Optional[float]]]:
    """``{"mean"|"min"|"max": {column: value}}`` over the rows that have a number in the column
    (None where no row has one)."""
    out: Dict[str, Dict[str, Optional[float]]] = {stat: {} for stat in STATS}
    for col in columns:
        values = [float(r[col]) for r in rows
                  if r.get(col) is not None and not math.isnan(float(r[col]))]
        out["mean"][col] = math.fsum(values) / len(values) if values else None
        out["min"][col] = min(values) if values else None
        out["max"][col] = max(values) if values else None
    return out


def format_number(value: Optional[float]) -> str:
    """Four significant digits (percentages to two decimals, COCO's fractions to four)."""
    return "n/a" if value is None else f"{value:.4g}"


def markdown_table(rows: Sequence[Mapping[str, Optional[float]]], labels: Sequence[str],
                   columns: Sequence[str], summary: Mapping[str, Mapping[str, Optional[float]]],
                   notes: Optional[Mapping[str, str]] = None) -> str:
    """One row per label (``rows[i]`` holds its numbers, n/a where it has none), then the
    ``summary`` rows; with ``notes`` (``{label: text}``, e.g. a failure and its log) a last column
    holds them."""
    notes = notes or {}
    head = ["seed", *columns] + (["note"] if notes else [])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label, row in zip(labels, rows):
        cells = [label, *(format_number(row.get(c)) for c in columns)] + ([notes.get(label, "")] if notes else [])
        lines.append("| " + " | ".join(cells) + " |")
    for stat in STATS:
        cells = [stat, *(format_number(summary[stat].get(c)) for c in columns)] + ([""] if notes else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


class _Runner:
    """Runs the commands of every seed, ``jobs`` processes at a time, each writing its output to
    its log file; progress lines go to ``log``."""

    def __init__(self, opts: SeedsOptions, log: Callable[[str], None]) -> None:
        self.opts = opts
        self.log = log
        self.lock = threading.Lock()
        self.env = dict(os.environ)
        threads = threads_per_job(opts.jobs)
        if threads is not None:
            self.env["OMP_NUM_THREADS"] = threads

    def _say(self, text: str) -> None:
        with self.lock:
            self.log(text)

    def _run(self, run: SeedRun, step: str, argv: List[str]) -> bool:
        log_path = osp.join(run.work_dir, f"{step}.log")
        run.logs[step] = log_path
        self._say(f"seed {run.seed} {step}: started (log {log_path})")
        start = time.perf_counter()
        with open(log_path, "w", encoding="utf-8") as out:
            out.write("$ " + " ".join(argv) + "\n")
            out.flush()
            code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env).returncode
        run.seconds[step] = round(time.perf_counter() - start, 1)
        if code != 0:
            message = f"{step} exited with {code}, see {log_path}"
            run.errors.append(message)
            self._say(f"seed {run.seed} {step}: FAILED ({message})")
            return False
        self._say(f"seed {run.seed} {step}: done in {run.seconds[step]:.0f} s")
        return True

    def train_and_test(self, run: SeedRun) -> None:
        o = self.opts
        argv = train_command(o.tools_dir, o.config, o.work_dir, o.data_root, o.num_classes, run.seed, o.cfg_options)
        if not self._run(run, "train", argv):
            return
        try:
            checkpoint = read_last_checkpoint(run.work_dir)
        except CheckpointError as err:
            run.errors.append(f"train: {err}; see {run.logs['train']}")
            return
        argv = test_command(o.tools_dir, o.config, checkpoint, o.work_dir, o.data_root, o.num_classes,
                            run.seed, o.cfg_options)
        if not self._run(run, "test", argv):
            return
        path = osp.join(run.work_dir, "test", "metrics.json")
        try:
            run.metrics = _numbers(_read_json(path))
        except (OSError, ValueError) as err:
            run.errors.append(f"test: cannot read {path} ({err}), see {run.logs['test']}")

    def baseline(self, run: SeedRun) -> None:
        o = self.opts
        path = osp.join(run.work_dir, "baseline.json")
        argv = baseline_command(o.tools_dir, o.baseline, o.data_root, run.seed, path, o.num_classes,
                                o.baseline_epochs)
        if not self._run(run, "baseline", argv):
            return
        try:
            run.baseline = _numbers(_read_json(path))
        except (OSError, ValueError) as err:
            run.errors.append(f"baseline: cannot read {path} ({err}), see {run.logs['baseline']}")


def _pick(metrics: Mapping[str, object], wanted: Optional[Sequence[str]]) -> List[str]:
    """The names to show from one run's metrics: ``wanted`` (``["all"]``: every number), else the
    main metrics, else every number (a baseline's ``seconds`` is not a score)."""
    every = [m for m in metrics if m != "seconds"]
    if wanted and list(wanted) == ["all"]:
        return every
    if wanted:
        return [m for m in wanted if m in metrics] or main_metric_names(metrics)
    return main_metric_names(metrics) or every


def _union(groups: Sequence[Sequence[str]]) -> List[str]:
    out: List[str] = []
    for group in groups:
        out += [name for name in group if name not in out]
    return out


def _columns(runs: Sequence[SeedRun], wanted: Optional[Sequence[str]], baseline: bool) -> List[str]:
    if wanted and list(wanted) != ["all"]:
        columns = list(wanted)  # shown even where no run has them
    else:
        columns = _union([_pick(r.metrics or {}, wanted) for r in runs])
    if baseline:
        columns += [BASELINE_PREFIX + n for n in _union([_pick(r.baseline or {}, wanted) for r in runs])]
    return columns


def _row(run: SeedRun) -> Dict[str, Optional[float]]:
    row: Dict[str, Optional[float]] = dict(run.metrics or {})
    row.update({BASELINE_PREFIX + k: v for k, v in (run.baseline or {}).items()})
    return row


def report(opts: SeedsOptions, runs: Sequence[SeedRun]) -> dict:
    """Everything about the runs (what ``--json`` writes), with the table's columns, the summary
    and the Markdown table."""
    columns = _columns(runs, opts.metrics, opts.baseline is not None)
    rows = [_row(r) for r in runs]
    summary = summarize(rows, columns)
    notes = {str(r.seed): "failed: " + "; ".join(r.errors) for r in runs if r.errors}
    table = markdown_table(rows, [str(r.seed) for r in runs], columns, summary, notes)
    return {
        "config": opts.config,
        "data_root": opts.data_root,
        "num_classes": opts.num_classes,
        "cfg_options": list(opts.cfg_options),
        "baseline": opts.baseline,
        "work_dir": opts.work_dir,
        "columns": columns,
        "runs": [
            {"seed": r.seed, "ok": not r.errors, "work_dir": r.work_dir, "metrics": r.metrics,
             "baseline": r.baseline, "errors": r.errors, "logs": r.logs, "seconds": r.seconds}
            for r in runs
        ],
        "summary": summary,
        "table": table,
    }


def run_seeds(opts: SeedsOptions, log: Callable[[str], None] = print) -> dict:
    """Train (and test, and optionally train the baseline) once per seed; returns :func:`report`'s
    dict. A failed step is recorded in its seed's ``errors`` with its log's path; the other seeds
    still run."""
    if opts.baseline not in (None, *BASELINE_TASKS):
        raise ValueError(f"baseline must be one of {', '.join(BASELINE_TASKS)}, got {opts.baseline!r}")
    runner = _Runner(opts, log)
    runs = [SeedRun(seed=s, work_dir=seed_work_dir(opts.work_dir, s)) for s in opts.seeds]
    for run in runs:
        os.makedirs(run.work_dir, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, opts.jobs)) as pool:
        futures = []
        for run in runs:
            futures.append(pool.submit(runner.train_and_test, run))
            if opts.baseline:
                futures.append(pool.submit(runner.baseline, run))
        for future in futures:
            future.result()
    return report(opts, runs)
