"""Peak memory per process of data-parallel training under DDP and under FSDP, side by side.

    python tools/bench_fsdp.py CONFIG DATA_ROOT [--nproc 2] [--iters 2] [--cfg-options ...]

Trains ``--iters`` iterations of CONFIG (batch 1 per process, no validation, no checkpoint) with
``strategy: ddp`` and then ``strategy: fsdp`` under torchrun, and prints each rank's peak resident
memory (``ru_maxrss``) and the time per iteration. DATA_ROOT is a dataset of the config's layout
(``tools/make_synthetic.py cls DIR`` for a classification config). Example, ViT-L/16 at 224:

    python tools/make_synthetic.py cls /tmp/cls
    python tools/bench_fsdp.py configs/cls_imagenet.yaml /tmp/cls --cfg-options num_classes=10 \\
        model.backbone.embed_dim=1024 model.backbone.depth=24 model.backbone.num_heads=16 \\
        model.head.in_channels=1024

This file is also the plugin (``plugins: [tools/bench_fsdp.py]``) that records the memory.
"""

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

try:  # as a plugin inside the training processes
    from mmengine.hooks import Hook

    from vitasks.registry import HOOKS

    @HOOKS.register_module(force=True)
    class PeakMemoryHook(Hook):
        """Writes ``{"rank", "peak_rss_mib", "seconds_per_iter"}`` to ``out_dir/rank<r>.json``
        after training (the first iteration is left out of the time: warm-up)."""

        def __init__(self, out_dir: str):
            self.out_dir = out_dir
            self.started = None

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if self.started is None:
                self.started, self.first_iter = time.perf_counter(), runner.iter

        def after_train(self, runner):
            import torch.distributed as dist

            rank = dist.get_rank() if dist.is_initialized() else 0
            iters = max(runner.iter - self.first_iter, 1)
            record = dict(
                rank=rank,
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                seconds_per_iter=(time.perf_counter() - self.started) / iters,
            )
            Path(self.out_dir, f"rank{rank}.json").write_text(json.dumps(record))

except ImportError:  # pragma: no cover
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(config: str, data_root: str, strategy: str, nproc: int, iters: int, options: list) -> list:
    out_dir = tempfile.mkdtemp(prefix=f"bench_{strategy}_")
    hook = f"[{{type: PeakMemoryHook, out_dir: {out_dir}}}]"
    cfg_options = [
        f"data_root={data_root}", f"strategy={strategy}", f"plugins=[{Path(__file__).resolve()}]",
        f"custom_hooks={hook}", f"train_cfg={{_delete_: true, type: IterBasedTrainLoop, max_iters: {iters}, val_interval: 1000000}}",
        "train_dataloader.batch_size=1", "train_dataloader.num_workers=0", "train_dataloader.persistent_workers=false",
        "train_dataloader.sampler={type: InfiniteSampler, shuffle: true}", "param_scheduler=[]",
        "default_hooks.checkpoint={type: CheckpointHook, interval: 1000000, save_last: false}",
        "val_dataloader=null", "val_cfg=null", "val_evaluator=null", "log_level=WARNING", *options,
    ]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={_free_port()}", str(REPO / "tools" / "train.py"), config,
               "--launcher", "pytorch", "--work-dir", out_dir, "--cfg-options", *cfg_options]
    subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(nproc)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("data_root")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--cfg-options", nargs="*", default=[])
    args = parser.parse_args(argv)
    rows = []
    for strategy in ("ddp", "fsdp"):
        for record in run(args.config, args.data_root, strategy, args.nproc, args.iters, args.cfg_options):
            rows.append((strategy, record))
    print("| strategy | rank | peak RSS MiB | s / iteration |")
    print("|---|---|---|---|")
    for strategy, r in rows:
        print(f"| {strategy} | {r['rank']} | {r['peak_rss_mib']:.0f} | {r['seconds_per_iter']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
