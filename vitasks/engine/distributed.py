"""Starting the process group for ``--launcher pytorch|slurm``, on GPUs or CPUs.

mmengine's ``init_dist`` always calls ``torch.cuda.set_device``, which fails on a machine
without GPUs, and defaults to the NCCL backend, which needs them. :func:`init_distributed`
starts the group itself (the Runner then sees an initialised group and leaves it alone):
NCCL with one GPU per process where CUDA is available, gloo on CPUs.

The group is destroyed when the process exits normally (an ``atexit`` handler, while the
interpreter is still whole). A process that leaves it to the interpreter's teardown can die with
SIGABRT ("terminate called without an active exception"): gloo's C++ worker threads still hold
work objects with tensors, and releasing those needs the GIL of an interpreter that is going away.
"""

from __future__ import annotations

import atexit
import datetime
import os
import subprocess
from typing import Optional

import torch
import torch.distributed as dist
from mmengine.logging import print_log

from vitasks.errors import ConfigError

__all__ = ["init_distributed", "shutdown_distributed", "LAUNCHERS"]

LAUNCHERS = ("none", "pytorch", "slurm")


def _env_int(name: str, launcher: str) -> int:
    value = os.environ.get(name)
    if value is None:
        hint = (
            "start the processes with torchrun (tools/dist_train.sh)"
            if launcher == "pytorch"
            else "run inside a slurm job step (srun)"
        )
        raise ConfigError(f"--launcher {launcher}: environment variable {name} is not set; {hint}")
    return int(value)


def _first_slurm_host() -> str:
    """The first host of the job's ``SLURM_NODELIST`` (``scontrol show hostnames``), the master.

    scontrol runs without a shell (the node list is one argument, never interpreted), and only
    its output on success is used: an error never becomes a host name.
    """
    hint = "set MASTER_ADDR to the address of the job's first node"
    nodes = os.environ.get("SLURM_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    if not nodes:
        raise ConfigError(f"--launcher slurm: SLURM_NODELIST is not set (run inside a slurm job step), or {hint}")
    command = ["scontrol", "show", "hostnames", nodes]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError as e:
        raise ConfigError(f"--launcher slurm: `scontrol` was not found on PATH; {hint}") from e
    except subprocess.TimeoutExpired as e:
        raise ConfigError(f"--launcher slurm: `{' '.join(command)}` did not answer in 60 s; {hint}") from e
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise ConfigError(
            f"--launcher slurm: `{' '.join(command)}` failed (exit status {proc.returncode}"
            f"{': ' + detail[0] if detail else ''}); {hint}"
        )
    hosts = proc.stdout.split()
    if not hosts:
        raise ConfigError(f"--launcher slurm: `{' '.join(command)}` printed no host name; {hint}")
    return hosts[0]


def _slurm_env(port: Optional[int]) -> None:
    """Translate slurm's variables into the ones ``init_process_group(env://)`` reads."""
    proc_id = _env_int("SLURM_PROCID", "slurm")
    ntasks = _env_int("SLURM_NTASKS", "slurm")
    local_id = os.environ.get("SLURM_LOCALID")
    if local_id is None:
        local_id = proc_id % max(torch.cuda.device_count(), 1)
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _first_slurm_host()
    if port is not None:
        os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ["WORLD_SIZE"] = str(ntasks)
    os.environ["RANK"] = str(proc_id)
    os.environ["LOCAL_RANK"] = str(local_id)


def init_distributed(
    launcher: str,
    backend: Optional[str] = None,
    timeout: Optional[float] = None,
    port: Optional[int] = None,
    **kwargs,
) -> None:
    """Initialise ``torch.distributed`` for ``launcher`` (no-op when already initialised).

    Args:
        launcher: ``"pytorch"`` (torchrun's RANK/LOCAL_RANK/WORLD_SIZE) or ``"slurm"``.
        backend: the config's ``env_cfg.dist_cfg.backend``; defaults to NCCL on GPUs. Without
            GPUs gloo is used whatever the config says (NCCL cannot run there).
        timeout: seconds, as in mmengine's ``dist_cfg``.
        port: master port for slurm (default: ``MASTER_PORT`` or 29500).
        **kwargs: passed to ``torch.distributed.init_process_group``.
    """
    if launcher not in LAUNCHERS or launcher == "none":
        raise ConfigError(f"launcher must be one of {list(LAUNCHERS[1:])} here, got {launcher!r}")
    if dist.is_available() and dist.is_initialized():
        return
    if launcher == "slurm":
        _slurm_env(port)
    _env_int("RANK", launcher)
    _env_int("WORLD_SIZE", launcher)
    local_rank = _env_int("LOCAL_RANK", launcher)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend = backend or "nccl"
    else:
        if backend not in (None, "gloo"):
            print_log(f"No GPU: using the gloo backend instead of {backend!r}", logger="current")
        backend = "gloo"
    if timeout is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout)
    dist.init_process_group(backend=backend, **kwargs)
    atexit.register(shutdown_distributed)


def shutdown_distributed() -> None:
    """Destroy the default process group, if one is up (safe to call more than once).

    Registered with ``atexit`` by :func:`init_distributed`; call it earlier to free the group's
    threads and sockets before the process ends.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
