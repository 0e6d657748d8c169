"""The distributed runs of tests/engine/test_multitask_distributed.py, in one torchrun launch.

    torchrun --nproc_per_node 2 multitask_dist_worker.py CONFIG OUT_DIR

Every run goes through ``vitasks.engine.launch.train`` as ``tools/train.py --launcher pytorch``
does; the process group is set up by the first and reused by the others, so the four runs pay
for one start-up of two processes:

- ``OUT_DIR/fsdp``: ``strategy: fsdp``, round robin, validated at its last iteration;
- ``OUT_DIR/fsdp_resumed``: the same, resumed from ``OUT_DIR/fsdp/iter_1.pth``;
- ``OUT_DIR/fsdp_accumulate``, ``OUT_DIR/ddp_accumulate``: one step with every task's batch
  (``accumulate: true``) under FSDP and under DDP (``no_sync`` for all but the last task).
"""

import os
import sys

from vitasks.engine.launch import train


def main(config: str, out_dir: str) -> None:
    fsdp = ["strategy=fsdp"]
    accumulate = ["train_cfg.accumulate=true", "train_cfg.max_iters=1"]
    train(config, work_dir=os.path.join(out_dir, "fsdp"), launcher="pytorch",
          cfg_options=fsdp + ["train_cfg.val_begin=1"])
    train(config, work_dir=os.path.join(out_dir, "fsdp_resumed"), launcher="pytorch", cfg_options=fsdp,
          resume=os.path.join(out_dir, "fsdp", "iter_1.pth"))
    train(config, work_dir=os.path.join(out_dir, "fsdp_accumulate"), launcher="pytorch",
          cfg_options=fsdp + accumulate)
    train(config, work_dir=os.path.join(out_dir, "ddp_accumulate"), launcher="pytorch",
          cfg_options=["strategy=ddp"] + accumulate)


if __name__ == "__main__":
    main(*sys.argv[1:3])
