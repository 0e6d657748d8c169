"""A torchrun worker ends with its torchrun (:func:`follow_launcher`).

Light on purpose (no torch): ``vitasks.engine.distributed.init_distributed`` calls it before it
joins the process group, and its test runs it in a bare interpreter.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

from vitasks.errors import VitasksError

__all__ = ["follow_launcher", "LAUNCHER_GONE"]

# prctl(2): the signal a process gets when its parent (thread) ends.
_PR_SET_PDEATHSIG = 1

LAUNCHER_GONE = ("torchrun, which started this process, has ended (killed?); this worker stops "
                 "rather than wait for the group's timeout")


def follow_launcher() -> None:
    """Under torchrun: end this process when torchrun ends (Linux; a no-op elsewhere and outside
    torchrun, i.e. without ``TORCHELASTIC_RUN_ID`` in the environment).

    torchrun starts every worker in a session of its own and cannot stop them when it is killed
    itself (SIGKILL: a harness's timeout, the OOM killer). A worker left behind that has not joined
    the group yet waits for torchrun's store, which died with it, retrying the connection for the
    group's whole timeout (30 minutes by default), with no output: both ranks alive, nothing
    moving. So a worker asks the kernel for SIGTERM when its parent ends (``PR_SET_PDEATHSIG``;
    SIGTERM rather than SIGKILL, so that training stops as torchrun itself stops it), and a
    worker whose torchrun ended before it got this far (it is then process 1's child) raises
    :class:`~vitasks.errors.VitasksError` at once.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    if parent == 1 and not _is_python(1):  # (torchrun itself may be a container's process 1)
        raise VitasksError(LAUNCHER_GONE)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0
    except (OSError, AttributeError):
        failed = True
    if failed:
        print("vitasks: warning: could not ask to be stopped with torchrun (prctl PR_SET_PDEATHSIG "
              "failed); if torchrun is killed, stop this process yourself", file=sys.stderr)
        return
    if os.getppid() != parent:  # torchrun ended between the two calls: no signal will come
        raise VitasksError(LAUNCHER_GONE)


def _is_python(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().lower()
    except OSError:
        return False
    return b"python" in command or b"torch" in command
