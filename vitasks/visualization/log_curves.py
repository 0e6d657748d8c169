"""Training curves from a work dir's logs: what ``tools/analyze_logs.py`` plots and times.

mmengine's ``LoggerHook`` writes, for every run in a work dir, ``WORK_DIR/<timestamp>/vis_data/
scalars.json``: JSON lines, one per logging point. Training lines carry ``iter`` (and ``epoch`` in
epoch-based runs) beside the smoothed ``loss``, ``lr``, ``time``...; validation lines carry the
metrics (``accuracy/top1``, ``mIoU``...) and no ``iter``. Every line has ``step``: the iteration
for training lines; for validation lines the epoch in epoch-based runs (the hook's default
``log_metric_by_epoch``), else the iteration.

A work dir may hold several runs: a run killed and resumed with ``--resume`` starts a new
``<timestamp>`` folder and logs again from its checkpoint on. :func:`load_work_dir_logs` merges
them into one history: runs in time order (timestamp names sort chronologically), each later run
replacing what the earlier ones logged from its first step on, since the later run's weights are
the ones training went on with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vitasks.errors import DataError, VitasksError

__all__ = [
    "Curve",
    "WorkDirLog",
    "find_scalar_files",
    "read_scalar_records",
    "merge_runs",
    "load_work_dir_logs",
    "plot_curves",
    "train_time_stats",
    "format_train_time",
]

#: The file mmengine's LocalVisBackend writes in each run's ``vis_data`` folder.
SCALARS_FILE = "scalars.json"
#: Bookkeeping fields of a record, not curves.
POSITION_KEYS = ("step", "iter", "epoch")


@dataclass
class Curve:
    """One logged quantity over training.

    Attributes:
        key: the name in the logs (``loss``, ``lr``, ``mIoU``).
        phase: ``"train"`` or ``"val"``.
        steps: where each value was logged (iteration; epoch for epoch-based validation).
        values: the logged values.
        unit: what ``steps`` count, ``"iter"`` or ``"epoch"``.
    """

    key: str
    phase: str
    steps: np.ndarray
    values: np.ndarray
    unit: str


@dataclass
class WorkDirLog:
    """The merged logs of every run in one work dir.

    Attributes:
        source: the work dir (or file) they were read from.
        train: training records (dicts as logged), sorted by step.
        val: validation records, sorted by step.
        runs: the scalars files read, oldest first.
    """

    source: str
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)

    @property
    def by_epoch(self) -> bool:
        """Epoch-based training: its records carry ``epoch``, and validation is logged by epoch."""
        return any("epoch" in r for r in self.train)

    @property
    def val_unit(self) -> str:
        return "epoch" if self.by_epoch else "iter"

    def keys(self, phase: str | None = None) -> list[str]:
        """The plottable keys logged in ``phase`` (both when None), sorted."""
        records = {"train": self.train, "val": self.val, None: self.train + self.val}[phase]
        return sorted({k for r in records for k, v in r.items() if k not in POSITION_KEYS and _is_number(v)})

    def check_keys(self, keys: Sequence[str]) -> None:
        """A DataError naming every key of ``keys`` that no record has, and the keys that exist."""
        logged = set(self.keys())
        missing = [k for k in keys if k not in logged]
        if missing:
            raise DataError(
                f"{self.source}: no log record has the key{'s' if len(missing) > 1 else ''} "
                f"{', '.join(map(repr, missing))}; the keys logged are: {', '.join(sorted(logged)) or '(none)'}"
            )

    def curve(self, key: str) -> Curve:
        """``key``'s values over training. A key logged in training (``time``, which validation
        logs too) gives the training curve; a key only validation logs, the validation curve."""
        if key in self.keys("train"):
            phase, records, unit = "train", self.train, "iter"
        elif key in self.keys("val"):
            phase, records, unit = "val", self.val, self.val_unit
        else:
            self.check_keys([key])
        points = [(int(r["step"]), float(r[key])) for r in records if _is_number(r.get(key))]
        steps = np.array([s for s, _ in points], dtype=np.int64)
        values = np.array([v for _, v in points], dtype=np.float64)
        return Curve(key, phase, steps, values, unit)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def find_scalar_files(path: str | os.PathLike) -> list[Path]:
    """The scalars files under ``path``, oldest run first.

    ``path`` is a work dir (its ``<timestamp>/vis_data/scalars.json``), one run's folder
    (``<timestamp>``), a ``vis_data`` folder, or a JSON-lines file itself.
    """
    root = Path(path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(f"{root}: no such work dir or log file")
    for candidate in (root / SCALARS_FILE, root / "vis_data" / SCALARS_FILE):
        if candidate.is_file():
            return [candidate]
    # Run folders are named by their start time (YYYYMMDD_HHMMSS), so name order is time order.
    files = sorted(root.glob(f"*/vis_data/{SCALARS_FILE}"), key=lambda p: p.parent.parent.name)
    if not files:
        raise DataError(
            f"{root}: no training logs found (expected {root}/<timestamp>/vis_data/{SCALARS_FILE}, "
            "which mmengine's LoggerHook writes during training)"
        )
    return files


def read_scalar_records(path: str | os.PathLike) -> list[dict]:
    """The records of one JSON-lines scalars file, in file order. A line cut short by a killed
    run (the last one) is dropped; any other bad line is a DataError naming the file and line."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines()]
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # a write interrupted by a kill
                break
            raise DataError(f"{path}:{number}: not a JSON record ({err.msg})") from None
        if not isinstance(record, dict) or not _is_number(record.get("step")):
            raise DataError(f"{path}:{number}: expected a JSON object with a numeric `step`, got {line[:80]!r}")
        records.append(record)
    return records


def _split_phases(records: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """Training records (they carry ``iter``) and validation records (the rest)."""
    train = [r for r in records if "iter" in r]
    val = [r for r in records if "iter" not in r]
    return train, val


def _merge_phase(runs: Sequence[Sequence[dict]]) -> list[dict]:
    """One phase's records of several runs (oldest first) as one history sorted by step: each run
    replaces the earlier runs' records from its own first step on."""
    merged: list[dict] = []
    for records in runs:
        if not records:
            continue
        first = min(int(r["step"]) for r in records)
        merged = [r for r in merged if int(r["step"]) < first] + list(records)
    return sorted(merged, key=lambda r: int(r["step"]))  # stable: a run's own order kept on ties


def merge_runs(runs: Sequence[Sequence[dict]], source: str = "") -> WorkDirLog:
    """Merge the records of a work dir's runs (oldest first) into one :class:`WorkDirLog`."""
    phases = [_split_phases(records) for records in runs]
    return WorkDirLog(
        source=source,
        train=_merge_phase([train for train, _ in phases]),
        val=_merge_phase([val for _, val in phases]),
    )


def load_work_dir_logs(path: str | os.PathLike) -> WorkDirLog:
    """Every run's scalars under ``path`` (see :func:`find_scalar_files`), merged."""
    files = find_scalar_files(path)
    log = merge_runs([read_scalar_records(f) for f in files], source=os.fspath(path))
    log.runs = [os.fspath(f) for f in files]
    return log


def _labels(legend: Sequence[str] | None, sources: Sequence[str], keys: Sequence[str]) -> list[list[str]]:
    """Legend labels per (work dir, key): ``legend`` gives one per work dir or one per curve
    (work dir major, as mmdet's ``--legend``); by default the key, prefixed by the work dir's name
    when several are compared."""
    if legend is None:
        if len(sources) == 1:
            return [list(keys)]
        names = [Path(s).name or s for s in sources]
        return [[f"{name} {key}" for key in keys] for name in names]
    legend = list(legend)
    if len(legend) == len(sources):
        return [[label] * len(keys) for label in legend]
    if len(legend) == len(sources) * len(keys):
        return [legend[i * len(keys):(i + 1) * len(keys)] for i in range(len(sources))]
    raise VitasksError(
        f"--legend: expected {len(sources)} labels (one per work dir) or {len(sources) * len(keys)} "
        f"(one per work dir and key), got {len(legend)}"
    )


def plot_curves(
    work_dirs: Sequence[str | os.PathLike],
    keys: Sequence[str],
    out: str | os.PathLike,
    title: str | None = None,
    legend: Sequence[str] | None = None,
) -> list[list[Curve]]:
    """Plot ``keys`` from each work dir's logs into the PNG ``out``: one panel per key, one curve
    per work dir in it.

    Returns:
        The curves plotted, ``[work dir][key]``.

    Raises:
        DataError: a work dir without logs, or a key none of its records has (the message lists
            the keys that exist).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not keys:
        raise VitasksError("no --keys given: name the logged quantities to plot, e.g. --keys loss lr")
    sources = [os.fspath(w) for w in work_dirs]
    logs = [load_work_dir_logs(w) for w in sources]
    for log in logs:
        log.check_keys(keys)
    curves = [[log.curve(key) for key in keys] for log in logs]
    labels = _labels(legend, sources, keys)

    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 2.8 * len(keys) + 0.6), squeeze=False)
    for row, key in enumerate(keys):
        ax = axes[row, 0]
        for log_index, per_key in enumerate(curves):
            curve = per_key[row]
            # Validation has few points: mark them so a single evaluation still shows.
            marker = "o" if curve.phase == "val" or len(curve.steps) < 3 else None
            ax.plot(curve.steps, curve.values, marker=marker, markersize=4, label=labels[log_index][row])
        units = sorted({per_key[row].unit for per_key in curves})
        ax.set_xlabel(" / ".join(units))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole iterations or epochs
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return curves


def train_time_stats(log: WorkDirLog) -> dict:
    """Seconds per training iteration from the logged ``time`` (each record's value is already a
    mean over the log processor's window).

    Returns:
        ``{"mean": s/iter, "std": over records, "records": count}`` and, for epoch-based runs,
        ``"per_epoch"`` ``{epoch: mean}``, ``"slowest_epoch"``, ``"fastest_epoch"`` and
        ``"epoch_std"`` (the spread of the epoch means).
    """
    times = [(r.get("epoch"), float(r["time"])) for r in log.train if _is_number(r.get("time"))]
    if not times:
        raise DataError(f"{log.source}: no training record has `time` (IterTimerHook logs it)")
    values = np.array([t for _, t in times])
    stats = {"mean": float(values.mean()), "std": float(values.std()), "records": len(values)}
    if log.by_epoch:
        per_epoch: dict[int, list[float]] = {}
        for epoch, t in times:
            if epoch is not None:
                per_epoch.setdefault(int(epoch), []).append(t)
        means = {epoch: float(np.mean(ts)) for epoch, ts in sorted(per_epoch.items())}
        stats["per_epoch"] = means
        stats["slowest_epoch"] = max(means, key=means.get)
        stats["fastest_epoch"] = min(means, key=means.get)
        stats["epoch_std"] = float(np.std(list(means.values())))
    return stats


def format_train_time(path: str, stats: dict) -> str:
    """:func:`train_time_stats` of the work dir ``path`` as the lines ``analyze-logs cal_train_time``
    prints (mmdetection's wording)."""
    lines = [f"{'-' * 5}Analyze train time of {path}{'-' * 5}"]
    if "per_epoch" in stats:
        slow, fast = stats["slowest_epoch"], stats["fastest_epoch"]
        lines.append(f"slowest epoch {slow}, average time is {stats['per_epoch'][slow]:.4f} s/iter")
        lines.append(f"fastest epoch {fast}, average time is {stats['per_epoch'][fast]:.4f} s/iter")
        lines.append(f"time std over epochs is {stats['epoch_std']:.4f}")
    lines.append(f"average iter time: {stats['mean']:.4f} s/iter ({stats['records']} logged windows)")
    return "\n".join(lines)
