"""Hooks that make training reproducible and its checkpoints safe to kill.

- :class:`IterationSeedHook` re-seeds the random generators of the training process before each
  iteration from ``(seed, iteration, rank)``: drop path, dropout and the batch augments (Mixup,
  CutMix) then draw the same numbers in a resumed run as in the uninterrupted one, whatever ran
  before (validation, data loading in the main process, a different number of workers).
- :class:`AtomicCheckpointHook` is mmengine's ``CheckpointHook`` with the order of its writes
  made safe: the checkpoint is written to a temporary file and renamed (the Runner does that),
  then ``last_checkpoint`` is replaced atomically, and only then are outdated checkpoints
  removed, so a kill at any moment leaves ``last_checkpoint`` naming a complete file.

:class:`~vitasks.engine.runner.VitasksRunner` adds the first and swaps the second in for
``CheckpointHook``; configs need not name them.
"""

from __future__ import annotations

import os
import os.path as osp
import random
import tempfile

import numpy as np
import torch
from mmengine.dist import get_rank, is_main_process
from mmengine.hooks import CheckpointHook, Hook

from vitasks.data.seeding import derive_seed
from vitasks.registry import HOOKS

__all__ = ["IterationSeedHook", "AtomicCheckpointHook", "write_text_atomic", "replace_atomic"]


def replace_atomic(tmp_path: str, path: str) -> None:
    """Flush ``tmp_path`` to disk and rename it to ``path`` (atomic on POSIX file systems)."""
    with open(tmp_path, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp_path, path)
    try:  # make the rename itself durable
        dir_fd = os.open(osp.dirname(osp.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old or the new content, never a part."""
    folder = osp.dirname(osp.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix=f".{osp.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        replace_atomic(tmp_path, path)
    except BaseException:
        if osp.exists(tmp_path):
            os.remove(tmp_path)
        raise


@HOOKS.register_module()
class IterationSeedHook(Hook):
    """Seeds torch, numpy and python's generators before every training iteration from
    ``derive_seed(seed, iteration, rank)``.

    Args:
        seed: The base seed; ``None`` takes the Runner's (``randomness.seed``).
    """

    priority = "VERY_HIGH"

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        base = self.seed if self.seed is not None else runner.seed
        seed = derive_seed(base, runner.iter, get_rank())
        torch.manual_seed(seed)  # all devices
        np.random.seed(seed)
        random.seed(seed)


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """mmengine's ``CheckpointHook``: save first, point ``last_checkpoint`` at it atomically, then
    remove the outdated checkpoints (mmengine removes them before saving the new one, so with
    ``max_keep_ckpts: 1`` a kill in between left no checkpoint at all)."""

    def _save_checkpoint_with_step(self, runner, step, meta):
        ckpt_filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, ckpt_filename)
        runner.message_hub.update_info("last_ckpt", self.last_ckpt)

        outdated = []
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            # (_save_checkpoint and _save_best_checkpoint may both save at one step)
            # (a deque with maxlen max_keep_ckpts: take the oldest out before it is dropped)
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                outdated.append(self.keep_ckpt_ids.popleft())
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info("keep_ckpt_ids", list(self.keep_ckpt_ids))

        runner.save_checkpoint(
            self.out_dir,
            ckpt_filename,
            self.file_client_args,
            save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler,
            meta=meta,
            by_epoch=self.by_epoch,
            backend_args=self.backend_args,
            **self.args,
        )
        if not is_main_process():
            return
        write_text_atomic(osp.join(runner.work_dir, "last_checkpoint"), self.last_ckpt)
        for old_step in outdated:
            path = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(old_step))
            if self.file_backend.isfile(path):
                self.file_backend.remove(path)
            elif self.file_backend.isdir(path):  # checkpoints saved by deepspeed are folders
                self.file_backend.rmtree(path)
