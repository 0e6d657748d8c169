"""One backbone, many tasks: :class:`MultiTaskModel`.

A multi-task model is one shared backbone and several named tasks (``model.tasks.<name>``), each
a single-task model (``ImageClassifier``, ``EncoderDecoder``, ``TwoStageDetector``, a plugin's
task model...) built with a :class:`SharedBackboneView` in place of its own backbone. The task
models keep all of their code (necks, heads, losses, ``predict``); the view hands each of them
the backbone outputs it reads:

- no ``out_indices.<task>``: the pooled feature ``(pooled,)``, as a classifier expects;
- ``out_indices.<task>: [3, 5, 7, 11]``: those blocks' maps (B, C, h, w), as a segmentor's
  neck expects; ``[-1]`` is the last map, what ViTDet's simple feature pyramid reads (a
  detector task: ``TwoStageDetector`` with ``SimpleFeaturePyramid``; the backbone may be
  windowed, the blocks run as configured);
- a clip task (a ``Recognizer``, or any task model with ``reads_clips = True``): clips
  (N, 3, T, H, W) go through the shared image backbone frame by frame (N * T images) and the
  pooled features are averaged over time, ``(mean_t pooled_t,)`` of shape (N, C), as a video
  head expects (TSN-style late fusion). The image token layout is kept, so the image tasks and
  the video task share every weight; there is no attention across frames (a joint space-time
  token layout would need temporal position embeddings the image tasks do not have).

Inside :meth:`MultiTaskModel.single_pass` the backbone runs once over the batch for every output
any task reads, and each task's view picks its own from that pass; outside it (training, where
each task has its own batch) a view runs the backbone for just what its task reads.

Config::

    model:
      type: MultiTaskModel
      backbone: {type: VisionTransformer, ...}      # shared; its own out_indices are not used
      tasks:
        cls: {type: ImageClassifier, head: {...}, data_preprocessor: {...}, loss_weight: 1.0}
        seg: {type: EncoderDecoder, neck: {...}, decode_head: {...}}
      out_indices: {seg: [0, 1, 2, 3]}             # what each dense task reads (default: pooled)
      loss_weights: {cls: 1.0, seg: 0.5}           # default 1.0

A task's config is its single-task model config without ``backbone`` (the multi-task settings
sit beside ``tasks``, so every task config is checked against its own model's arguments).

State-dict keys: ``backbone.*`` (shared) and ``tasks.<name>.<the task model's own keys>``, e.g.
``tasks.cls.head.fc.weight``; :meth:`MultiTaskModel.adapt_state_dict` maps a single-task
checkpoint's ``head.*`` (``decode_head.*``...) onto the task that has those keys.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import warnings
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmengine.model import BaseDataPreprocessor, BaseModel
from mmengine.optim import OptimWrapper

from vitasks.checks import block_indices, building, component_class, config_errors, options
from vitasks.errors import ConfigError
from vitasks.models.tasks.base import build_part
from vitasks.registry import MODELS

__all__ = ["MultiTaskModel", "SharedBackboneView", "OutputSpec", "TASK_KEY_PREFIX"]

#: Task models sit under this module name: ``tasks.<name>.*`` in the state dict.
TASK_KEY_PREFIX = "tasks"
_TASK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class OutputSpec:
    """What a task reads from the backbone: the pooled feature, or maps of some blocks; and
    whether its inputs are clips (pooled per frame, averaged over time)."""

    def __init__(self, out_indices: Optional[Sequence[int]], depth: Optional[int], task: str,
                 clips: bool = False) -> None:
        self.clips = bool(clips)
        if out_indices is None:
            self.map_indices: Optional[Tuple[int, ...]] = None
            return
        if isinstance(out_indices, int) and not isinstance(out_indices, bool):
            out_indices = [out_indices]
        self.map_indices = block_indices(out_indices, depth, f"model.out_indices.{task}", allow_empty=False)

    @property
    def pooled(self) -> bool:
        return self.map_indices is None

    def select(self, outputs: "BackboneOutputs") -> Tuple[torch.Tensor, ...]:
        if self.map_indices is None:
            return (outputs.pooled,)
        return tuple(outputs.maps[i] for i in self.map_indices)


class BackboneOutputs:
    """Everything one backbone pass produced: the pooled feature and maps by block index."""

    def __init__(self, pooled: Optional[torch.Tensor], maps: Dict[int, torch.Tensor]) -> None:
        self.pooled = pooled
        self.maps = maps


class SharedBackboneView(nn.Module):
    """What a task model holds as its ``backbone``: no weights, just the outputs its task reads.

    Attributes a task model asks its backbone for (``stride``, ``embed_dim``...) are the shared
    backbone's. The shared backbone is kept outside the module tree (its weights are the multi-
    task model's ``backbone.*``, saved once).
    """

    def __init__(self, task: str, spec: OutputSpec, fetch: Callable[[torch.Tensor, OutputSpec], Tuple[torch.Tensor, ...]],
                 shared: nn.Module) -> None:
        super().__init__()
        self.task = task
        self.spec = spec
        self.__dict__["_fetch"] = fetch
        self.__dict__["_shared"] = shared

    def forward(self, inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return self._fetch(inputs, self.spec)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            shared = self.__dict__.get("_shared")
            if shared is None or name.startswith("__"):
                raise
            return getattr(shared, name)

    def extra_repr(self) -> str:
        reads = "pooled" if self.spec.pooled else f"maps of blocks {list(self.spec.map_indices)}"
        return f"task={self.task!r}, reads {reads} of the shared backbone"


def _same_batch(cached: torch.Tensor, inputs: torch.Tensor) -> bool:
    """Whether ``inputs`` is the single pass's batch: the same tensor, a full view of it, or an
    equal copy (a task's predict may slice it to the unpadded size or resize it by a ratio of 1)."""
    if inputs.shape != cached.shape or inputs.dtype != cached.dtype or inputs.device != cached.device:
        return False
    if inputs.data_ptr() == cached.data_ptr() and inputs.stride() == cached.stride():
        return True
    return bool(torch.equal(inputs, cached))


def _reads_maps(task: nn.Module) -> bool:
    """Dense task models (a segmentor's decode head, a detector's pyramid) need maps."""
    return hasattr(task, "decode_head") or hasattr(task, "rpn_head") or getattr(task, "reads_maps", False)


def _reads_clips(task: nn.Module) -> bool:
    """Video task models (a recognizer, or a plugin's model declaring ``reads_clips``) take clips."""
    declared = getattr(task, "reads_clips", None)
    if declared is not None:
        return bool(declared)
    from vitasks.models.tasks.recognizer import Recognizer

    return isinstance(task, Recognizer)


def _can_walk_blocks(backbone: nn.Module) -> bool:
    """Whether the backbone gives block maps and the pooled feature from one pass
    (``forward_intermediates`` with ``pooled``, as vitasks' ViT); a token reduction changes the
    token set and what a block index means: run as configured."""
    intermediates = getattr(backbone, "forward_intermediates", None)
    if not callable(intermediates) or getattr(backbone, "token_reduction", None) is not None:
        return False
    return "pooled" in inspect.signature(intermediates).parameters


def _input_normalisation(preprocessor: nn.Module) -> Optional[str]:
    """How a task's data preprocessor normalises its images, in words ("standardised per image"
    or "mean [...] std [...]"); None when it says neither, or when its mean/std have no values
    (built on the meta device): nothing to compare."""
    if getattr(preprocessor, "per_image_norm", None) is not None:
        return "standardised per image"
    mean, std = getattr(preprocessor, "mean", None), getattr(preprocessor, "std", None)
    if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor) and not (mean.is_meta or std.is_meta):
        return f"mean {mean.flatten().tolist()} std {std.flatten().tolist()}"
    return None


def _warn_if_batchnorm_sees_mixed_inputs(backbone: nn.Module, tasks: Mapping[str, nn.Module]) -> None:
    """A BatchNorm in the shared backbone keeps one set of running statistics for every task's
    inputs; tasks that normalise their images differently give it a mixture that fits none of
    them in evaluation (measured: the multi-task demo's classification fell from ~60 % to 25 %).
    Said once, when the model is built."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules()):
        return
    kinds: Dict[str, List[str]] = {}
    for name, task in tasks.items():
        kind = _input_normalisation(getattr(task, "data_preprocessor", None))
        if kind is not None:
            kinds.setdefault(kind, []).append(name)
    if len(kinds) > 1:
        described = "; ".join(f"{', '.join(names)}: {kind}" for kind, names in kinds.items())
        warnings.warn(
            "MultiTaskModel: the shared backbone has BatchNorm layers (one set of running statistics for every task), "
            f"but the tasks normalise their images differently ({described}); give every task the same "
            "normalisation (e.g. per_image_norm in each task's data_preprocessor) or a stem without BatchNorm "
            "(stem.norm: LN)", stacklevel=2)


@MODELS.register_module()
class MultiTaskModel(BaseModel):
    """One shared backbone and named tasks; see the module docstring.

    ``forward(inputs, data_samples, mode)`` runs every task on one batch from one backbone pass
    and returns ``{task: output}``: ``"tensor"`` each task's raw output, ``"predict"`` each
    task's predicted samples (copies of ``data_samples``, one set per task), ``"loss"`` the
    weighted losses prefixed ``<task>/``.

    ``train_step(data)`` takes ``{task: batch}`` (one task's batch, or every task's when the
    loop accumulates gradients across tasks); each batch goes through its task's own data
    preprocessor and loss, weighted by the task's ``loss_weight``; the backward runs per task
    (one graph alive at a time) and the optimizer steps once. ``val_step``/``test_step`` take
    ``{task: batch}`` with one task and return its predictions.

    Args:
        backbone: the shared backbone config (any stem, windowed or not).
        tasks: ``{name: task config}``; a task config is a task model config without
            ``backbone``.
        out_indices: ``{task: block indices}`` for the tasks that read maps (see the module
            docstring); the others read the pooled feature.
        loss_weights: ``{task: weight}`` (default 1.0 each).
        data_preprocessor: for one batch shared by every task (single-pass inference); default:
            the first task's preprocessor.
        init_cfg: mmengine initialisation config.
    """

    def __init__(
        self,
        backbone: Union[dict, nn.Module],
        tasks: Mapping[str, dict],
        out_indices: Optional[Mapping[str, Sequence[int]]] = None,
        loss_weights: Optional[Mapping[str, float]] = None,
        data_preprocessor: Optional[Union[dict, nn.Module]] = None,
        init_cfg: Optional[dict] = None,
    ) -> None:
        if not isinstance(tasks, Mapping) or not tasks:
            raise ConfigError("MultiTaskModel: `model.tasks` must be a mapping {name: task config} with at least one task")
        super().__init__(data_preprocessor=BaseDataPreprocessor(), init_cfg=init_cfg)
        self.backbone = build_part(backbone, "MultiTaskModel", "backbone")
        depth = getattr(self.backbone, "depth", None)
        self.tasks = nn.ModuleDict()
        self.loss_weights: Dict[str, float] = {}
        self.specs: Dict[str, OutputSpec] = {}
        for key, given in (("out_indices", out_indices), ("loss_weights", loss_weights)):
            unknown = [n for n in (given or {}) if n not in tasks]
            if unknown:
                raise ConfigError(f"model.{key}: {unknown} are not tasks of model.tasks ({list(tasks)})")
        for name, cfg in tasks.items():
            reads = (out_indices or {}).get(name)
            weight = float((loss_weights or {}).get(name, 1.0))
            self.tasks[name] = self._build_task(name, cfg, depth, reads, weight)
        if not _can_walk_blocks(self.backbone):
            reads = {self._reads(s) for s in self.specs.values()}
            if len(reads) > 1:
                raise ConfigError(
                    f"MultiTaskModel: the backbone {type(self.backbone).__name__} is run as it is configured, "
                    f"so every task must read the same outputs; the tasks read {sorted(reads)}"
                )
        _warn_if_batchnorm_sees_mixed_inputs(self.backbone, self.tasks)
        if data_preprocessor is None:
            first = next(iter(self.tasks.values()))
            self.data_preprocessor = first.data_preprocessor
        else:
            self.data_preprocessor = build_part(data_preprocessor, "MultiTaskModel", "data_preprocessor")
        self._single_pass: Optional[Tuple[torch.Tensor, BackboneOutputs]] = None
        #: How many times the shared backbone ran (single-pass inference is checked with it).
        self.backbone_calls = 0

    # ------------------------------------------------------------------ building
    @staticmethod
    def _reads(spec: OutputSpec) -> str:
        return "pooled" if spec.pooled else f"maps {list(spec.map_indices)}"

    def _build_task(self, name: str, cfg: dict, depth: Optional[int], out_indices: Optional[Sequence[int]],
                    weight: float) -> nn.Module:
        where = f"model.tasks.{name}"
        if not isinstance(name, str) or not _TASK_NAME.match(name):
            raise ConfigError(f"model.tasks: task name {name!r} must be a Python-style identifier (it prefixes "
                              "metric names as '<name>/...' and state-dict keys as 'tasks.<name>.')")
        cfg = options(cfg, where, what="a dict with a `type` (a task model such as ImageClassifier)", required=("type",))
        if "backbone" in cfg:
            raise ConfigError(f"{where}: a task has no backbone of its own; `model.backbone` is shared by every task "
                              f"(say what it reads with model.out_indices.{name})")
        model_type = cfg.pop("type")
        spec = OutputSpec(out_indices, depth, name)
        model_cls = component_class(model_type, MODELS, where, "model")
        view = SharedBackboneView(name, spec, self._fetch, self.backbone)
        # the task's parts name model.tasks.<name>.<part>
        with config_errors(where, ConfigError, TypeError), building("tasks", name, root="model"):
            task = model_cls(backbone=view, **cfg)
        clips = _reads_clips(task)  # what the task reads is known once it is built
        wrong = (f"model.out_indices.{name}: task {name!r} reads clips, which the shared image backbone turns into the "
                 "time-averaged pooled feature; it cannot read block maps (remove the entry)"
                 if clips and out_indices is not None else
                 f"{where}: a {type(task).__name__} reads feature maps, but the task reads the pooled feature; say "
                 f"which blocks' maps it reads with model.out_indices.{name} (e.g. [3, 5, 7, 11], or [-1] for "
                 "ViTDet's pyramid)" if spec.pooled and _reads_maps(task) else None)
        if wrong:
            raise ConfigError(wrong)
        if clips:
            view.spec = spec = OutputSpec(None, depth, name, clips=True)
        self.loss_weights[name] = weight
        self.specs[name] = spec
        return task

    # ------------------------------------------------------------------ the shared pass
    def run_backbone(self, inputs: torch.Tensor, map_indices: Sequence[int], pooled: bool) -> BackboneOutputs:
        """One backbone pass over ``inputs`` producing the maps of ``map_indices`` and, with
        ``pooled``, the pooled feature."""
        self.backbone_calls += 1
        backbone = self.backbone
        if not _can_walk_blocks(backbone):
            # Run as configured; every task reads the same (checked when built).
            outputs = backbone(inputs)
            outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
            if pooled:
                return BackboneOutputs(outputs[0], {})
            return BackboneOutputs(None, dict(zip(sorted(set(map_indices)), outputs)))
        wanted = sorted(set(map_indices))
        # As VisionTransformer's own maps: the final norm on the last block's map only.
        outputs = backbone.forward_intermediates(inputs, wanted, stop_early=not pooled, intermediates_only=not pooled,
                                                 norm_last_block=True, pooled=True)
        pooled_feature, maps = outputs if pooled else (None, outputs)
        return BackboneOutputs(pooled_feature, dict(zip(wanted, maps)))

    def _fetch(self, inputs: torch.Tensor, spec: OutputSpec) -> Tuple[torch.Tensor, ...]:
        """A task view's forward: the single pass's outputs when ``inputs`` is its batch, else a
        pass of its own (training; or a task that resized or padded the batch)."""
        if spec.clips:
            return (self.clip_features(inputs),)
        cached = self._single_pass
        if cached is not None and _same_batch(cached[0], inputs):
            return spec.select(cached[1])
        outputs = self.run_backbone(inputs, spec.map_indices or (), spec.pooled)
        return spec.select(outputs)

    def clip_features(self, clips: torch.Tensor) -> torch.Tensor:
        """Clips (N, 3, T, H, W) -> (N, C): every frame through the shared backbone in one pass
        (N * T images), the pooled features averaged over time."""
        if clips.dim() != 5:
            raise ValueError(f"a clip task's inputs must be clips (N, 3, T, H, W), got shape {tuple(clips.shape)}")
        n, channels, t, h, w = clips.shape
        frames = clips.transpose(1, 2).reshape(n * t, channels, h, w)
        pooled = self.run_backbone(frames, (), True).pooled
        return pooled.reshape(n, t, -1).mean(dim=1)

    @property
    def image_tasks(self) -> List[str]:
        """The tasks that read images (all but the clip tasks), in config order."""
        return [n for n, s in self.specs.items() if not s.clips]

    @property
    def clip_tasks(self) -> List[str]:
        return [n for n, s in self.specs.items() if s.clips]

    @contextlib.contextmanager
    def single_pass(self, inputs: torch.Tensor, tasks: Optional[Sequence[str]] = None) -> Iterator[None]:
        """Within this block, image tasks that read ``inputs`` get their outputs from one backbone
        pass (clip tasks run their own frame pass)."""
        names = list(tasks) if tasks is not None else self.image_tasks
        specs = [self.specs[n] for n in names if not self.specs[n].clips]
        if not specs:
            yield
            return
        indices = sorted({i for s in specs if not s.pooled for i in s.map_indices})
        outputs = self.run_backbone(inputs, indices, any(s.pooled for s in specs))
        self._single_pass = (inputs, outputs)
        try:
            yield
        finally:
            self._single_pass = None

    # ------------------------------------------------------------------ modes
    def forward(self, inputs: torch.Tensor, data_samples: Optional[Sequence] = None, mode: str = "tensor",
                tasks: Optional[Sequence[str]] = None) -> Dict[str, object]:
        """Every task (or ``tasks``) on one batch, from one backbone pass: ``{task: output}``.
        Without ``tasks``: the image tasks for images (N, 3, H, W), the clip tasks for clips
        (N, 3, T, H, W). In ``"loss"`` mode the outputs are the weighted, prefixed losses."""
        if mode not in ("tensor", "predict", "loss"):
            raise ValueError(f"MultiTaskModel: unknown mode {mode!r}; expected 'tensor', 'loss' or 'predict'")
        if tasks is not None:
            names = list(tasks)
        else:
            names = self.clip_tasks if inputs.dim() == 5 else self.image_tasks
        unknown = [n for n in names if n not in self.tasks]
        if unknown:
            raise ValueError(f"MultiTaskModel: {unknown} are not tasks of the model ({list(self.tasks)})")
        if mode == "loss" and len(names) == 1:
            # One task's training batch: its view runs the backbone for just what it reads.
            name = names[0]
            return {name: self._weighted(name, self.tasks[name](inputs, data_samples, mode="loss"))}
        results: Dict[str, object] = {}
        with self.single_pass(inputs, names):
            for name in names:
                samples = None
                if data_samples is not None:
                    samples = [s.clone() if hasattr(s, "clone") else s for s in data_samples]
                output = self.tasks[name](inputs, samples, mode=mode)
                results[name] = self._weighted(name, output) if mode == "loss" else output
        return results

    def _weighted(self, name: str, losses: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``<task>/<key>``; loss terms scaled by the task's ``loss_weight`` (logged values such as
        accuracies are left as they are)."""
        weight = self.loss_weights[name]
        return {f"{name}/{k}": (v * weight if "loss" in k and weight != 1.0 else v) for k, v in losses.items()}

    def _check_batch(self, data: Mapping, where: str) -> None:
        if not isinstance(data, Mapping) or not data or not set(data) <= set(self.tasks):
            got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(f"MultiTaskModel.{where} takes {{task name: batch}} with names among "
                             f"{sorted(self.tasks)}, got {got}")

    def task_loss(self, name: str, batch: dict, forward: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
        """Task ``name``'s weighted, prefixed losses on its own batch (its own preprocessor).

        ``forward``: the module to call for the loss, when not this model itself: its DDP
        wrapper, so that the wrapper sees the forward and synchronises the gradients.
        """
        task = self.tasks[name]
        batch = task.data_preprocessor(batch, True)
        run = self if forward is None else forward
        try:
            return run(batch["inputs"], batch.get("data_samples"), mode="loss", tasks=[name])[name]
        except torch.OutOfMemoryError:
            raise
        except (KeyError, AttributeError, ValueError, IndexError, RuntimeError) as e:
            raise ConfigError(
                f"task {name!r}: its {type(task).__name__} cannot learn from this batch ({type(e).__name__}: {e}); "
                f"check that model.tasks.{name} and train_dataloader.tasks.{name} are the same kind of task"
            ) from e

    def train_step(self, data: Mapping[str, dict], optim_wrapper: OptimWrapper,
                   ddp: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
        """One optimizer step on ``{task: batch}`` (one task, or several with ``accumulate``).

        ``ddp``: this model's ``DistributedDataParallel`` wrapper under data-parallel training
        (what :class:`~vitasks.engine.multitask_loop.MultiTaskTrainLoop` passes). Every task's
        forward then goes through the wrapper; with several tasks in one step the gradients are
        accumulated locally (``no_sync``) and all-reduced once, in the last task's backward.
        The wrapper must be built with ``find_unused_parameters`` (top-level
        ``find_unused_parameters: true``): the heads of the tasks not in the step get no
        gradient, and keep none (the optimizer skips them, as in a single process).

        Under FSDP (``strategy: fsdp``) this model is itself the sharded module and ``ddp`` is
        None: each task's backward reduce-scatters the gradients its graph reached into the
        shards, where the tasks' gradients add up (chosen over ``set_requires_gradient_sync``,
        which would hold every unsharded gradient until the last task's backward); parameters no
        task of the step reached keep no gradient, and the optimizer skips them here too.
        """
        self._check_batch(data, "train_step")
        log_vars: Dict[str, torch.Tensor] = {}
        total = 0.0
        names = list(data)
        for index, name in enumerate(names):
            local = ddp is not None and index < len(names) - 1
            with (ddp.no_sync() if local else contextlib.nullcontext()), optim_wrapper.optim_context(self):
                loss, task_log = self.parse_losses(self.task_loss(name, data[name], forward=ddp))
                # One task's graph at a time: its gradients add up in the shared backbone.
                optim_wrapper.backward(loss)
            task_log.pop("loss", None)
            log_vars.update(task_log)
            log_vars[f"{name}/loss"] = loss.detach()
            total = total + loss.detach()
        optim_wrapper.step()
        optim_wrapper.zero_grad()
        log_vars["loss"] = total
        return log_vars

    def val_step(self, data: Mapping[str, dict]) -> list:
        self._check_batch(data, "val_step")
        (name, batch), = data.items()
        return self.tasks[name].val_step(batch)

    def test_step(self, data: Mapping[str, dict]) -> list:
        self._check_batch(data, "test_step")
        (name, batch), = data.items()
        return self.tasks[name].test_step(batch)

    @torch.no_grad()
    def predict_all(self, data: dict, tasks: Optional[Sequence[str]] = None) -> Dict[str, List]:
        """Every task's predictions for one collated batch (``{"inputs", "data_samples"}``) from
        one backbone pass: ``{task: [samples]}`` (default: every image task). The batch is
        normalised by the model's ``data_preprocessor`` and padded to the backbone's stride (so
        no task pads it again)."""
        batch = self.data_preprocessor(data, False)
        inputs = batch["inputs"]
        stride = int(getattr(self.backbone, "stride", 1) or 1)
        pad_h, pad_w = (-inputs.shape[-2]) % stride, (-inputs.shape[-1]) % stride
        if pad_h or pad_w:
            inputs = nn.functional.pad(inputs, (0, pad_w, 0, pad_h))
        return self.forward(inputs, batch.get("data_samples"), mode="predict", tasks=tasks)

    # ------------------------------------------------------------------ checkpoints
    def adapt_state_dict(self, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> Dict[str, torch.Tensor]:
        """A single-task checkpoint's keys moved to where this model has them: ``backbone.*``
        stays (shared), every other key ``k`` goes to ``tasks.<name>.k`` for the task that has
        that key (the first such task; one task of each kind is the usual case). A multi-task
        checkpoint passes unchanged."""
        if any(k.startswith(TASK_KEY_PREFIX + ".") for k in state_dict):
            return dict(state_dict)
        own = set(self.state_dict().keys())
        adapted: Dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            plain = re.sub(r"^module\.", "", key)
            if plain.startswith("backbone.") or plain in own:
                adapted[plain] = value
                continue
            target = next((f"{TASK_KEY_PREFIX}.{n}.{plain}" for n in self.tasks
                           if f"{TASK_KEY_PREFIX}.{n}.{plain}" in own), None)
            adapted[target or plain] = value
        return adapted


def single_task_state_dict(state_dict: Mapping[str, torch.Tensor], own_keys: Sequence[str]) -> Dict[str, torch.Tensor]:
    """A multi-task checkpoint's weights for a single-task model: ``backbone.*`` as is, and the
    task whose ``tasks.<name>.*`` keys cover most of the model's other keys, without the prefix.
    Other state dicts pass unchanged."""
    prefix = TASK_KEY_PREFIX + "."
    if not any(k.startswith(prefix) for k in state_dict):
        return dict(state_dict)
    own = set(own_keys)
    names = sorted({k.split(".", 2)[1] for k in state_dict if k.startswith(prefix) and k.count(".") >= 2})

    def covered(name: str) -> int:
        start = f"{prefix}{name}."
        return sum(1 for k in state_dict if k.startswith(start) and k[len(start):] in own)

    best = max(names, key=covered) if names else None
    result = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    if best is not None and covered(best) > 0:
        start = f"{prefix}{best}."
        result.update({k[len(start):]: v for k, v in state_dict.items() if k.startswith(start)})
    return result
