"""tools/dist_soak.py: a run that hangs is reported with the stacks of its processes and killed
with all of them, also the ones torchrun starts in sessions of their own."""

import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _soak():
    spec = importlib.util.spec_from_file_location("dist_soak", REPO / "tools" / "dist_soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A stand-in for torchrun: starts a "worker" in a session of its own, as torchrun does
# (start_new_session=True), which never ends by itself (it gives up after 60 s so that a broken
# soak cannot leave it behind for long), and waits for it.
_LAUNCHER = """
import subprocess, sys
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
print("worker pid", worker.pid, flush=True)
worker.wait()
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].split()[0] != "Z"  # a zombie is dead
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_run_that_hangs_is_killed_with_its_workers_and_listed(tmp_path):
    soak = _soak()
    start = time.monotonic()
    code, crashed, _, output = soak.run_command([sys.executable, "-c", _LAUNCHER], dict(os.environ), timeout=5,
                                                py_spy=str(tmp_path / "no-py-spy"))
    assert code == "timeout" and not crashed
    worker = int(output.split("worker pid ")[1].split()[0])
    # The dump lists the launcher and the worker below it, with their command lines.
    assert "===== stacks of the processes of the run that hung" in output
    assert f"----- pid {worker} (parent " in output and "time.sleep(60)" in output
    # The worker was killed with the launcher: killing the launcher's process group alone (as
    # before) left it running, and the soak then waited for it to close its output.
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker)
    assert time.monotonic() - start < 40


def test_process_tree_lists_descendants_parents_first():
    soak = _soak()
    me = os.getpid()
    tree = soak._process_tree(os.getppid())
    pids = [pid for pid, _, _, _ in tree]
    assert pids[0] == os.getppid() and me in pids
    parent_of = {pid: ppid for pid, ppid, _, _ in tree}
    for pid in pids[1:]:  # every process comes after its parent
        assert pids.index(parent_of[pid]) < pids.index(pid)
