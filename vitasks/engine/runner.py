"""The Runner that vitasks trains and tests with: mmengine's, with a few things made safe.

What :class:`VitasksRunner` changes in mmengine's ``Runner`` (0.10.x), and why:

- checkpoints are read through :mod:`vitasks.engine.checkpoint` (``weights_only=True`` with an
  allowlist), which is what lets mmengine's own checkpoints be resumed on torch >= 2.6;
- ``load_from`` follows the vitasks rules (task heads of another shape skipped, any other
  shape difference a :class:`~vitasks.errors.CheckpointError`);
- ``resume`` may be ``False``, ``True``/``"auto"`` (the work dir's ``last_checkpoint``) or a
  path, and never confuses ``load_from`` (pretrained weights) with a checkpoint to resume;
- an exception or Ctrl-C (or SIGTERM) during training saves a checkpoint and points
  ``last_checkpoint`` at it before re-raising, and an epoch-based run resumed from such a
  mid-epoch checkpoint skips the batches it had already trained on;
- with mixed precision on, validation and test run under the same autocast;
- on a machine without GPUs, distributed runs wrap the model in DDP without ``device_ids``
  (mmengine passes ``device_ids=[LOCAL_RANK]``, which DDP rejects for CPU modules);
- the merged config is written to the work dir as YAML (:func:`vitasks.config.dump_config`);
- every random draw of training derives from ``randomness.seed``: the samplers become the seeded
  ones of :mod:`vitasks.data.seeding` (a seed per sample, whatever worker loads it) and
  :class:`~vitasks.engine.hooks.IterationSeedHook` re-seeds the process before each iteration, so
  two runs with one seed, or a killed run resumed, end with bit-identical weights;
- checkpoints are written to a temporary file and renamed, ``last_checkpoint`` is replaced
  atomically (:class:`~vitasks.engine.hooks.AtomicCheckpointHook`), and a resume whose newest
  checkpoint cannot be read says so and falls back to the previous one.
"""

from __future__ import annotations

import copy
import glob
import os
import os.path as osp
import signal
import threading
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Optional, Sequence

import torch
from mmengine.dist import is_main_process, master_only
from mmengine.hooks import CheckpointHook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper
from mmengine.registry import MODEL_WRAPPERS as MMENGINE_MODEL_WRAPPERS
from mmengine.runner import Runner
from mmengine.runner.base_loop import BaseLoop
from mmengine.runner.loops import (
    EpochBasedTrainLoop,
    IterBasedTrainLoop,
    TestLoop,
    ValLoop,
    _InfiniteDataloaderIterator,
    _update_losses,
)

from vitasks.checks import building, config_key
from vitasks.engine.amp import autocast_dtype, device_type
from vitasks.data.seeding import SEEDED_SAMPLERS, can_skip_samples
from vitasks.engine.architecture import ARCHITECTURE_KEY, backbone_architecture
from vitasks.engine.checkpoint import get_state_dict, load_checkpoint_file, load_model_weights
from vitasks.engine.fsdp import check_strategy, full_state_dicts, load_full_state, shard_model
from vitasks.engine.hooks import AtomicCheckpointHook, IterationSeedHook, replace_atomic, write_text_atomic
from vitasks.errors import CheckpointError, VitasksError
from vitasks.last_checkpoint import LAST_CHECKPOINT, read_last_checkpoint
from vitasks.registry import LOOPS

__all__ = [
    "VitasksRunner",
    "ResumableEpochBasedTrainLoop",
    "ResumableIterBasedTrainLoop",
    "AutocastValLoop",
    "AutocastTestLoop",
    "LAST_CHECKPOINT",
    "read_last_checkpoint",
]

# LAST_CHECKPOINT ("last_checkpoint", the file mmengine's CheckpointHook points at the newest
# checkpoint) and its reader live in vitasks.last_checkpoint (no torch: benchmarks import it
# without the Runner; hooks.py uses the name too). Resuming below reads the file with it too and
# falls back to earlier checkpoints on its own.


@LOOPS.register_module()
class ResumableEpochBasedTrainLoop(EpochBasedTrainLoop):
    """mmengine's epoch loop, able to continue an epoch that a stopped run left half done.

    A checkpoint saved when a run stops mid-epoch records the iterations done; resuming from it,
    the batches of that epoch already trained on are skipped (the sampler order of an epoch is
    fixed by the seed and epoch), so no batch is trained twice.
    """

    def run_epoch(self) -> None:
        self.runner.call_hook("before_train_epoch")
        self.runner.model.train()
        done = self._iter - self._epoch * len(self.dataloader)
        start = 0
        if done > 0:
            print_log(
                f"Resuming epoch {self._epoch + 1} after {done} of its {len(self.dataloader)} "
                "iterations: skipping the batches already trained on",
                logger="current",
            )
            if can_skip_samples(self.dataloader):  # skipped in the sampler, not loaded
                self.dataloader.sampler.skip(done * self.dataloader.batch_size)
                start = done
        for idx, data_batch in enumerate(self.dataloader, start):
            if idx < done:
                continue
            self.run_iter(idx, data_batch)
        self.runner.call_hook("after_train_epoch")
        self._epoch += 1


class _SkipFirst:
    """Iterator whose first ``count`` items are ``None`` (nothing loaded), then ``iterator``'s."""

    def __init__(self, count: int, iterator) -> None:
        self.count = count
        self.iterator = iterator

    def __iter__(self):
        return self

    def __next__(self):
        if self.count > 0:
            self.count -= 1
            return None
        return next(self.iterator)


@LOOPS.register_module()
class ResumableIterBasedTrainLoop(IterBasedTrainLoop):
    """mmengine's iteration loop; on resume the trained batches are skipped in the seeded
    sampler instead of being loaded and thrown away (mmengine's way, which for a run resumed
    at iteration 80k of ADE20K means decoding 80k batches first)."""

    def run(self):
        if self._iter > 0 and can_skip_samples(self.dataloader):
            self.dataloader.sampler.skip(self._iter * self.dataloader.batch_size)
            # mmengine's run() calls next() `_iter` times to skip: give it that many free items
            # in front of a fresh iterator over the rest of the stream.
            self.dataloader_iterator = _SkipFirst(self._iter, _InfiniteDataloaderIterator(self.dataloader))
        return super().run()


class _AutocastMixin:
    """Runs the model's val/test step under autocast when ``dtype`` (or ``fp16``) is set."""

    amp_dtype: Optional[torch.dtype]
    fp16: bool

    def _autocast(self):
        if self.amp_dtype is None and not self.fp16:
            return nullcontext()
        device = device_type()
        # fp16=True without a dtype: mmengine's choice (bf16 on CPU, fp16 on GPU).
        dtype = self.amp_dtype or (torch.bfloat16 if device == "cpu" else torch.float16)
        return torch.autocast(device_type=device, dtype=dtype)


class _AutocastEvalLoop(_AutocastMixin):
    """mmengine's ``ValLoop``/``TestLoop`` (next in the MRO, for ``stage`` val/test) with ``dtype``
    (``"bfloat16"``/``"float16"``) for autocast."""

    stage = "val"

    def __init__(self, runner, dataloader, evaluator, fp16: bool = False, dtype: Optional[str] = None):
        super().__init__(runner, dataloader, evaluator, fp16=fp16)
        self.amp_dtype = autocast_dtype(dtype)

    @torch.no_grad()
    def run_iter(self, idx, data_batch: Sequence[dict]) -> None:
        stage = self.stage
        self.runner.call_hook(f"before_{stage}_iter", batch_idx=idx, data_batch=data_batch)
        with self._autocast():
            outputs = getattr(self.runner.model, f"{stage}_step")(data_batch)
        outputs, loss = _update_losses(outputs, getattr(self, f"{stage}_loss"))
        setattr(self, f"{stage}_loss", loss)
        self.evaluator.process(data_samples=outputs, data_batch=data_batch)
        self.runner.call_hook(f"after_{stage}_iter", batch_idx=idx, data_batch=data_batch, outputs=outputs)


@LOOPS.register_module()
class AutocastValLoop(_AutocastEvalLoop, ValLoop):
    """mmengine's ``ValLoop`` with ``dtype`` (``"bfloat16"``/``"float16"``) for autocast."""


@LOOPS.register_module()
class AutocastTestLoop(_AutocastEvalLoop, TestLoop):
    """mmengine's ``TestLoop`` with ``dtype`` (``"bfloat16"``/``"float16"``) for autocast."""

    stage = "test"


# The stage (train, val, test) whose loop is being built: its data loaders and evaluators are
# built under the config keys `<stage>_dataloader.dataset` and `<stage>_evaluator`.
_STAGE: ContextVar[Optional[str]] = ContextVar("vitasks_loop_stage", default=None)


@contextmanager
def _loop_stage(stage: str):
    token = _STAGE.set(stage)
    try:
        yield
    finally:
        _STAGE.reset(token)


def _building_part(part: str, *below: str):
    """:func:`vitasks.checks.building` for the loop's ``<stage>_<part>`` (and ``below`` it), so
    errors name that key; under a key already being built (a multi-task loop's
    ``train_dataloader.tasks.<name>``) only ``below``; outside a loop's build nothing."""
    if config_key():
        return building(*below)
    stage = _STAGE.get()
    return building(f"{stage}_{part}", *below) if stage else nullcontext()


def _swap_loop_type(loop, default_cls, names: tuple, **defaults):
    """Use our subclass where the config asks for mmengine's loop (by name or by default)."""
    if not isinstance(loop, dict):
        return loop
    loop = copy.deepcopy(dict(loop))
    if "type" not in loop or loop["type"] in names:
        loop["type"] = default_cls
        for key, value in defaults.items():
            if value is not None:
                loop.setdefault(key, value)
    return loop


class _Interrupted(KeyboardInterrupt):
    """SIGTERM (a scheduler stopping the job, torchrun stopping the other ranks) during training."""


@contextmanager
def _sigterm_raises():
    """Turn SIGTERM into an exception while training, so the interrupt checkpoint is written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Interrupted(f"training stopped by signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _earlier_checkpoints(work_dir: str, newest: str) -> list:
    """Training checkpoints in ``work_dir`` other than ``newest``, newest first (by the time they
    were written). ``best_*`` checkpoints hold no optimizer state and are left out."""
    paths = [
        p for p in glob.glob(osp.join(work_dir, "*.pth"))
        if not osp.basename(p).startswith("best_") and osp.abspath(p) != osp.abspath(newest)
    ]
    return sorted(paths, key=os.path.getmtime, reverse=True)


def _hook_type(hook):
    return hook.get("type") if isinstance(hook, dict) else type(hook)


def _loaders_of(loop) -> list:
    """The torch DataLoaders a built loop holds (one, or one per task in a dict); none for a loop
    not built yet (still its config)."""
    if not isinstance(loop, BaseLoop):
        return []
    found = []
    for value in vars(loop).values():
        for item in (value.values() if isinstance(value, dict) else [value]):
            if isinstance(item, torch.utils.data.DataLoader):
                found.append(item)
    return found


class VitasksRunner(Runner):
    """mmengine's Runner with safe checkpoint loading, interrupt checkpoints and CPU DDP.

    Built like mmengine's (``VitasksRunner.from_cfg(cfg)``); ``cfg.resume`` may be ``False``,
    ``True``/``"auto"`` or a checkpoint path.
    """

    def __init__(self, *args, **kwargs):
        self._resuming = False
        self._evaluating = False
        self._last_saved_iter: Optional[int] = None
        self._fsdp = False  # strategy: fsdp (set in wrap_model)
        self._loaded_before_sharding = False
        self._full_state = None  # FSDP: the gathered state dicts of the checkpoint being saved
        self._resume_checkpoint = None  # FSDP: the checkpoint being resumed (its optimizer state)
        super().__init__(*args, **kwargs)

    # ----------------------------------------------------------------------------- config
    @master_only
    def dump_config(self) -> None:
        """Write the merged config to the work dir as ``<config name>.yaml``."""
        from vitasks.config import dump_config

        name = osp.splitext(osp.basename(self.cfg.filename))[0] if self.cfg.filename else self.timestamp
        try:
            dump_config(self.cfg, osp.join(self.work_dir, f"{name}.yaml"))
        except VitasksError as e:  # e.g. a config built in Python holding objects, not YAML data
            self.logger.warning(f"The merged config could not be written as YAML: {e}")

    @property
    def amp_dtype(self) -> Optional[str]:
        """The autocast dtype of mixed-precision training, or None when it is off."""
        ow = self.cfg.get("optim_wrapper") or {}
        wrapper_type = ow.get("type") if isinstance(ow, dict) else None
        name = getattr(wrapper_type, "__name__", wrapper_type)
        return ow.get("dtype", "bfloat16") if name == "MixedPrecisionOptimWrapper" else None

    # ----------------------------------------------------------------------------- hooks, data
    def register_hooks(self, default_hooks=None, custom_hooks=None) -> None:
        default_hooks = dict(copy.deepcopy(dict(default_hooks or {})))
        checkpoint = default_hooks.get("checkpoint", dict(type="CheckpointHook", interval=1))
        if isinstance(checkpoint, dict) and checkpoint.get("type") in ("CheckpointHook", CheckpointHook):
            default_hooks["checkpoint"] = dict(checkpoint, type=AtomicCheckpointHook)
        custom_hooks = list(custom_hooks or [])
        if not any(_hook_type(h) in ("IterationSeedHook", IterationSeedHook) for h in custom_hooks):
            custom_hooks.append(dict(type=IterationSeedHook))
        super().register_hooks(default_hooks, custom_hooks)

    @staticmethod
    def build_dataloader(dataloader, seed=None, diff_rank_seed=False):
        """mmengine's, with ``DefaultSampler``/``InfiniteSampler`` swapped for the seeded ones
        (same order; each index also carries its sample's seed)."""
        if isinstance(dataloader, dict):
            sampler = dataloader.get("sampler")
            if isinstance(sampler, dict) and sampler.get("type") in SEEDED_SAMPLERS:
                dataloader = dict(copy.deepcopy(dict(dataloader)))
                dataloader["sampler"] = dict(sampler, type=SEEDED_SAMPLERS[sampler["type"]])
        with _building_part("dataloader", "dataset"):
            return Runner.build_dataloader(dataloader, seed=seed, diff_rank_seed=diff_rank_seed)

    def build_evaluator(self, evaluator):
        with _building_part("evaluator"):
            return super().build_evaluator(evaluator)

    # ----------------------------------------------------------------------------- loops
    def build_train_loop(self, loop):
        """mmengine's loops, by name or by ``by_epoch``, become their resumable subclasses."""
        if isinstance(loop, dict) and ("type" in loop or "by_epoch" in loop):
            loop = dict(copy.deepcopy(dict(loop)))
            if "type" not in loop:
                loop["type"] = "EpochBasedTrainLoop" if loop.pop("by_epoch") else "IterBasedTrainLoop"
            resumable = {"EpochBasedTrainLoop": ResumableEpochBasedTrainLoop,
                         "IterBasedTrainLoop": ResumableIterBasedTrainLoop}
            loop["type"] = resumable.get(loop["type"], loop["type"])
        with _loop_stage("train"):
            return super().build_train_loop(loop)

    def build_val_loop(self, loop):
        loop = _swap_loop_type(loop, AutocastValLoop, ("ValLoop",), dtype=self.amp_dtype)
        with _loop_stage("val"):
            return super().build_val_loop(loop)

    def build_test_loop(self, loop):
        loop = _swap_loop_type(loop, AutocastTestLoop, ("TestLoop",), dtype=self.amp_dtype)
        with _loop_stage("test"):
            return super().build_test_loop(loop)

    # ----------------------------------------------------------------------------- DDP
    def wrap_model(self, model_wrapper_cfg, model):
        """``strategy: ddp`` (the default): mmengine's DDP wrapper (on CPUs without device_ids);
        ``strategy: fsdp``: FSDP2's ``fully_shard`` per transformer block (:mod:`vitasks.engine.fsdp`)."""
        strategy = check_strategy(self.cfg.get("strategy"), self.distributed)
        if not self.distributed or is_model_wrapper(model):
            return super().wrap_model(model_wrapper_cfg, model)
        if strategy == "fsdp":
            return self._shard(model)
        world = torch.distributed.get_world_size()
        count = sum(p.numel() for p in model.parameters())
        self.logger.info(f"DDP wraps the model: {count:,} parameters, replicated on each of {world} ranks")
        if device_type() != "cpu":
            return super().wrap_model(model_wrapper_cfg, model)
        # CPU (gloo) data parallel: DDP must not get device_ids for a CPU module.
        model = model.to("cpu")
        if self.cfg.get("sync_bn") is not None:
            self.logger.warning("sync_bn is ignored on CPU: SyncBatchNorm needs GPUs")
        wrapper_cfg = dict(copy.deepcopy(model_wrapper_cfg)) if model_wrapper_cfg else dict(
            broadcast_buffers=False,
            find_unused_parameters=self.cfg.get("find_unused_parameters", False),
        )
        wrapper_cfg.setdefault("type", "MMDistributedDataParallel")
        return MMENGINE_MODEL_WRAPPERS.build(wrapper_cfg, default_args=dict(module=model))

    def _init_model_weights(self) -> None:
        if not self._fsdp:  # (under FSDP done before sharding, in _shard)
            super()._init_model_weights()

    def _shard(self, model):
        from mmengine.device import get_device

        model = model.to(get_device())
        # What mmengine does in train() (init_weights, then every rank takes rank 0's values)
        # must happen before sharding: it broadcasts whole tensors.
        if hasattr(model, "init_weights"):
            model.init_weights()
        for tensor in model.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)
        if self._load_from is not None:
            # Pretrained weights go in before sharding, with every load_from rule (skipped heads,
            # resampled position embeddings); a resume later replaces them.
            self.load_checkpoint(self._load_from)
            self._loaded_before_sharding = True
        model, description = shard_model(model, autocast_dtype(self.amp_dtype))
        self._fsdp = True
        self.logger.info(description)
        return model

    # ----------------------------------------------------------------------------- loading
    def load_or_resume(self) -> None:
        """Resume (``resume``: True/"auto" or a path) or else initialise from ``load_from``."""
        if self._has_loaded:
            return
        resumed = False
        if self._resume is True or self._resume == "auto":
            try:
                # The path it names, or the same file name in this work dir when the work dir
                # was moved or copied since (then the path written there no longer exists).
                newest = read_last_checkpoint(self.work_dir, required=False)
            except CheckpointError as err:  # empty or unreadable: the checkpoints may be fine
                self.logger.error(f"resume: {err}; trying the checkpoints in {self.work_dir}")
                newest = ""
            if newest is None:
                self.logger.warning(
                    f"resume: no {LAST_CHECKPOINT} file in {self.work_dir}, training from the start"
                )
            else:
                self._resume_newest_readable(newest)
                resumed = True
        elif self._resume:
            resume_from = str(self._resume)
            if not osp.isfile(resume_from):
                raise CheckpointError(f"resume: checkpoint {resume_from!r} does not exist")
            self.logger.info(f"Resuming from {resume_from}")
            self.resume(resume_from)
            resumed = True
        if not resumed and self._load_from is not None and not self._loaded_before_sharding:
            self.load_checkpoint(self._load_from)
        self._has_loaded = resumed or self._load_from is not None

    def _resume_newest_readable(self, newest: str) -> None:
        """Resume from ``newest`` (what ``last_checkpoint`` names; empty when that file could not
        be read) or, when it is missing or cannot be read (a run killed while saving with an older
        mmengine, a full disk, a damaged file), from the newest earlier training checkpoint in the
        work dir that can."""
        tried = []
        for path in ([newest] if newest else []) + _earlier_checkpoints(self.work_dir, newest):
            problem = None
            if not osp.isfile(path):
                problem = "it does not exist"
            else:
                try:
                    self.logger.info(f"Resuming from {path}")
                    self.resume(path)
                    return
                except CheckpointError as e:
                    problem = str(e)
            tried.append(path)
            self.logger.error(
                f"resume: cannot resume from {path} ({problem}); trying the previous checkpoint"
            )
        where = osp.join(self.work_dir, LAST_CHECKPOINT)
        named = f"names {newest!r}" if newest else "could not be read"
        raise CheckpointError(
            f"resume: {where} {named}, and no checkpoint in {self.work_dir} could be "
            f"resumed from (tried {', '.join(map(repr, tried))}); pass the checkpoint to resume "
            "from explicitly, or start without --resume"
        )

    def resume(self, filename: str, resume_optimizer: bool = True, *args, **kwargs) -> None:
        self._resuming = True
        try:
            # Under FSDP the optimizer state is scattered to the shards here, not by mmengine.
            super().resume(filename, resume_optimizer and not self._fsdp, *args, **kwargs)
            if self._fsdp and resume_optimizer and "optimizer" in self._resume_checkpoint:
                load_full_state(self.model, None, self.optim_wrapper.optimizer, self._resume_checkpoint["optimizer"])
        finally:
            self._resuming = False
            self._resume_checkpoint = None
        self._last_saved_iter = self.iter  # this state is already on disk

    def load_checkpoint(self, filename: str, map_location="cpu", strict: bool = False, revise_keys=None):
        """Read ``filename`` safely and load its weights into the model.

        While resuming or evaluating every shape must match; for ``load_from`` before
        training, task-head weights of another shape are skipped (see
        :func:`~vitasks.engine.checkpoint.load_model_weights`).
        """
        checkpoint = load_checkpoint_file(filename, map_location=map_location)
        source = f"checkpoint {filename!r}"
        if self._resuming:
            missing = [k for k in ("meta", "state_dict", "message_hub") if k not in checkpoint]
            if missing:
                raise CheckpointError(
                    f"cannot resume from {filename!r}: it has no {', '.join(missing)} (not a training "
                    "checkpoint written by vitasks/mmengine); use load_from to start from its weights"
                )
        state_dict = get_state_dict(checkpoint, source)
        if not (isinstance(checkpoint, dict) and "state_dict" in checkpoint):
            # Hooks (EMA...) expect mmengine's layout.
            checkpoint = dict(state_dict=state_dict, meta={})
        self.call_hook("after_load_checkpoint", checkpoint=checkpoint)
        model = self.model.module if is_model_wrapper(self.model) else self.model
        if self._fsdp:
            # Full weights (every rank read the file) scattered to the shards; a sharded model
            # takes only an exact match (load_from weights went in before sharding).
            load_full_state(model, checkpoint["state_dict"])
            self._resume_checkpoint = checkpoint
        else:
            load_model_weights(
                model,
                checkpoint["state_dict"],
                source,
                skip_head_mismatch=not (self._resuming or self._evaluating),
            )
        self._has_loaded = True
        self.logger.info(f"Loaded weights from {filename}")
        return checkpoint

    # ----------------------------------------------------------------------------- saving
    def save_checkpoint(self, out_dir: str, filename: str, *args, **kwargs):
        # mmengine fills in meta["iter"]; remember it to avoid saving the same state twice.
        if kwargs.get("meta") is None:
            kwargs["meta"] = {}
        # The backbone's settings that change outputs, so that a config that differs is named
        # when these weights are loaded (vitasks.engine.architecture).
        model = self.model.module if is_model_wrapper(self.model) else self.model
        architecture = backbone_architecture(getattr(model, "backbone", None))
        if architecture is not None:
            kwargs["meta"].setdefault(ARCHITECTURE_KEY, architecture)
        if self._fsdp:
            # Gathered by every rank (a collective); rank 0 writes them (call_hook below).
            optimizer = self.optim_wrapper.optimizer if kwargs.get("save_optimizer", True) else None
            self._full_state = full_state_dicts(self.model, optimizer)
        try:
            self._save_checkpoint_file(out_dir, filename, *args, **kwargs)
        finally:
            self._full_state = None
        self._last_saved_iter = kwargs["meta"].get("iter")

    def call_hook(self, fn_name: str, **kwargs) -> None:
        if fn_name == "before_save_checkpoint" and self._full_state is not None:
            checkpoint = kwargs["checkpoint"]
            checkpoint["state_dict"], optim_state = self._full_state
            if optim_state is not None:
                checkpoint["optimizer"] = optim_state
        super().call_hook(fn_name, **kwargs)

    def _save_checkpoint_file(self, out_dir: str, filename: str, *args, **kwargs) -> None:
        if osp.isdir(out_dir):
            # Written under a temporary name and renamed: a kill during the save leaves the
            # previous checkpoints and `last_checkpoint` as they were, never a partial file.
            tmp_name = f".{filename}.tmp"
            super().save_checkpoint(out_dir, tmp_name, *args, **kwargs)
            if is_main_process():
                replace_atomic(osp.join(out_dir, tmp_name), osp.join(out_dir, filename))
        else:  # a remote backend: its own put is what we have
            super().save_checkpoint(out_dir, filename, *args, **kwargs)

    def _save_interrupt_checkpoint(self, exc: BaseException) -> None:
        """Save the training state so that ``resume`` continues where the run stopped."""
        loop = self._train_loop
        if not isinstance(loop, BaseLoop) or not isinstance(self.optim_wrapper, OptimWrapper):
            return  # training had not started: nothing to keep
        if loop.iter == 0 or loop.iter == self._last_saved_iter:
            return  # nothing trained, or the newest checkpoint already holds this state
        if self._fsdp:
            # Gathering the shards needs every rank, and a stopping rank cannot count on the others.
            self.logger.warning(
                f"Training stopped ({type(exc).__name__}) at iteration {loop.iter}; under FSDP no "
                "interrupt checkpoint is written: --resume continues from the last periodic checkpoint"
            )
            return
        filename = f"interrupted_iter_{loop.iter}.pth"
        try:
            self.save_checkpoint(
                self.work_dir, filename, meta=dict(epoch=loop.epoch, iter=loop.iter), by_epoch=False
            )
            if is_main_process():
                path = osp.join(self.work_dir, filename)
                write_text_atomic(osp.join(self.work_dir, LAST_CHECKPOINT), path)
                self.logger.warning(
                    f"Training stopped ({type(exc).__name__}) at iteration {loop.iter}: saved {path}; "
                    "continue with --resume"
                )
        except Exception as save_error:  # keep the original error as the one raised
            self.logger.error(f"Could not save a checkpoint after the run stopped: {save_error}")

    def train(self) -> torch.nn.Module:
        with _sigterm_raises():
            try:
                return super().train()
            except (Exception, KeyboardInterrupt) as exc:
                self._save_interrupt_checkpoint(exc)
                raise
            finally:
                self.release_loader_workers()

    def val(self) -> dict:
        self._evaluating = True
        try:
            return super().val()
        finally:
            self.release_loader_workers()

    def test(self) -> dict:
        self._evaluating = True
        try:
            return super().test()
        finally:
            self.release_loader_workers()

    def release_loader_workers(self) -> None:
        """End the worker processes the run's data loaders keep (``persistent_workers``) once the
        run is over. Left to the garbage collector, each is joined wherever a later
        ``gc.collect()`` finds it, and torch then waits its 5 s timeout per loader: in the next
        train/test of the same process (a notebook, a test suite) and in a distributed run's exit.
        Ended here it takes a few milliseconds; a loader used again starts new workers."""
        for loop in (self._train_loop, self._val_loop, self._test_loop):
            for loader in _loaders_of(loop):
                iterator = getattr(loader, "_iterator", None)
                if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                    iterator._shutdown_workers()
                loader._iterator = None
