"""Starting the process group for ``--launcher pytorch|slurm``, on GPUs or CPUs, and ending it.

mmengine's ``init_dist`` always calls ``torch.cuda.set_device``, which fails on a machine
without GPUs, and defaults to the NCCL backend, which needs them. :func:`init_distributed`
starts the group itself (the Runner then sees an initialised group and leaves it alone):
NCCL with one GPU per process where CUDA is available, gloo on CPUs.

Ending it (:func:`shutdown_distributed`, an ``atexit`` handler) is ordered so that no backend
thread outlives the interpreter's working life. gloo runs each collective on a worker thread
(``pt_gloo_runloop``) that marks the work done and only then drops its last reference to it; the
work holds the collective's tensors, and a tensor that has a Python object (``all_gather_object``
and mmengine's result collection make such) needs the GIL to release it. If the main thread has
meanwhile reached ``Py_FinalizeEx``, CPython ends that thread with ``pthread_exit``, whose
unwinding meets the work's ``noexcept`` destructor: ``std::terminate``, "terminate called without
an active exception", SIGABRT, a finished run exiting -6 (seen on a loaded machine, where the
worker waits long for a core). ``destroy_process_group`` alone does not prevent it: it forgets the
group, but gloo's shutdown stops no thread, and the DDP reducer (or FSDP's state) keeps the group
object, and with it the threads, alive until the model is freed, which for a model in an
unreachable runner is the interpreter's last garbage collection. So the handler destroys the
group, frees what is unreachable (models, optimizers, the frames of an already printed uncaught
exception) while the interpreter is whole, and drops its own references to the groups last: their
destructors then join the threads with the GIL released, so a worker that still has to free a
tensor can. A finished run first waits at a barrier (:func:`wait_for_all_ranks`), so no rank tears
down while another still communicates.
"""

from __future__ import annotations

import atexit
import datetime
import faulthandler
import gc
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import List, Optional

import torch
import torch.distributed as dist
from mmengine.logging import print_log

from vitasks.errors import ConfigError
from vitasks.torchrun_worker import follow_launcher

__all__ = ["init_distributed", "shutdown_distributed", "wait_for_all_ranks", "backend_threads", "follow_launcher",
           "LAUNCHERS"]

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
    _register_stack_dump()
    if launcher == "pytorch":
        follow_launcher()
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


def _register_stack_dump() -> None:
    """With ``VITASKS_FAULTHANDLER_SIGNAL=USR1`` (or another signal's name) in the environment,
    that signal makes the process print every thread's Python stack on stderr and go on
    (``faulthandler``): how ``tools/dist_soak.py`` sees where a hung run waits without py-spy."""
    name = os.environ.get("VITASKS_FAULTHANDLER_SIGNAL")
    if not name:
        return
    number = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
    if number is None or not hasattr(faulthandler, "register"):
        print_log(f"VITASKS_FAULTHANDLER_SIGNAL: unknown signal {name!r}", logger="current", level=logging.WARNING)
        return
    faulthandler.register(number, all_threads=True)


def wait_for_all_ranks() -> None:
    """A barrier at the end of a finished run (train or test), when a group is up: every rank has
    then finished every collective, so none closes its connections while a peer still needs them.
    Not for the error path: a rank that failed must not wait for the others."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# Threads of the c10d backends (gloo's workers and its socket loop; NCCL's watchdog and heartbeat
# monitor), by the names torch gives them.
_BACKEND_THREAD_PREFIXES = ("pt_gloo", "gloo_", "pt_nccl", "pt_heartbeat")


def backend_threads() -> List[str]:
    """Names of this process's threads that belong to a c10d backend (Linux; [] elsewhere)."""
    names = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return names
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if name.startswith(_BACKEND_THREAD_PREFIXES):
            names.append(name)
    return sorted(names)


def shutdown_distributed() -> None:
    """End distributed use in this process: destroy every process group and join the backends'
    threads while the interpreter still works (safe to call more than once; a no-op without a
    group).

    Registered with ``atexit`` by :func:`init_distributed` (see the module's docstring for why the
    order matters). Models and runners still referenced after it keep their groups, and those
    groups' threads, alive: that is reported as a warning. Under FSDP (torch 2.13) the group also
    stays alive, held from C++ by something not yet identified (no Python object refers to it).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        # A second Ctrl-C (torchrun passes one on) must not cut the teardown short.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from torch.distributed.distributed_c10d import _world

        # Our own references to the groups' Python objects: dropped last, they run the groups'
        # destructors, which join the threads, with the GIL released (torch binds ProcessGroup
        # with a holder that releases it).
        groups = list(_world.pg_map)
        dist.destroy_process_group()
        # An uncaught exception's frames (already printed) hold the runner, and so the model.
        for name in ("last_traceback", "last_value", "last_type", "last_exc"):
            if getattr(sys, name, None) is not None:
                setattr(sys, name, None)
        gc.collect()  # the unreachable runner: DDP's reducer, FSDP's state, optimizer, loaders
        del groups
        left = backend_threads()
        if left:
            print_log(
                f"distributed: {len(left)} backend threads ({', '.join(left)}) are still running "
                "after the process group was destroyed: something still holds the group (a model or "
                "runner the program keeps, or, under FSDP, torch's own state); tools/train.py, "
                "tools/test.py and the vitasks command then end the process with os._exit after "
                "flushing, a program of its own may abort in the interpreter's teardown",
                logger="current",
                level=logging.WARNING,
            )
    finally:
        if in_main:
            signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
