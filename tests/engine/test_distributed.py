"""Distributed data parallel training with torchrun on CPU/gloo (tools/dist_train.sh)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vitasks_toy_plugin as toy
from vitasks.engine.checkpoint import load_checkpoint_file
from vitasks.engine.distributed import init_distributed
from vitasks.engine.launch import train
from vitasks.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PLUGINS = ["vitasks_toy_plugin", "vitasks_exit_probe_plugin"]

# What a crashed process looks like in torchrun's output (the C++ runtime's message, SIGABRT or
# SIGSEGV exit codes and torchrun's summary of them, Python's fatal error report).
CRASH = re.compile(r"terminate called|Signal (6|11) \(SIG|exitcode\s*:\s*-(6|11)\b|Fatal Python error")


def _dist_env(probe_dir) -> dict:
    env = dict(
        os.environ,
        PORT=str(_free_port()),
        PYTHON=sys.executable,
        PYTHONPATH=os.pathsep.join([str(Path(toy.__file__).parent), str(REPO), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
        VITASKS_TEST_EXIT_PROBE=str(probe_dir),
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    probe_dir.mkdir(parents=True, exist_ok=True)
    return env


def _backend_threads_at_exit(probe_dir, ranks=(0, 1)) -> dict:
    """``{rank: [backend threads]}`` as each rank's exit probe recorded them."""
    return {r: json.loads((probe_dir / f"rank{r}.json").read_text())["backend_threads"] for r in ranks}


def test_two_process_torchrun_matches_one_process_with_the_summed_batch(tmp_path):
    short = dict(train_cfg=dict(max_epochs=2))
    cfg = toy.write_config(tmp_path, "ddp.yaml", plugins=PLUGINS, **short)
    env = _dist_env(tmp_path / "probe")
    work_dir = tmp_path / "ddp"
    proc = subprocess.run(
        ["bash", str(REPO / "tools" / "dist_train.sh"), cfg, "2", "--work-dir", str(work_dir)],
        env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The cause of the SIGABRTs some runs ended with: gloo's worker threads still running when the
    # interpreter's teardown began (DDP's reducer kept the destroyed group alive), one of them
    # freeing a finished collective's tensors, which needs the GIL, which teardown refuses
    # (pthread_exit through a noexcept destructor: std::terminate). None may be left.
    assert _backend_threads_at_exit(tmp_path / "probe") == {0: [], 1: []}
    assert not CRASH.search(proc.stdout + proc.stderr)
    assert (work_dir / "last_checkpoint").read_text().strip() == str(work_dir / "epoch_2.pth")
    ddp = load_checkpoint_file(str(work_dir / "epoch_2.pth"))
    assert ddp["meta"]["iter"] == 4  # 16 samples / (2 processes x 4) = 2 iterations per epoch

    # DDP averages the gradients of both processes' batches of 4: the same updates as one
    # process with batches of 8 (DefaultSampler gives rank r the positions r, r+2, ... of the
    # shuffled order, so the two batches together are the single process's batch).
    single = toy.write_config(tmp_path, "single.yaml", train_dataloader=dict(batch_size=8), **short)
    train(single, work_dir=str(tmp_path / "single"))
    ref = load_checkpoint_file(str(tmp_path / "single" / "epoch_2.pth"))["state_dict"]
    assert ddp["state_dict"].keys() == ref.keys()
    for key, value in ref.items():
        torch.testing.assert_close(ddp["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_exception_on_one_rank_ends_every_rank_with_an_error(tmp_path):
    """Rank 1 raises after its 2nd iteration; rank 0 goes on into the next collective. Every rank
    must end, non-zero, without an abort, in bounded time, and the error must be rank 1's."""
    hooks = [dict(type="FailOnRankHook", rank=1, at_iter=2)]
    cfg = toy.write_config(tmp_path, "fault.yaml", plugins=PLUGINS, custom_hooks=hooks, train_cfg=dict(max_epochs=2))
    env = _dist_env(tmp_path / "probe")
    proc = subprocess.run(
        ["bash", str(REPO / "tools" / "dist_train.sh"), cfg, "2", "--work-dir", str(tmp_path / "wd")],
        env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=240,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "injected fault on rank 1 at iteration 2" in output
    assert not CRASH.search(output), output[-3000:]
    # The failed rank ran its teardown: no backend thread outlived it.
    assert _backend_threads_at_exit(tmp_path / "probe", ranks=(1,)) == {1: []}


def test_ctrl_c_ends_every_rank_without_an_abort(tmp_path):
    """Ctrl-C in a terminal: SIGINT to torchrun and both ranks (one process group) mid-training.
    Every process ends, non-zero, without an abort or a hang."""
    progress = tmp_path / "progress.txt"
    hooks = [dict(type="ProgressHook", path=str(progress), delay=0.2)]
    cfg = toy.write_config(tmp_path, "ctrlc.yaml", plugins=PLUGINS + ["vitasks_fault_plugin"], custom_hooks=hooks,
                           train_cfg=dict(max_epochs=50))
    env = _dist_env(tmp_path / "probe")
    proc = subprocess.Popen(
        ["bash", str(REPO / "tools" / "dist_train.sh"), cfg, "2", "--work-dir", str(tmp_path / "wd")],
        env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not (progress.exists() and len(progress.read_text().split()) >= 4):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode != 0, output[-3000:]
    assert not CRASH.search(output), output[-3000:]
    assert len(progress.read_text().split()) < 2 * 50 * 2  # stopped well before the end


def test_launcher_without_torchrun_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="torchrun"):
        init_distributed("pytorch")


# A process that initialises the group, communicates, and exits without cleaning up; a handler
# registered before init_distributed runs after the module's own (atexit is last in, first out)
# and reports whether the group was still up.
_EXIT_SCRIPT = """
import atexit, sys
import torch, torch.distributed as dist
atexit.register(lambda: print("group at exit:", dist.is_initialized(), flush=True))
from vitasks.engine.distributed import init_distributed
init_distributed("pytorch")
t = torch.ones(3)
dist.all_reduce(t)
print("sum:", t.tolist(), flush=True)
"""


def test_process_group_is_destroyed_at_exit(tmp_path):
    # Left to the interpreter's teardown, gloo's threads can abort the process (SIGABRT,
    # "terminate called without an active exception"); the group must be gone before that.
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sum: [1.0, 1.0, 1.0]" in proc.stdout
    assert "group at exit: False" in proc.stdout


def _fake_scontrol(tmp_path, body: str) -> str:
    """A folder holding an executable `scontrol` that records its arguments and runs ``body``."""
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "scontrol"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path / 'args'}\n{body}\n")
    script.chmod(0o755)
    return str(folder)


@pytest.fixture
def slurm_env(monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        # set, then delete: monkeypatch then restores the original (often: unset) after the test,
        # also when the code under test set the variable itself.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    return monkeypatch


def test_slurm_master_is_the_first_host_without_a_shell(tmp_path, slurm_env):
    from vitasks.engine.distributed import _slurm_env

    nodes = "node[01-02];touch pwned"  # shell syntax in the node list must stay an argument
    slurm_env.setenv("SLURM_NODELIST", nodes)
    slurm_env.setenv("PATH", _fake_scontrol(tmp_path, "echo node01; echo node02"))
    slurm_env.chdir(tmp_path)
    _slurm_env(port=12345)
    assert os.environ["MASTER_ADDR"] == "node01"
    assert (os.environ["MASTER_PORT"], os.environ["WORLD_SIZE"], os.environ["RANK"]) == ("12345", "2", "0")
    assert (tmp_path / "args").read_text().splitlines() == ["show", "hostnames", nodes]
    assert not (tmp_path / "pwned").exists()


def test_slurm_scontrol_failure_is_a_clear_error(tmp_path, slurm_env):
    from vitasks.engine.distributed import _slurm_env

    slurm_env.setenv("SLURM_NODELIST", "node[01-02]")
    slurm_env.setenv("PATH", _fake_scontrol(tmp_path, "echo 'scontrol: error: Invalid node list' >&2; exit 1"))
    with pytest.raises(ConfigError, match=r"scontrol show hostnames node\[01-02\]` failed \(exit status 1: "
                                          r"scontrol: error: Invalid node list\); set MASTER_ADDR"):
        _slurm_env(port=None)
    assert "MASTER_ADDR" not in os.environ


def test_slurm_without_scontrol_or_node_list(tmp_path, slurm_env):
    from vitasks.engine.distributed import _slurm_env

    slurm_env.setenv("SLURM_NODELIST", "node01")
    slurm_env.setenv("PATH", str(tmp_path))  # no scontrol here
    with pytest.raises(ConfigError, match="`scontrol` was not found on PATH; set MASTER_ADDR"):
        _slurm_env(port=None)
    slurm_env.delenv("SLURM_NODELIST")
    slurm_env.delenv("SLURM_JOB_NODELIST", raising=False)
    with pytest.raises(ConfigError, match="SLURM_NODELIST is not set"):
        _slurm_env(port=None)
    # A MASTER_ADDR given by the user is used as it is, without scontrol.
    slurm_env.setenv("MASTER_ADDR", "10.0.0.7")
    _slurm_env(port=None)
    assert os.environ["MASTER_ADDR"] == "10.0.0.7"



# A stand-in for torchrun: starts a worker (argv[1], with argv[3:] as its arguments) with torchrun's
# TORCHELASTIC_RUN_ID, prints its pid, and waits for it, or with argv[2] == "orphan" exits at once.
_LAUNCHER = """
import os, subprocess, sys
worker = subprocess.Popen([sys.executable, "-c", *sys.argv[1:2], *sys.argv[3:]], env=dict(os.environ, TORCHELASTIC_RUN_ID="t"))
print(worker.pid, flush=True)
if sys.argv[2] != "orphan":
    worker.wait()
"""
# A worker: calls follow_launcher as init_distributed does (after DELAY s), then marks FILE and
# waits 60 s; on an error it writes the error to FILE instead and exits 3.
_WORKER = """
import sys, time
time.sleep(float(sys.argv[2]))
from vitasks.torchrun_worker import follow_launcher
try:
    follow_launcher()
except Exception as e:
    open(sys.argv[1], "w").write("error: " + str(e))
    sys.exit(3)
open(sys.argv[1], "w").write("following")
time.sleep(60)
"""


def _gone(pid: int) -> bool:
    """Whether the process has ended (gone, or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _gone(pid)


def _worker_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_worker_ends_when_its_torchrun_is_killed(tmp_path):
    """torchrun killed with SIGKILL (a harness's timeout, the OOM killer) cannot stop its workers,
    which run in sessions of their own; a worker left behind before joining the group waited for
    torchrun's store for the group's whole timeout (30 min), alive and silent. Now it gets SIGTERM
    when torchrun ends."""
    mark = tmp_path / "mark"
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, _WORKER, "wait", str(mark), "0"],
                                env=_worker_env(), stdout=subprocess.PIPE, text=True)
    worker = int(launcher.stdout.readline())
    try:
        deadline = time.monotonic() + 120
        while not mark.exists():
            assert launcher.poll() is None and time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.1)
        assert mark.read_text() == "following"
        launcher.kill()
        launcher.wait()
        assert _wait_gone(worker, 30), "the worker outlived its killed launcher"
    finally:
        if not _gone(worker):
            os.kill(worker, signal.SIGKILL)


def _orphans_go_to_process_1() -> bool:
    # The grandchild prints its parent after its parent has exited; run() returns when both
    # have closed the pipe.
    out = subprocess.run(
        [sys.executable, "-c", "import subprocess, sys; subprocess.Popen([sys.executable, '-c', "
         "'import os, time; time.sleep(0.5); print(os.getppid())'])"],
        capture_output=True, text=True, timeout=60).stdout.split()
    return out == ["1"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_worker_whose_torchrun_already_ended_stops_with_an_error(tmp_path):
    if not _orphans_go_to_process_1():
        pytest.skip("orphans are adopted by a subreaper here, not by process 1")
    mark = tmp_path / "mark"
    launcher = subprocess.run([sys.executable, "-c", _LAUNCHER, _WORKER, "orphan", str(mark), "1"],
                              env=_worker_env(), stdout=subprocess.PIPE, text=True, timeout=120)
    worker = int(launcher.stdout.split()[0])
    try:
        assert _wait_gone(worker, 120)
        assert "error: torchrun, which started this process, has ended" in mark.read_text()
    finally:
        if not _gone(worker):
            os.kill(worker, signal.SIGKILL)
