"""Run a short distributed training many times in a row and report how every run ended.

    python tools/dist_soak.py [--runs 50] [--nproc 2] [--strategy ddp|fsdp] [--demo cls|multitask]

Each run is ``torchrun --nproc_per_node NPROC tools/train.py <demo config> --launcher pytorch``
on a tiny generated dataset (written once, in a temporary folder), for a few iterations with
validation and checkpoints in between (so the end of a run has the collectives a real run ends
with: DDP's gradient all-reduce, result gathering, the final barrier). A run passes when torchrun
exits 0 and no process aborted (SIGABRT, "terminate called ..."). The exit status is 0 when every
run passed. The log of every failed run is kept (``--log-dir``). See docs/distributed.md.

One OpenMP thread per process (``OMP_NUM_THREADS=1``) unless the environment sets another.
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DEMOS = {
    "cls": "configs/demo/cls_synthetic.yaml",
    "multitask": "configs/demo/multitask_synthetic.yaml",
}

# What a crash looks like in torchrun's output: the C++ runtime's message, and the signal of a
# process that died of SIGABRT (6) or SIGSEGV (11).
_CRASH = re.compile(r"terminate called|Signal (6|11) \(SIG|exitcode\s*:\s*-(6|11)\b|Fatal Python error")


def make_data(root: Path, demo: str) -> Path:
    """A tiny dataset of the demo's layout under ``root`` (cls: ImageNet folders; multitask: cls/,
    seg/ and det/)."""
    from vitasks.data.synthetic.cls import make_cls_dataset

    if demo == "cls":
        make_cls_dataset(str(root / "cls"), train_per_class=4, val_per_class=2)
        return root / "cls"
    from vitasks.data.synthetic.det import make_det_dataset
    from vitasks.data.synthetic.seg import make_seg_dataset

    make_cls_dataset(str(root / "cls"), train_per_class=4, val_per_class=2)
    make_seg_dataset(str(root / "seg"), num_train=16, num_val=8)
    make_det_dataset(str(root / "det"), num_train=16, num_val=8)
    return root


def cfg_options(demo: str, data_root: Path, strategy: str) -> list:
    """Overrides that make the demo a few iterations long, validating and saving on the way."""
    if demo == "cls":
        options = [
            f"data_root={data_root}", "train_cfg.max_epochs=2", "train_cfg.val_interval=1",
            "train_dataloader.batch_size=8", "val_dataloader.batch_size=8",
            "default_hooks.checkpoint.interval=1", "default_hooks.logger.interval=1",
        ]
    else:
        options = [
            f"data_root={data_root}", "train_cfg.max_iters=6", "train_cfg.val_interval=3",
            "default_hooks.checkpoint.interval=3", "default_hooks.logger.interval=1",
        ]
    if strategy != "ddp":
        options.append(f"strategy={strategy}")
    return options


def _process_tree(root: int) -> list:
    """``[(pid, parent pid, state, command line)]`` of ``root`` and every process below it (Linux's
    /proc; [] elsewhere), parents before children."""
    table = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # ended meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")"
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        table[int(entry)] = (int(ppid), state, cmdline)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        if pid not in table:
            continue
        tree.append((pid, *table[pid]))
        todo += sorted(p for p, (ppid, _, _) in table.items() if ppid == pid)
    return tree


def dump_stacks(root: int, py_spy: str = None, timeout: float = 120) -> str:
    """The stacks of every process under ``root`` (torchrun, its workers, their data loader
    workers), for the log of a run that hung: ``py-spy dump --native`` of each when py-spy is
    there (``py_spy``, else ``py-spy`` on PATH), else faulthandler's Python stacks (SIGUSR1, which
    workers started with ``VITASKS_FAULTHANDLER_SIGNAL=USR1`` answer on their stderr)."""
    py_spy = py_spy or shutil.which("py-spy")
    lines = [f"===== stacks of the processes of the run that hung ({time.strftime('%H:%M:%S')}, "
             f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())})"]
    for pid, ppid, state, cmdline in _process_tree(root):
        lines.append(f"----- pid {pid} (parent {ppid}, state {state}): {cmdline[:300]}")
        if not py_spy:
            continue
        for native in (["--native"], []):  # native frames show where C++ waits; without them if that fails
            try:
                out = subprocess.run([py_spy, "dump", "--pid", str(pid), *native], capture_output=True,
                                     text=True, timeout=timeout)
            except (OSError, subprocess.TimeoutExpired) as e:
                lines.append(f"py-spy dump {' '.join(native)} failed: {e}")
                continue
            lines.append((out.stdout + out.stderr).rstrip())
            if out.returncode == 0:
                break
    if not py_spy:
        lines.append("(py-spy not found: faulthandler's stacks, from SIGUSR1, follow in the output)")
        for pid, _, _, _ in _process_tree(root):
            if _catches(pid, signal.SIGUSR1):  # (one that does not would die of it)
                try:
                    os.kill(pid, signal.SIGUSR1)
                except OSError:
                    pass
        time.sleep(5)
    return "\n".join(lines) + "\n"


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for signal ``signum`` (its SigCgt mask in /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except OSError:
        pass
    return False


def kill_tree(root: int) -> None:
    """SIGKILL ``root`` and every process below it. Not its process group alone: torchrun starts
    each worker in a session of its own, so killing torchrun's group leaves the workers running."""
    for pid, _, _, _ in reversed(_process_tree(root)):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:  # already gone
            pass


def run_once(args, options: list, work_dir: Path, timeout: float) -> tuple:
    """One torchrun of the demo (:func:`run_command`)."""
    command = [
        # --standalone: torchrun binds a free port itself (picking one here and passing it races
        # with other launches on the machine)
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
        str(REPO / "tools" / "train.py"), str(REPO / DEMOS[args.demo]), "--launcher", "pytorch",
        "--work-dir", str(work_dir), "--cfg-options", *options,
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("VITASKS_FAULTHANDLER_SIGNAL", "USR1")  # stacks on demand when py-spy is missing
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return run_command(command, env, timeout, args.py_spy)


def run_command(command: list, env: dict, timeout: float, py_spy: str = None) -> tuple:
    """Run ``command`` (torchrun) from the repository; returns (exit status or "timeout", crashed,
    seconds, output). One that exceeds ``timeout`` has the stacks of all its processes dumped
    (:func:`dump_stacks`) at the end of its output, then is killed with every process under it
    (:func:`kill_tree`)."""
    start = time.monotonic()
    # Its own session: the terminal's Ctrl-C reaches the soak, which then ends the run (kill_tree).
    proc = subprocess.Popen(command, cwd=str(REPO), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stacks = dump_stacks(proc.pid, py_spy)
        kill_tree(proc.pid)
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # something outside the tree still holds the pipe
            output = ""
        output = (output or "") + "\n" + stacks
        return "timeout", bool(_CRASH.search(output)), time.monotonic() - start, output
    except BaseException:  # Ctrl-C or an error here: no run may outlive the soak
        kill_tree(proc.pid)
        raise
    return proc.returncode, bool(_CRASH.search(output)), time.monotonic() - start, output


def left_threads(output: str) -> bool:
    """Whether a process reported backend threads still running after its teardown (see
    vitasks.engine.distributed.shutdown_distributed)."""
    return "still running after the process group was destroyed" in output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="how many runs (default 50)")
    parser.add_argument("--nproc", type=int, default=2, help="processes per run (default 2)")
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--demo", choices=sorted(DEMOS), default="cls", help="which demo config")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one run may take")
    parser.add_argument("--log-dir", default=None, help="where the logs of failed runs go (default: the temp folder)")
    parser.add_argument("--cpu", action="store_true", help="hide GPUs (gloo on the CPU)")
    parser.add_argument("--py-spy", default=None, metavar="PATH",
                        help="py-spy, to dump the stacks of a run that hangs (default: py-spy on PATH)")
    parser.add_argument("--stop-on-failure", action="store_true")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="vitasks_soak_"))
    log_dir = Path(args.log_dir) if args.log_dir else tmp / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    data_root = make_data(tmp / "data", args.demo)
    options = cfg_options(args.demo, data_root, args.strategy)
    print(f"soak: {args.runs} runs of {DEMOS[args.demo]} ({args.strategy}, {args.nproc} processes); "
          f"data in {data_root}", flush=True)
    failed, crashed, timed_out, seconds, leftovers = [], [], [], [], []
    for i in range(1, args.runs + 1):
        work_dir = tmp / f"run{i}"
        code, crash, took, output = run_once(args, options, work_dir, args.timeout)
        seconds.append(took)
        if left_threads(output):
            leftovers.append(i)
        ok = code == 0 and not crash
        if not ok:
            failed.append(i)
            crashed += [i] if crash else []
            timed_out += [i] if code == "timeout" else []
            (log_dir / f"run{i}.log").write_text(output)
        print(f"run {i:3d}: exit {code}{' CRASH' if crash else ''}{' THREADS-LEFT' if i in leftovers else ''} {took:6.1f} s"
              f"{'' if ok else '  log: ' + str(log_dir / f'run{i}.log')}", flush=True)
        shutil.rmtree(work_dir, ignore_errors=True)
        if failed and args.stop_on_failure:
            break
    done = len(seconds)
    print(f"soak: {done - len(failed)}/{done} runs exited 0; aborts/crashes: {len(crashed)} {crashed}; "
          f"timeouts: {len(timed_out)} {timed_out}; other failures: "
          f"{sorted(set(failed) - set(crashed) - set(timed_out))}; backend threads left at exit: "
          f"{len(leftovers)} {leftovers}; "
          f"{sum(seconds):.0f} s in all, {sum(seconds) / max(done, 1):.1f} s per run", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
