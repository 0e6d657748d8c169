"""``train`` and ``test``: what ``tools/train.py``, ``tools/test.py`` and ``vitasks train|test`` run.

Both read a YAML config (:func:`vitasks.config.load_config`), import its plugins, apply the
command-line choices, validate it, and hand it to :class:`~vitasks.engine.runner.VitasksRunner`
(mmengine's Runner, see there for what it changes).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import os.path as osp
from typing import Any, Mapping, Optional, Sequence, Union

from mmengine.config import Config
from mmengine.dist import get_rank, is_distributed

from vitasks.checks import options
from vitasks.errors import CheckpointError, ConfigError

__all__ = ["train", "test", "prepare_config", "build_runner", "flatten_metrics", "METRICS_FILE"]

METRICS_FILE = "metrics.json"

# Optimizer wrappers that --amp turns into vitasks' MixedPrecisionOptimWrapper.
_AMP_REPLACEABLE = ("OptimWrapper", "AmpOptimWrapper", "MixedPrecisionOptimWrapper")

CfgOptions = Union[Sequence[str], Mapping[str, Any], None]

# Runs started in this process: mmengine keys its logger, message hub and visualizer by the
# experiment name (config name + a one-second timestamp), so a second run in the same process
# (tests, notebooks) needs a name of its own or it would inherit the first run's state.
_RUNS_IN_PROCESS = 0


def prepare_config(
    config: Union[str, os.PathLike, Config],
    cfg_options: CfgOptions = None,
    work_dir: Optional[str] = None,
    launcher: str = "none",
) -> Config:
    """Load a config (a YAML path, or an already loaded Config), import its plugins, set the
    work dir (``work_dir``, else the config's ``work_dir``, else ``work_dirs/<config name>``)."""
    from vitasks.config import as_config
    from vitasks.plugins import import_plugins

    cfg = as_config(config, cfg_options)
    import_plugins(cfg)
    import vitasks.engine  # noqa: F401  (registers the runner's loops and optim wrapper)

    stem = osp.splitext(osp.basename(cfg.filename))[0] if cfg.filename else "vitasks"
    if work_dir:
        cfg.work_dir = str(work_dir)
    elif not cfg.get("work_dir"):
        cfg.work_dir = osp.join("work_dirs", stem)
    cfg.launcher = launcher
    if cfg.get("default_scope") is None:
        cfg.default_scope = "vitasks"
    global _RUNS_IN_PROCESS
    if _RUNS_IN_PROCESS and not cfg.get("experiment_name"):
        cfg.experiment_name = f"{stem}_run{_RUNS_IN_PROCESS}"
    _RUNS_IN_PROCESS += 1
    return cfg


def _apply_amp(cfg: Config, amp: bool) -> None:
    """Mixed precision: ``--amp`` (bf16 by default), or ``optim_wrapper.dtype`` in the config
    (``float16`` gives fp16 autocast with dynamic loss scaling). bf16 on a CPU without bf16
    instructions warns once (:func:`vitasks.engine.amp.warn_if_bf16_is_slow`)."""
    ow = cfg.get("optim_wrapper")
    if not isinstance(ow, Mapping):
        if amp:
            _require(cfg, "--amp", ("optim_wrapper",), allow_empty=False)
        return
    wrapper_type = ow.get("type", "OptimWrapper")
    wants_amp = amp or "dtype" in ow or wrapper_type == "AmpOptimWrapper"
    if not wants_amp:
        return
    if wrapper_type not in _AMP_REPLACEABLE:
        raise ConfigError(
            f"{cfg.filename}: optim_wrapper.type: mixed precision (--amp or optim_wrapper.dtype) "
            f"works with OptimWrapper, got {wrapper_type!r}"
        )
    ow["type"] = "MixedPrecisionOptimWrapper"
    if ow.get("dtype") is None:
        ow["dtype"] = "bfloat16"
    from vitasks.engine.amp import autocast_dtype, device_type, warn_if_bf16_is_slow

    autocast_dtype(ow["dtype"])  # bfloat16 or float16
    # bf16 on a CPU that emulates it is several times slower than float32: say so, once.
    warn_if_bf16_is_slow(device_type(), ow["dtype"])


def _init_dist(cfg: Config, launcher: str) -> None:
    if launcher == "none":
        return
    from vitasks.engine.distributed import init_distributed

    dist_cfg = dict((cfg.get("env_cfg") or {}).get("dist_cfg") or {})
    init_distributed(launcher, **dist_cfg)


def _finish_dist(launcher: str) -> None:
    """After a finished distributed run: wait until every rank is done communicating, so that no
    rank's exit (see :func:`vitasks.engine.distributed.shutdown_distributed`) races a peer's last
    collective. Only on success: a failed rank leaves at once and the others error out."""
    if launcher == "none":
        return
    from vitasks.engine.distributed import wait_for_all_ranks

    wait_for_all_ranks()


def build_runner(cfg: Config):
    from vitasks.config import validate_config
    from vitasks.engine.runner import VitasksRunner

    validate_config(cfg)
    runner = VitasksRunner.from_cfg(cfg)
    # The ops' kernels (torchvision's or plain torch), chosen once per process: a config's
    # `kernels:` applies here (VITASKS_KERNELS in the environment wins); logged where chosen.
    from vitasks.models.ops.selection import select_kernels

    select_kernels(cfg.get("kernels"), f"{cfg.filename or 'config'}: kernels")
    return runner


def train(
    config: Union[str, os.PathLike, Config],
    work_dir: Optional[str] = None,
    resume: Union[None, bool, str] = None,
    amp: bool = False,
    launcher: str = "none",
    cfg_options: CfgOptions = None,
):
    """Train the model a config describes.

    Args:
        config: a YAML config file (or a loaded Config).
        work_dir: where the merged config (``<config name>.yaml``), logs, checkpoints and
            ``last_checkpoint`` go; default the config's ``work_dir`` or ``work_dirs/<config name>``.
        resume: None (the config's ``resume``, normally off), ``"auto"`` (from the work dir's
            ``last_checkpoint``; from the start when there is none) or a checkpoint path.
        amp: bf16 autocast (CPU and GPU); with ``optim_wrapper.dtype: float16`` in the config,
            fp16 with dynamic loss scaling instead. Validation then autocasts too.
        launcher: ``"none"``, ``"pytorch"`` (torchrun) or ``"slurm"``.
        cfg_options: ``["key.sub=value", ...]`` overrides.

    Returns:
        The :class:`~vitasks.engine.runner.VitasksRunner` after training.
    """
    cfg = prepare_config(config, cfg_options, work_dir, launcher)
    _apply_amp(cfg, amp)
    if resume is not None:
        cfg.resume = resume
    if isinstance(cfg.get("resume"), str) and cfg.resume != "auto" and not osp.isfile(cfg.resume):
        raise CheckpointError(f"--resume: checkpoint {cfg.resume!r} does not exist")
    _require(cfg, "training", ("train_dataloader", "train_cfg", "optim_wrapper"), allow_empty=False)
    _init_dist(cfg, launcher)
    runner = build_runner(cfg)
    runner.train()
    _finish_dist(launcher)
    return runner


def _require(cfg: Config, purpose: str, keys: Sequence[str], allow_empty: bool = True) -> None:
    """The top-level ``keys`` that ``purpose`` needs are set (and not empty, unless ``allow_empty``)."""
    missing = [k for k in keys if cfg.get(k) is None or not (allow_empty or cfg.get(k))]
    if missing:
        raise ConfigError(f"{cfg.filename}: {purpose} needs {', '.join(missing)} in the config")


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict:
    """``{name: number}``: nested dicts joined with ``/``; tensors and numpy scalars as Python
    numbers; anything that is not a single number (per-class lists...) left out."""
    flat: dict = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, prefix=f"{name}/"))
            continue
        if hasattr(value, "numel") and callable(value.numel) and value.numel() == 1:
            value = value.item()
        elif hasattr(value, "item") and getattr(value, "size", None) == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        value = int(value) if isinstance(value, numbers.Integral) else float(value)
        flat[name] = value if not (isinstance(value, float) and math.isnan(value)) else None
    return flat


def _add_dump(cfg: Config, dump: str) -> None:
    test_dump = options(cfg.get("test_dump"), f"{cfg.filename}: test_dump", required=("type",),
                        what="set for --dump: the dumper metric that writes predictions, e.g. "
                             "`test_dump: {type: ClsPredictionDumper}`")
    dumper = dict(test_dump, out_path=str(dump))
    evaluator = cfg.get("test_evaluator")
    if isinstance(evaluator, Mapping) and "metrics" in evaluator:  # an Evaluator config
        metrics = evaluator["metrics"]
        evaluator["metrics"] = (list(metrics) if isinstance(metrics, (list, tuple)) else [metrics]) + [dumper]
    elif isinstance(evaluator, Mapping):
        cfg.test_evaluator = [evaluator, dumper]
    elif isinstance(evaluator, (list, tuple)):
        cfg.test_evaluator = list(evaluator) + [dumper]
    else:
        cfg.test_evaluator = [dumper]


def test(
    config: Union[str, os.PathLike, Config],
    checkpoint: str,
    work_dir: Optional[str] = None,
    dump: Optional[str] = None,
    cfg_options: CfgOptions = None,
    amp: bool = False,
    launcher: str = "none",
) -> dict:
    """Evaluate ``checkpoint`` on the config's test set with mmengine's test loop.

    Writes ``metrics.json`` (flat ``{name: number}``) in the work dir and returns the same dict.
    With ``dump``, the config's ``test_dump`` metric is added to the test evaluator with
    ``out_path=dump``. The checkpoint is read safely and every weight shape must match. Runs under
    autocast when ``amp`` is set or the config's optim wrapper is mixed precision.
    """
    cfg = prepare_config(config, cfg_options, work_dir, launcher)
    if not osp.isfile(str(checkpoint)):
        raise CheckpointError(f"checkpoint file {str(checkpoint)!r} does not exist")
    _require(cfg, "testing", ("test_dataloader", "test_cfg", "test_evaluator"))
    _apply_amp(cfg, amp)
    cfg.load_from = str(checkpoint)
    cfg.resume = False
    if dump:
        _add_dump(cfg, dump)
    _init_dist(cfg, launcher)
    runner = build_runner(cfg)
    metrics = flatten_metrics(runner.test())
    if get_rank() == 0 or not is_distributed():
        os.makedirs(runner.work_dir, exist_ok=True)
        with open(osp.join(runner.work_dir, METRICS_FILE), "w") as f:
            json.dump(metrics, f, indent=2)
        runner.logger.info(f"Metrics written to {osp.join(runner.work_dir, METRICS_FILE)}")
    _finish_dist(launcher)
    return metrics
