"""Hooks that make training reproducible and its checkpoints safe to kill.

- :class:`IterationSeedHook` re-seeds the random generators of the training process before each
  iteration from ``(seed, iteration, rank)``: drop path, dropout and the batch augments (Mixup,
  CutMix) then draw the same numbers in a resumed run as in the uninterrupted one, whatever ran
  before (validation, data loading in the main process, a different number of workers).
- :class:`EMAHook` keeps an exponential moving average of the weights (DeiT's / timm's model EMA,
  with an optional warm-up), evaluates and picks the best checkpoint on it, and stores it in the
  checkpoints so that a resumed run continues it bit for bit.
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
from mmengine.hooks import EMAHook as _MMEngineEMAHook
from mmengine.model import BaseAveragedModel, is_model_wrapper

from vitasks.checks import InRange, NonNegativeInt, OrNone, PositiveInt, checked, not_both
from vitasks.data.seeding import derive_seed
from vitasks.last_checkpoint import LAST_CHECKPOINT
from vitasks.registry import HOOKS

__all__ = ["IterationSeedHook", "AtomicCheckpointHook", "EMAHook", "ModelEMA", "write_text_atomic", "replace_atomic"]


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
        write_text_atomic(osp.join(runner.work_dir, LAST_CHECKPOINT), self.last_ckpt)
        for old_step in outdated:
            path = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(old_step))
            if self.file_backend.isfile(path):
                self.file_backend.remove(path)
            elif self.file_backend.isdir(path):  # checkpoints saved by deepspeed are folders
                self.file_backend.rmtree(path)


class ModelEMA(BaseAveragedModel):
    """Exponential moving average of a model's weights: ``ema = decay * ema + (1 - decay) * w``
    (DeiT's and timm's ``decay``; mmengine's ``momentum`` is ``1 - decay``), applied every
    ``interval``-th update (mmengine's ``BaseAveragedModel``: its first update copies the weights;
    ``steps`` counts the updates and is saved with the averaged weights). With ``warmup`` the
    decay of update t is ``min(decay, (1 + t) / (10 + t))`` (TensorFlow's ``num_updates`` rule, as
    the brief's timm option), so the average forgets the random start quickly."""

    def __init__(self, model, decay: float = 0.9998, interval: int = 1, warmup: bool = False,
                 update_buffers: bool = False, device=None) -> None:
        super().__init__(model, interval, device, update_buffers)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self._weight = 1.0 - self.decay

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        t = int(self.steps)
        return min(self.decay, (1.0 + t) / (10.0 + t))

    def update_parameters(self, model) -> None:
        self._weight = 1.0 - self.current_decay()  # once per update (one host sync)
        super().update_parameters(model)

    def avg_func(self, averaged_param, source_param, steps) -> None:
        averaged_param.lerp_(source_param, self._weight)


@HOOKS.register_module()
class EMAHook(_MMEngineEMAHook):
    """Model EMA (DeiT's ``model_ema``; mmengine's ``EMAHook`` with DeiT's settings).

    After every training iteration the averaged weights (:class:`ModelEMA`) take a step towards
    the model's. With ``evaluate`` (default) validation, testing and ``save_best`` use the
    averaged weights, and a checkpoint's ``state_dict`` holds them (mmengine's layout: what
    ``init_model`` and deployment load), the trained weights going to ``ema_state_dict``; without
    it the EMA is kept alongside (``ema_state_dict``) and evaluation uses the trained weights.
    Resuming restores the average and its update count exactly, so a resumed run equals the
    uninterrupted one. Not with ``strategy: fsdp`` (the average would need the full weights).

    Args:
        decay: weight of the old average per update (DeiT: 0.99996; 0 < decay < 1).
        interval: update every ``interval`` iterations.
        warmup: ``decay_t = min(decay, (1 + t) / (10 + t))``.
        evaluate: evaluate (and choose the best checkpoint) on the averaged weights.
        update_buffers: average the buffers too (else they are copied).
        begin_iter, begin_epoch: until then the average is the model (mmengine's).
        momentum: mmengine's name for ``1 - decay`` (give one of the two).
        strict_load: accepted for mmengine configs (resuming always loads the average strictly).
    """

    config_key = "custom_hooks: EMAHook"  # an entry of the list

    @checked
    def __init__(self, decay: OrNone(InRange(0, 1, True, True)) = None, interval: PositiveInt = 1,
                 warmup: bool = False, evaluate: bool = True, update_buffers: bool = False,
                 begin_iter: NonNegativeInt = 0, begin_epoch: NonNegativeInt = 0,
                 momentum: OrNone(InRange(0, 1, True, True)) = None, strict_load: bool = False) -> None:
        not_both(self.config_key, decay=decay, momentum=momentum)  # momentum = 1 - decay
        not_both(self.config_key, begin_iter=begin_iter, begin_epoch=begin_epoch)
        decay = 0.9998 if decay is None and momentum is None else decay if decay is not None else 1.0 - momentum
        super().__init__(strict_load=strict_load, begin_iter=begin_iter, begin_epoch=begin_epoch)
        self.decay = float(decay)
        self.interval = interval
        self.warmup = bool(warmup)
        self.evaluate = bool(evaluate)
        self.update_buffers = bool(update_buffers)
        self._swapped = False  # the model holds the averaged weights (during evaluation)

    def before_run(self, runner) -> None:
        if getattr(runner, "_fsdp", False):
            from vitasks.errors import ConfigError

            raise ConfigError("custom_hooks: EMAHook does not work with strategy: fsdp (the average needs the "
                              "full weights on every rank); use strategy: ddp or remove the hook")
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        self.src_model = model
        self.ema_model = ModelEMA(model, self.decay, self.interval, self.warmup, self.update_buffers)

    def _swap_ema_parameters(self) -> None:
        super()._swap_ema_parameters()
        self._swapped = not self._swapped

    def _averaging(self) -> bool:
        """Evaluate on the average: only once it has been updated in this run (or resumed);
        a model evaluated as loaded (tools/test.py) already holds the checkpoint's averaged
        ``state_dict``."""
        return self.evaluate and int(self.ema_model.steps) > 0

    def before_val_epoch(self, runner) -> None:
        if self._averaging() and not self._swapped:
            self._swap_ema_parameters()

    def after_val_epoch(self, runner, metrics=None) -> None:
        if self._swapped:
            self._swap_ema_parameters()

    before_test_epoch = before_val_epoch
    after_test_epoch = after_val_epoch

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint["ema_state_dict"] = self.ema_model.state_dict()
        # While evaluating (a run stopped during validation) the model holds the average and the
        # EMA module the trained weights: the checkpoint already has the evaluated layout.
        if self.evaluate and not self._swapped:
            self._swap_ema_state_dict(checkpoint)
        checkpoint.setdefault("meta", {})["ema_in_state_dict"] = self.evaluate

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Resuming: the trained weights back into ``state_dict`` (the model loads them next) and
        the average, with its update count, into the EMA. Other loads (``load_from``, testing)
        leave the EMA alone: its first update copies the model."""
        if not getattr(runner, "_resuming", runner._resume):
            return
        if "ema_state_dict" not in checkpoint:
            runner.logger.warning("EMAHook: the resumed checkpoint has no ema_state_dict; the average restarts "
                                  "from the model's weights")
            return
        if (checkpoint.get("meta") or {}).get("ema_in_state_dict", True):
            self._swap_ema_state_dict(checkpoint)  # the trained weights back to state_dict
        self.ema_model.load_state_dict(checkpoint["ema_state_dict"], strict=True)
