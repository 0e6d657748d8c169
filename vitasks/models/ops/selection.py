"""Which kernels run NMS, batched NMS and RoIAlign: torchvision's compiled ones or vitasks' plain
torch ones. Both give the same results (the same kept boxes in the same order; RoIAlign and its
gradient to float rounding), so the choice is about speed and host synchronisation only.

The choice is made once per process, at the first op call (or when a config asks), and logged:

- ``VITASKS_KERNELS=torch|torchvision|auto`` in the environment, when not ``auto``, decides;
- else a config's top-level ``kernels: torch|torchvision|auto`` (applied when the runner is built,
  :func:`select_kernels`);
- else ``auto``: torchvision's kernels when torchvision imports and its compiled ops run (every GPU
  install has torchvision beside a CUDA torch), plain torch otherwise (CPU-only torch builds, where
  torchvision's ops do not load).

Asking for torchvision where it does not work is an error (naming the variable or config key and
torchvision's own error), as is asking a process that already runs one kind for the other.
"""

import logging
import os
import threading
import warnings
from typing import Optional, Tuple

import torch

ENV_VAR = "VITASKS_KERNELS"
CONFIG_KEY = "kernels"
CHOICES = ("auto", "torchvision", "torch")

_lock = threading.RLock()
_choice: Optional[str] = None  # "torchvision" or "torch" once chosen
_chosen_by = ""  # what decided it, for messages
_probe_result: Optional[Tuple[object, str]] = None  # (torchvision.ops or None, why not)


def kernels() -> str:
    """``"torchvision"`` or ``"torch"``: the kernels NMS, batched NMS and RoIAlign run in this
    process (chosen on the first call, see the module's description)."""
    if _choice is None:
        _choose(None, "")
    return _choice


def torchvision_ops():
    """``torchvision.ops``, for the ops' torchvision paths (only called once it was chosen)."""
    ops, reason = _probe()
    if ops is None:  # not reached through kernels(): a direct call where torchvision is absent
        raise RuntimeError(f"torchvision's ops do not work here ({reason})")
    return ops


def check_choice(value, where: str) -> Optional[str]:
    """The problem with a requested value (None if it is one of :data:`CHOICES`)."""
    if isinstance(value, str) and value.strip().lower() in CHOICES:
        return None
    return f"{where}: expected one of {', '.join(CHOICES)}, got {value!r}"


def _checked_choice(value, where: str) -> str:
    """``value`` normalised (lower case), or a ConfigError saying what :func:`check_choice` says."""
    from vitasks.errors import ConfigError

    problem = check_choice(value, where)
    if problem:
        raise ConfigError(problem)
    return value.strip().lower()


def select_kernels(value="auto", where: str = CONFIG_KEY) -> str:
    """Apply a config's ``kernels`` value (``where`` names it in messages, e.g.
    ``"configs/x.yaml: kernels"``) and return the kernels in use.

    ``auto`` (or None) leaves the choice to ``VITASKS_KERNELS`` and what works (made now if it
    was not yet, so the run's log says it); ``torch``/``torchvision`` makes it now, unless
    ``VITASKS_KERNELS`` forces one (the environment wins, and the log says so).

    Raises:
        ConfigError: a value that is not a choice; torchvision asked for where it does not work;
            a choice different from the one this process already runs.
    """
    from vitasks.errors import ConfigError

    if value is None:
        value = "auto"
    value = _checked_choice(value, where)
    if value == "auto":
        return kernels()
    with _lock:
        if _choice is None:
            _choose(value, where)
        elif _choice != value and _env_choice() in (None, "auto"):
            raise ConfigError(
                f"{where}: {value} asked for, but this process already runs {_describe(_choice)} "
                f"({_chosen_by}); the kernels are chosen once per process: ask before the first "
                f"op runs, or set {ENV_VAR}={value} in the environment"
            )
    return _choice


def _env_choice() -> Optional[str]:
    raw = os.environ.get(ENV_VAR)
    if raw is None or not raw.strip():
        return None
    return _checked_choice(raw, f"environment variable {ENV_VAR}")


def _probe() -> Tuple[object, str]:
    """(torchvision.ops, "") when torchvision imports and its compiled NMS and RoIAlign run on
    the CPU; else (None, the reason)."""
    global _probe_result
    with _lock:
        if _probe_result is None:
            try:
                with warnings.catch_warnings():
                    # A torchvision built for another torch warns on import; its failure below
                    # is the message that matters.
                    warnings.simplefilter("ignore")
                    import torchvision
                    from torchvision import ops

                    ops.nms(torch.zeros(1, 4), torch.ones(1), 0.5)
                    ops.roi_align(torch.zeros(1, 1, 2, 2), torch.zeros(1, 5), (1, 1), 1.0, 1, True)
                _probe_result = (ops, f"torchvision {torchvision.__version__}")
            except Exception as error:  # ImportError, or RuntimeError from ops built for another torch
                _probe_result = (None, f"{type(error).__name__}: {error}".strip())
        return _probe_result


def _describe(choice: str) -> str:
    return "torchvision's kernels" if choice == "torchvision" else "vitasks' plain-torch kernels"


def _choose(requested: Optional[str], where: str) -> None:
    """Make the process's choice: the environment, else ``requested`` (a config's), else auto."""
    global _choice, _chosen_by
    with _lock:
        if _choice is not None:
            return
        env = _env_choice()
        note = ""
        if env not in (None, "auto"):
            wanted, source = env, f"{ENV_VAR}={env}"
            if requested and requested != env:
                note = f"; it overrides {where}: {requested}"
        elif requested:
            wanted, source = requested, f"{where}: {requested}"
        else:
            wanted, source = "auto", "auto" if env is None else f"{ENV_VAR}=auto"
        # Forced plain torch does not even import torchvision.
        ops, detail = _probe() if wanted != "torch" else (None, "")
        if wanted == "torchvision" and ops is None:
            from vitasks.errors import ConfigError

            raise ConfigError(
                f"{source}: torchvision's kernels asked for, but torchvision's ops do not work "
                f"here ({detail}); install torchvision built for this torch "
                f"({torch.__version__}), or ask for kernels: torch"
            )
        if wanted == "auto":
            _choice = "torchvision" if ops is not None else "torch"
            why = (f"{detail} works here" if ops is not None
                   else f"torchvision's ops do not work here: {detail}")
            _chosen_by = f"{source}: {why}"
        else:
            _choice = wanted
            _chosen_by = source + (f", {detail}" if wanted == "torchvision" else "") + note
    _log(f"vitasks ops: NMS, batched NMS and RoIAlign run {_describe(_choice)} ({_chosen_by})")


def _log(message: str) -> None:
    try:
        from mmengine.logging import print_log
    except ImportError:  # the ops loaded on their own (tools/crosscheck_ops.py)
        logging.getLogger("vitasks").info(message)
        return
    print_log(message, logger="current", level=logging.INFO)


def _reset() -> None:
    """Forget the choice (tests only: the next op call chooses again)."""
    global _choice, _chosen_by
    with _lock:
        _choice, _chosen_by = None, ""
