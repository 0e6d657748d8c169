"""Joint training and evaluation of a :class:`~vitasks.models.tasks.multitask.MultiTaskModel`.

Config (one data loader and one evaluator per task, under ``tasks``, named as in ``model.tasks``)::

    train_dataloader:
      tasks:
        cls: {batch_size: 32, sampler: {type: InfiniteSampler, shuffle: true}, dataset: {...}}
        seg: {batch_size: 8, sampler: {type: InfiniteSampler, shuffle: true}, dataset: {...}}
    train_cfg:
      type: MultiTaskTrainLoop
      max_iters: 1200
      val_interval: 400
      schedule: round_robin        # or weighted (with weights: {cls: 2, seg: 1}; default: dataset sizes)
      accumulate: false            # true: every task's batch in every optimizer step
    val_dataloader: {tasks: {cls: {...}, seg: {...}}}
    val_evaluator: {tasks: {cls: {type: Accuracy}, seg: {type: IoUMetric}}, mean_of: [cls/accuracy/top1, seg/mIoU]}
    val_cfg: {type: MultiTaskValLoop}       # test_cfg: {type: MultiTaskTestLoop}

Which task trains at iteration ``i`` follows from the schedule alone: round robin cycles the
tasks; ``weighted`` draws the task from a generator seeded by ``(seed, i)`` (PolyViT's sampling by
task size). So a resumed run recomputes how many batches each task had consumed at the
checkpoint's iteration and skips that many in each task's seeded sampler (nothing is loaded
twice and nothing has to be saved): the resumed run trains on exactly the batches the
uninterrupted one would have.

Data parallel (torchrun): under DDP the model's own multi-task step runs through the DDP wrapper
(:meth:`MultiTaskModel.train_step`); under FSDP (``strategy: fsdp``) the model is sharded in
place and runs its step as in one process. Either way every rank trains the same task at an
iteration (the schedule's seed is the run's seed without ``diff_rank_seed``'s rank offset), which
FSDP needs (each rank must gather and reduce the same blocks) and which makes 2 processes train
like one with the two batches together.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from mmengine.dist import get_rank
from mmengine.logging import print_log
from mmengine.runner.loops import IterBasedTrainLoop, _InfiniteDataloaderIterator, _update_losses
from mmengine.runner.base_loop import BaseLoop
from mmengine.runner.utils import calc_dynamic_intervals

from vitasks.checks import building, one_of, options
from vitasks.data.seeding import can_skip_samples, derive_seed
from vitasks.engine.amp import autocast_dtype
from vitasks.engine.fsdp import is_sharded
from vitasks.engine.runner import _AutocastMixin
from vitasks.errors import ConfigError
from vitasks.evaluation.multitask import MultiTaskEvaluator
from vitasks.registry import LOOPS

__all__ = ["MultiTaskTrainLoop", "MultiTaskValLoop", "MultiTaskTestLoop", "TaskSchedule"]

SCHEDULES = ("round_robin", "weighted")


def _task_configs(section: object, key: str, task_names: Sequence[str], needed: Sequence[str] = (),
                  what: str = "data") -> Dict[str, object]:
    """``section.tasks`` checked against the model's task names; each of ``needed`` must have an
    entry (its ``what``)."""
    layout = "`{tasks: {<task name>: ...}}` for a multi-task model, one entry per task of model.tasks"
    tasks = options(options(section, key, what=layout, required=("tasks",))["tasks"], f"{key}.tasks", task_names,
                    what=layout)
    missing = [n for n in needed if n not in tasks]
    if missing:
        raise ConfigError(f"{key}.tasks has no {what} for tasks {missing}")
    return tasks


def _model_of(runner):
    model = runner.model
    return model.module if hasattr(model, "module") else model


def _multitask_model(runner, stage: str, loop: object, does: str):
    """The runner's model (unwrapped), which the loop ``loop`` (``<stage>_cfg.type``) needs to be a
    MultiTaskModel."""
    model = _model_of(runner)
    if not hasattr(model, "tasks"):
        raise ConfigError(f"{stage}_cfg.type {type(loop).__name__} {does} a MultiTaskModel (model.type), got "
                          f"{type(model).__name__}")
    return model


def _ddp_wrapper(model) -> Optional[torch.nn.Module]:
    """The model's ``DistributedDataParallel`` wrapper, or None (one process, or FSDP)."""
    return model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None


def _schedule_seed(runner) -> int:
    """The seed of the task schedule: the same on every rank. ``runner.seed`` has the rank added
    with ``randomness.diff_rank_seed`` (each rank's own augmentations), but the ranks must agree
    on which task trains at each iteration: under FSDP a rank training another task would wait in
    other collectives, under DDP the step would average the gradients of different tasks."""
    seed = runner.seed or 0
    if runner._randomness_cfg.get("diff_rank_seed", False):
        seed -= get_rank()
    return seed


@contextlib.contextmanager
def _root_parameters_gathered(model: torch.nn.Module):
    """Under FSDP, the parameters outside the transformer blocks (stem, position embedding, final
    norm, every task's head) stay gathered while this block runs.

    A task's ``val_step``/``test_step`` calls the task model, not the sharded root's forward, so
    the root's hook that gathers them does not run (the blocks gather their own when called).
    Does nothing without FSDP."""
    if not is_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def _check_data_fits(name: str, task: torch.nn.Module, dataset, key: str) -> None:
    """A task whose class count differs from its dataset's is named before training starts."""
    classes = (getattr(dataset, "metainfo", None) or {}).get("classes")
    num_classes = getattr(task, "num_classes", None)
    if num_classes is None:
        head = getattr(task, "head", None)
        num_classes = getattr(head, "num_classes", None)
    if classes is not None and num_classes is not None and len(classes) != int(num_classes):
        raise ConfigError(f"task {name!r}: the model has {num_classes} classes but {key}.tasks.{name}'s dataset has "
                          f"{len(classes)}; set the task's num_classes to match its data")


class TaskSchedule:
    """Which tasks train at each iteration, as a pure function of (seed, iteration).

    Args:
        names: task names, in config order.
        kind: ``round_robin`` or ``weighted``.
        weights: ``weighted`` only: relative frequency per task.
        accumulate: every task at every iteration (gradient accumulation across tasks).
        seed: the run's seed.
    """

    def __init__(self, names: Sequence[str], kind: str = "round_robin", weights: Optional[Mapping[str, float]] = None,
                 accumulate: bool = False, seed: int = 0) -> None:
        self.names = list(names)
        self.kind = one_of(kind, SCHEDULES, "train_cfg.schedule")
        self.accumulate = bool(accumulate)
        self.seed = int(seed)
        if kind == "weighted":
            weights = options(weights or {}, "train_cfg.weights", what=f"a weight for each task ({self.names})",
                              required=self.names)
            values = np.array([float(weights[n]) for n in self.names])
            if (values < 0).any() or values.sum() <= 0:
                raise ConfigError(f"train_cfg.weights must be >= 0 with a positive sum, got {weights}")
            self.probs = values / values.sum()
        else:
            self.probs = None

    def tasks_at(self, iteration: int) -> List[str]:
        if self.accumulate:
            return list(self.names)
        if self.kind == "round_robin":
            return [self.names[iteration % len(self.names)]]
        rng = np.random.default_rng(derive_seed(self.seed, iteration))
        return [self.names[int(rng.choice(len(self.names), p=self.probs))]]

    def batches_before(self, iteration: int) -> Dict[str, int]:
        """How many batches each task had consumed before ``iteration``."""
        counts = {n: 0 for n in self.names}
        if self.accumulate:
            return {n: iteration for n in self.names}
        if self.kind == "round_robin":
            cycles, rest = divmod(iteration, len(self.names))
            return {n: cycles + (1 if i < rest else 0) for i, n in enumerate(self.names)}
        for i in range(iteration):
            counts[self.tasks_at(i)[0]] += 1
        return counts


@LOOPS.register_module()
class MultiTaskTrainLoop(IterBasedTrainLoop):
    """Iteration-based joint training: one seeded data loader per task, the task (or every
    task, with ``accumulate``) of each iteration chosen by a :class:`TaskSchedule`; resumable
    (each task's loader position follows from the iteration and the schedule).

    Args:
        runner: the Runner.
        dataloader: ``{tasks: {name: dataloader config}}``.
        max_iters: iterations (optimizer steps).
        val_begin, val_interval, dynamic_intervals: as mmengine's ``IterBasedTrainLoop``.
        schedule: ``round_robin`` or ``weighted``.
        weights: ``weighted``: ``{task: weight}``; default each task's dataset size.
        accumulate: every task's batch in every step (gradients summed, one optimizer step).
    """

    def __init__(self, runner, dataloader: Union[dict, Mapping], max_iters: int, val_begin: int = 1,
                 val_interval: int = 1000, dynamic_intervals=None, schedule: str = "round_robin",
                 weights: Optional[Mapping[str, float]] = None, accumulate: bool = False) -> None:
        self._runner = runner
        model = _multitask_model(runner, "train", self, "trains")
        names = list(model.tasks)
        configs = _task_configs(dataloader, "train_dataloader", names, needed=names)
        diff_rank_seed = runner._randomness_cfg.get("diff_rank_seed", False)
        self.dataloaders = {}
        for name in names:
            with building("train_dataloader", "tasks", name):
                loader = runner.build_dataloader(copy.deepcopy(configs[name]), seed=runner.seed,
                                                 diff_rank_seed=diff_rank_seed)
            _check_data_fits(name, model.tasks[name], loader.dataset, "train_dataloader")
            self.dataloaders[name] = loader
        # mmengine's hooks and checkpoint meta read one loader: the first task's.
        self.dataloader = self.dataloaders[names[0]]
        if schedule == "weighted" and weights is None:
            weights = {n: len(loader.dataset) for n, loader in self.dataloaders.items()}
        self.schedule = TaskSchedule(names, schedule, weights, accumulate, seed=_schedule_seed(runner))
        self._max_iters = int(max_iters)
        self._max_epochs = 1
        self._epoch = 0
        self._iter = 0
        self.val_begin = val_begin
        self.val_interval = val_interval
        self.stop_training = False
        if hasattr(self.dataloader.dataset, "metainfo"):
            runner.visualizer.dataset_meta = self.dataloader.dataset.metainfo
        self.dynamic_milestones, self.dynamic_intervals = calc_dynamic_intervals(self.val_interval, dynamic_intervals)
        self.iterators: Dict[str, object] = {}
        self.ddp = _ddp_wrapper(runner.model)
        if self.ddp is not None and len(names) > 1 and not getattr(self.ddp, "find_unused_parameters", False):
            raise ConfigError(
                "a multi-task model under DDP needs `find_unused_parameters: true` (top level of the config): in each "
                "step the heads of the tasks that did not train get no gradient, which DDP otherwise waits for")

    def _start_iterators(self) -> None:
        """An endless iterator per task, after the batches trained on before ``self._iter``."""
        done = self.schedule.batches_before(self._iter)
        for name, loader in self.dataloaders.items():
            count = done[name]
            if count and can_skip_samples(loader):
                loader.sampler.skip(count * loader.batch_size)  # skipped in the sampler, not loaded
                count = 0
            iterator = _InfiniteDataloaderIterator(loader)
            for _ in range(count):  # a sampler that cannot skip: load and drop
                next(iterator)
            self.iterators[name] = iterator
        if self._iter:
            print_log(f"Resuming joint training at iteration {self._iter}: batches already trained per task {done}",
                      logger="current")

    def run_iter(self, data_batch: Dict[str, dict]) -> None:
        """mmengine's iteration, with the model's own multi-task ``train_step`` under DDP too
        (mmengine's DDP wrapper would run one preprocessor and one forward for the whole step).
        Under FSDP ``runner.model`` is the sharded model itself: its step is the plain one."""
        self.runner.call_hook("before_train_iter", batch_idx=self._iter, data_batch=data_batch)
        if self.ddp is not None:
            outputs = self.ddp.module.train_step(data_batch, optim_wrapper=self.runner.optim_wrapper, ddp=self.ddp)
        else:
            outputs = self.runner.model.train_step(data_batch, optim_wrapper=self.runner.optim_wrapper)
        self.runner.call_hook("after_train_iter", batch_idx=self._iter, data_batch=data_batch, outputs=outputs)
        self._iter += 1

    def run(self) -> torch.nn.Module:
        self.runner.call_hook("before_train")
        self.runner.call_hook("before_train_epoch")
        self._start_iterators()
        while self._iter < self._max_iters and not self.stop_training:
            self.runner.model.train()
            data_batch = {name: next(self.iterators[name]) for name in self.schedule.tasks_at(self._iter)}
            self.run_iter(data_batch)
            self._decide_current_val_interval()
            if (self.runner.val_loop is not None and self._iter >= self.val_begin
                    and (self._iter % self.val_interval == 0 or self._iter == self._max_iters)):
                self.runner.val_loop.run()
        self.runner.call_hook("after_train_epoch")
        self.runner.call_hook("after_train")
        return self.runner.model


class _MultiTaskEvalLoop(_AutocastMixin, BaseLoop):
    """Each task's data through the model and its own evaluator; metrics prefixed by task."""

    stage = "val"

    def __init__(self, runner, dataloader, evaluator, fp16: bool = False, dtype: Optional[str] = None) -> None:
        self._runner = runner
        model = _multitask_model(runner, self.stage, self, "evaluates")
        names = list(model.tasks)
        loader_key, evaluator_key = f"{self.stage}_dataloader", f"{self.stage}_evaluator"
        loaders = _task_configs(dataloader, loader_key, names)
        evaluators = _task_configs(evaluator, evaluator_key, names, needed=list(loaders),
                                   what=f"metric (tasks of {loader_key}.tasks)")
        self.dataloaders = {}
        for name in [n for n in names if n in loaders]:
            loader = loaders[name]
            if isinstance(loader, dict):
                with building(loader_key, "tasks", name):
                    loader = runner.build_dataloader(copy.deepcopy(loader), seed=runner.seed)
            self.dataloaders[name] = loader
        self.dataloader = next(iter(self.dataloaders.values()))
        self.evaluator = MultiTaskEvaluator({n: evaluators[n] for n in self.dataloaders}, runner.build_evaluator,
                                            mean_of=evaluator.get("mean_of"), where=evaluator_key)
        for name, loader in self.dataloaders.items():
            if hasattr(loader.dataset, "metainfo"):
                self.evaluator.evaluators[name].dataset_meta = loader.dataset.metainfo
        self.fp16 = fp16
        self.amp_dtype = autocast_dtype(dtype)

    def _step(self, data: dict) -> list:
        return self.runner.model.val_step(data)

    @torch.no_grad()
    def run(self) -> dict:
        stage = self.stage
        self.runner.call_hook(f"before_{stage}")
        self.runner.call_hook(f"before_{stage}_epoch")
        self.runner.model.eval()
        metrics: Dict[str, float] = {}
        index = 0
        for name, loader in self.dataloaders.items():
            evaluator = self.evaluator.evaluators[name]
            with _root_parameters_gathered(self.runner.model):
                for data_batch in loader:
                    self.runner.call_hook(f"before_{stage}_iter", batch_idx=index, data_batch=data_batch)
                    with self._autocast():
                        outputs = self._step({name: data_batch})
                    evaluator.process(data_samples=outputs, data_batch=data_batch)
                    self.runner.call_hook(f"after_{stage}_iter", batch_idx=index, data_batch=data_batch,
                                          outputs=outputs)
                    index += 1
            metrics.update(self.evaluator.evaluate(name, len(loader.dataset)))
        metrics = self.evaluator.add_mean(metrics)
        self.runner.call_hook(f"after_{stage}_epoch", metrics=metrics)
        self.runner.call_hook(f"after_{stage}")
        return metrics


@LOOPS.register_module()
class MultiTaskValLoop(_MultiTaskEvalLoop):
    """Validation of every task (``val_dataloader.tasks``, ``val_evaluator.tasks``)."""


@LOOPS.register_module()
class MultiTaskTestLoop(_MultiTaskEvalLoop):
    """Testing of every task (``test_dataloader.tasks``, ``test_evaluator.tasks``)."""

    stage = "test"

    def _step(self, data: dict) -> list:
        return self.runner.model.test_step(data)
