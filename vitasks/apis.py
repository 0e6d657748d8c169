"""Python API: build a model from a config, run it on images or videos, write drawn predictions.

>>> from vitasks.apis import init_model, inference_model
>>> model = init_model("configs/demo/cls.yaml", "work_dirs/cls/epoch_1.pth")
>>> logits = model(normalised_batch, mode="tensor")          # raw head output, (N, K)
>>> sample = inference_model(model, "cat.jpg")                 # the config's test pipeline
>>> sample.pred_score.topk(5)
>>> video = init_model("configs/demo/video_synthetic.yaml", "work_dirs/video_synthetic/epoch_30.pth")
>>> inference_model(video, "clip.mp4").pred_score                # sampled and cropped as in testing

``run_inference`` is what ``vitasks infer`` / ``tools/infer.py`` call: one JSON and one PNG per
input. Which test pipeline reads an input, and which tasks predict on its output, is decided in
one place, :func:`model_inputs`: a single-task model's test pipeline; for a multi-task model an
image goes through the top-level ``test_pipeline`` to every image task (one backbone pass), a
video through each clip task's own test pipeline to that task's ``test_step``. The drawing is
chosen per task (see :mod:`vitasks.visualization.drawers`), so a new task registers a drawer and
needs no change here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
from mmengine.config import Config
from mmengine.dataset import Compose, pseudo_collate
from torch import nn

from vitasks.checks import config_errors, options
from vitasks.data.dataset_cfg import test_dataset_cfg
from vitasks.errors import CheckpointError, ConfigError, DataError, VitasksError
from vitasks.registry import MODELS, TRANSFORMS

ConfigLike = Union[str, os.PathLike, Config, dict]
ImageLike = Union[str, os.PathLike, np.ndarray]

#: Pipeline steps that read an image file; left out when the input is already an array.
IMAGE_LOADERS = {"LoadImage"}
#: Pipeline steps that read annotations (ground truth); inference has none, so they are left out.
ANNOTATION_LOADERS = {"LoadAnnotations", "LoadSegMap", "LoadSegAnnotations", "LoadDetAnnotations"}

#: File name suffixes that ``run_inference`` collects from a folder given as input.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
#: File name suffixes of videos, which models with a video test pipeline read (see VIDEO_DECODERS).
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm")
#: Pipeline steps that decode video frames: a test pipeline with one reads video files, given to it
#: as ``{"filename": path}`` (its sampler probes the frame count).
VIDEO_DECODERS = {"DecodeFrames"}


# --------------------------------------------------------------------------------------------
# Config and model


def load_cfg(config: ConfigLike, cfg_options: Sequence[str] | dict | None = None) -> Config:
    """A config path (YAML, via :func:`vitasks.config.load_config`), a Config or a dict, with
    ``cfg_options`` applied and the config's plugins imported. Never modifies its argument."""
    from vitasks.config import as_config
    from vitasks.plugins import import_plugins

    cfg = as_config(config, cfg_options)

    import_plugins(cfg)
    return cfg


def _where(cfg: Config) -> str:
    return getattr(cfg, "filename", None) or "config"


def build_model(cfg: Config) -> nn.Module:
    """Build ``cfg.model`` from the vitasks registry (weights as initialised by the modules)."""
    options(cfg.get("model"), f"{_where(cfg)}: model", what="a `model` section (a dict with a `type`)",
            required=("type",))
    with config_errors(f"{_where(cfg)}: model", KeyError):  # an unregistered type; validate_config suggests
        return MODELS.build(cfg.model)


def read_checkpoint(path: str) -> tuple[dict, dict]:
    """``(state_dict, meta)`` of a checkpoint file, read safely (safetensors, or ``torch.load``
    with ``weights_only=True`` and the runtime's allowlist for mmengine records); ``meta`` is
    ``{}`` for a plain state dict."""
    from vitasks.engine.checkpoint import get_state_dict, load_checkpoint_file

    raw = load_checkpoint_file(path)
    state_dict = get_state_dict(raw, source=f"checkpoint file {path!r}")
    meta = raw.get("meta") if isinstance(raw, dict) and isinstance(raw.get("meta"), dict) else {}
    return state_dict, meta


def load_weights(model: nn.Module, state_dict: dict, source: str = "checkpoint") -> None:
    """Load ``state_dict`` into ``model`` for inference: every weight of the model must be
    there (a missing one raises CheckpointError); unused ones are logged."""
    from vitasks.engine.checkpoint import load_model_weights

    result = load_model_weights(model, state_dict, source, skip_head_mismatch=False)
    missing = result["missing"]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise CheckpointError(
            f"{source} lacks {len(missing)} weights of the model: {shown} (is it a checkpoint of "
            "this config? outside weights need `vitasks convert` first)"
        )


def _class_names(cfg: Config, meta: dict) -> list[str] | None:
    names = cfg.get("class_names")
    if isinstance(names, Mapping):  # a multi-task model's {task: names}: drawn per task
        return None
    if names is None:
        dataset_meta = (meta or {}).get("dataset_meta") or {}
        names = dataset_meta.get("classes")
    if names is None:
        dataset = test_dataset_cfg(cfg) or {}
        names = (dataset.get("metainfo") or {}).get("classes")
    if names is None and cfg.get("num_classes") == 150 and (test_dataset_cfg(cfg) or {}).get("type") == "ADE20KDataset":
        from vitasks.data.ade import ADE20K_CLASSES  # a bare (e.g. converted) ADE checkpoint

        names = ADE20K_CLASSES
    return [str(n) for n in names] if names is not None else None


def init_model(
    config: ConfigLike,
    checkpoint: str | None = None,
    device: str | torch.device = "cpu",
    cfg_options: Sequence[str] | dict | None = None,
) -> nn.Module:
    """The task model of ``config`` in eval mode on ``device``.

    Args:
        config: YAML path, mmengine Config or dict.
        checkpoint: a vitasks checkpoint (``state_dict`` key, as the trainer saves it) or a
            plain state dict file (``.safetensors`` or a tensors-only ``.pth``), loaded without
            running pickled code. ``None`` keeps the modules' initial weights.
        device: where the model goes.
        cfg_options: overrides, ``["key.sub=value", ...]`` or a dict.

    Returns:
        The model, with ``model.cfg`` (the merged config) and ``model.dataset_meta``
        (``{"classes": [...] or None}``: the config's ``class_names``, else the checkpoint's
        dataset meta, else the test dataset's ``metainfo.classes``). ``model(x,
        mode="tensor")`` is the raw head output for normalised inputs.
    """
    cfg = load_cfg(config, cfg_options)
    if cfg.get("kernels") is not None:  # the config's choice of NMS/RoIAlign kernels, as in training
        from vitasks.models.ops.selection import select_kernels

        select_kernels(cfg.get("kernels"), f"{getattr(cfg, 'filename', None) or 'config'}: kernels")
    model = build_model(cfg)
    meta: dict = {}
    if checkpoint is not None:
        state_dict, meta = read_checkpoint(os.fspath(checkpoint))
        load_weights(model, state_dict, f"checkpoint {os.fspath(checkpoint)!r}")
    model.cfg = cfg
    model.dataset_meta = {"classes": _class_names(cfg, meta)}
    model.to(device)
    model.eval()
    return model


# --------------------------------------------------------------------------------------------
# Inference


def test_pipeline_cfg(cfg: Config, task: str | None = None) -> list[dict]:
    """The test pipeline: ``test_dataloader.dataset.pipeline`` (else the val loader's, else a
    top-level ``test_pipeline``). The dataset itself is not needed.

    With ``task`` (a multi-task model's clip task): that task's own pipeline,
    ``test_dataloader.tasks.<task>.dataset.pipeline`` (else the val loader's)."""
    if task is not None:
        dataset = test_dataset_cfg({key: _task_loader(cfg, key, task) for key in ("test_dataloader", "val_dataloader")})
        what, read = f" for task {task!r}", (f"`test_dataloader.tasks.{task}.dataset.pipeline` (or "
                                             f"`val_dataloader.tasks.{task}.dataset.pipeline`)")
    else:
        dataset = test_dataset_cfg(cfg)
        what, read = "", ("`test_dataloader.dataset.pipeline` (or `val_dataloader.dataset.pipeline`, or a "
                          "top-level `test_pipeline`)")
    pipeline = dataset.get("pipeline") if dataset else None
    if pipeline is None and task is None:
        pipeline = cfg.get("test_pipeline")
    if not pipeline:
        raise ConfigError(f"{_where(cfg)}: no test pipeline{what}; inference reads {read}")
    return [dict(t) for t in pipeline]


def _task_loader(cfg: Config, key: str, task: str) -> dict | None:
    """``cfg[key].tasks[task]`` (a multi-task config's loader for one task), or None."""
    section = cfg.get(key)
    tasks = section.get("tasks") if isinstance(section, Mapping) else None
    loader = tasks.get(task) if isinstance(tasks, Mapping) else None
    return loader if isinstance(loader, Mapping) else None


def _type_name(t: dict) -> str:
    kind = t.get("type")
    return kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))


def build_test_pipeline(cfg: Config, from_array: bool = False, task: str | None = None) -> Compose:
    """Compose of the test pipeline (``task``'s own for a multi-task model's clip task, see
    :func:`test_pipeline_cfg`) without annotation loaders (and without the image loader when
    the inputs are arrays)."""
    steps = []
    where = "test pipeline" if task is None else f"test pipeline of task {task!r}"
    for t in test_pipeline_cfg(cfg, task):
        name = _type_name(t)
        if name in ANNOTATION_LOADERS or (from_array and name in IMAGE_LOADERS):
            continue
        with config_errors(f"{_where(cfg)}: {where}", KeyError):
            steps.append(TRANSFORMS.build(t))
    return Compose(steps)


def reads_videos(cfg: Config, task: str | None = None) -> bool:
    """Whether the config's test pipeline (``task``'s own, see :func:`test_pipeline_cfg`)
    decodes videos (a video recognizer's) rather than loading images."""
    return any(_type_name(t) in VIDEO_DECODERS for t in test_pipeline_cfg(cfg, task))


# --------------------------------------------------------------------------------------------
# Which pipeline and which tasks read an input


def is_multitask(model: nn.Module) -> bool:
    """A :class:`~vitasks.models.tasks.multitask.MultiTaskModel` (or one that looks like it)."""
    return all(hasattr(model, name) for name in ("tasks", "image_tasks", "clip_tasks", "predict_all"))


@dataclass(frozen=True)
class InputRoute:
    """How the model reads one kind of input: through which test pipeline, for which tasks.

    ``clip_task`` is None for the config's test pipeline (a single-task model's; a multi-task
    model's top-level ``test_pipeline``, feeding every image task from one backbone pass), else
    the clip task whose own test pipeline reads the video and whose own ``test_step`` predicts.
    """

    kind: str  # "image" or "video"
    clip_task: str | None = None


@dataclass(frozen=True)
class ModelInputs:
    """What a model reads: ``routes`` maps each kind of input file ("image", "video") to the
    pipelines that read it (a multi-task model's video: one per clip task); ``reason`` says why
    in words, for errors."""

    routes: dict[str, tuple[InputRoute, ...]]
    reason: str

    def routes_for(self, item: ImageLike, name: str) -> tuple[InputRoute, ...]:
        """The routes of one input (a path or an array, called ``name`` in errors); an input of a
        kind the model does not read is a DataError that says what the model reads."""
        kind = input_kind(item)
        if kind is None:
            if len(self.routes) == 1:  # an unknown suffix: whatever the model's one pipeline reads
                return next(iter(self.routes.values()))
            raise DataError(
                f"input {name}: cannot tell whether it is an image or a video from its name; this model reads "
                f"both ({self.reason}); image files: {', '.join(IMAGE_SUFFIXES)}; "
                f"video files: {', '.join(VIDEO_SUFFIXES)}"
            )
        if kind not in self.routes:
            (wanted,) = self.routes
            suffixes = VIDEO_SUFFIXES if wanted == "video" else IMAGE_SUFFIXES
            raise DataError(
                f"input {name} is {'an' if kind == 'image' else 'a'} {kind}; inference reads {wanted}s only with this "
                f"model ({self.reason}; {wanted} files: {', '.join(suffixes)})"
            )
        return self.routes[kind]


#: A single-task model's: its test pipeline reads images, or video files.
_IMAGES_ONLY = ModelInputs({"image": (InputRoute("image"),)}, "its test pipeline decodes no videos")
_VIDEOS_ONLY = ModelInputs({"video": (InputRoute("video"),)}, "its test pipeline decodes video files")


def input_kind(item: ImageLike) -> str | None:
    """"image" (an array, or an image file name), "video" (a video file name), or None (neither)."""
    if isinstance(item, np.ndarray):
        return "image"
    suffix = os.path.splitext(os.fspath(item))[1].lower()
    return "video" if suffix in VIDEO_SUFFIXES else "image" if suffix in IMAGE_SUFFIXES else None


def model_inputs(model: nn.Module) -> ModelInputs:
    """What ``model`` (from :func:`init_model`) reads. A single-task model: what its test
    pipeline loads (videos when it decodes them). A multi-task model: images, through the
    top-level ``test_pipeline``, when it has image tasks; videos, through each clip task's own
    test pipeline, when it has clip tasks."""
    if not is_multitask(model):
        return _VIDEOS_ONLY if reads_videos(model.cfg) else _IMAGES_ONLY
    routes: dict[str, tuple[InputRoute, ...]] = {}
    said = []
    if model.image_tasks:
        routes["image"] = (InputRoute("image"),)
        said.append(f"its image tasks {', '.join(model.image_tasks)} read images")
    else:
        said.append("it has no image task")
    if model.clip_tasks:
        routes["video"] = tuple(InputRoute("video", task) for task in model.clip_tasks)
        said.append(f"its clip tasks {', '.join(model.clip_tasks)} read videos")
    else:
        said.append("it has no clip task")
    return ModelInputs(routes, "; ".join(said))


def _route_pipeline(cfg: Config, route: InputRoute, from_array: bool) -> Compose:
    """The test pipeline of ``route``, built when an input first takes it (an image needs no
    clip task's pipeline)."""
    if route.clip_task is not None and not reads_videos(cfg, route.clip_task):
        raise ConfigError(
            f"{_where(cfg)}: the test pipeline of clip task {route.clip_task!r} decodes no videos; inference gives "
            f"it video files (add a {' or '.join(sorted(VIDEO_DECODERS))} step)"
        )
    return build_test_pipeline(cfg, from_array, route.clip_task)


def _array_results(img: np.ndarray, index: int) -> dict:
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise DataError(
            f"inputs[{index}]: expected an RGB uint8 array (H, W, 3), got dtype {img.dtype} shape {img.shape}"
        )
    if img.shape[2] == 4:
        img = img[:, :, :3]
    img = np.ascontiguousarray(img)
    return {"img": img, "ori_shape": img.shape[:2], "img_shape": img.shape[:2]}


def prepare_data(model: nn.Module, inputs: ImageLike | Sequence[ImageLike]) -> list[dict]:
    """Run each input through the test pipeline that reads it (:func:`model_inputs`), one
    ``{"inputs": ..., "data_samples": ...}`` per input; a multi-task model's video gives
    ``{clip task: {"inputs", "data_samples"}}``, through each clip task's own pipeline.

    Inputs are file paths (images, or videos for a model that reads them) or RGB uint8 arrays
    (H, W, 3) for models that read images."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike, np.ndarray)) else list(inputs)
    cfg = model.cfg
    reads = model_inputs(model)
    pipelines: dict[tuple[str | None, bool], Compose] = {}
    data = []
    for i, item in enumerate(items):
        from_array = isinstance(item, np.ndarray)
        path = None if from_array else os.fspath(item)
        if path is not None and not os.path.exists(path):
            raise DataError(f"input not found: {path}")
        per_task = {}
        for route in reads.routes_for(item, f"inputs[{i}] (an array)" if from_array else path):
            key = (route.clip_task, from_array)
            if key not in pipelines:
                pipelines[key] = _route_pipeline(cfg, route, from_array)
            if from_array:
                results = _array_results(item, i)
            else:
                # A video's sampler reads its frame count from the file (the pipeline probes it).
                results = {"filename": path} if route.kind == "video" else {"img_path": path}
            packed = pipelines[key](results)
            if packed is None:
                raise DataError(f"the test pipeline dropped input {i} ({path or 'array'})")
            per_task[route.clip_task] = packed
        data.append(per_task[None] if None in per_task else per_task)
    return data


def inference_model(
    model: nn.Module, inputs: ImageLike | Sequence[ImageLike], batch_size: int = 1
) -> Any:
    """Predict on images (paths or RGB uint8 arrays) or videos (paths, for a video recognizer)
    with the config's test pipeline (for videos: its frame sampling, test views and crops).

    Returns one data sample (for one input) or a list (for a list): the model's ``predict``
    output, e.g. ``pred_score`` (K,) and ``pred_label`` (1,) for a classifier or a video
    recognizer (scores averaged over the test views), with ``img_path`` / ``ori_shape`` /
    ``img_shape`` (videos: ``filename``, ``frame_inds``, ``num_views``) in the metainfo. For a
    multi-task model, one ``{task: sample}`` per input: for an image, every image task's
    prediction from one backbone pass; for a video, every clip task's, each through its own
    test pipeline and ``test_step``.
    """
    if not hasattr(model, "cfg"):
        raise VitasksError("inference_model needs a model from init_model (it reads model.cfg)")
    single = isinstance(inputs, (str, os.PathLike, np.ndarray))
    samples = predict_packed(model, prepare_data(model, inputs), batch_size)
    return samples[0] if single else samples


#: What predicts a multi-task model's image: every image task from one backbone pass (not a
#: task name: task names are identifiers).
_IMAGE_TASKS = "<image tasks>"


def _packed_parts(model: nn.Module, item: dict) -> list[tuple[str | None, dict]]:
    """``(who predicts, packed input)`` for one prepared input: None (a single-task model),
    ``_IMAGE_TASKS`` (a multi-task model's image), or a clip task's name (its video)."""
    if not is_multitask(model):
        return [(None, item)]
    if "inputs" in item and not isinstance(item["inputs"], Mapping):
        return [(_IMAGE_TASKS, item)]
    return list(item.items())


def _predict_batch(model: nn.Module, who: str | None, batch: dict) -> list[Any]:
    if who is None:
        return model.test_step(batch)
    if who == _IMAGE_TASKS:  # every image task, one backbone pass
        per_task = model.predict_all(batch)
        return [{name: found[i] for name, found in per_task.items()} for i in range(len(batch["inputs"]))]
    # A clip task: its own test_step (its data preprocessor; the test views averaged).
    return [{who: sample} for sample in model.test_step({who: batch})]


def predict_packed(model: nn.Module, data: list[dict], batch_size: int = 1) -> list[Any]:
    """The model's predictions on inputs already through the test pipeline (:func:`prepare_data`),
    one per input (``{task: sample}`` for a multi-task model). Inputs read the same way are
    batched together, ``batch_size`` at a time."""
    groups: dict[str | None, list[tuple[int, dict]]] = {}
    for index, item in enumerate(data):
        for who, packed in _packed_parts(model, item):
            groups.setdefault(who, []).append((index, packed))
    predictions: list[Any] = [{} for _ in data]
    with torch.no_grad():
        for who, members in groups.items():
            for start in range(0, len(members), batch_size):
                chunk = members[start:start + batch_size]
                found = _predict_batch(model, who, pseudo_collate([packed for _, packed in chunk]))
                for (index, _), prediction in zip(chunk, found):
                    if who is None:
                        predictions[index] = prediction
                    else:
                        predictions[index].update(prediction)
    return predictions


# --------------------------------------------------------------------------------------------
# Command-line inference


def expand_inputs(inputs: Sequence[str], reads: ModelInputs | None = None) -> list[str]:
    """Files as given; folders replaced by their files of the kinds the model reads (sorted, not
    recursive): images, videos, or both (``reads``, from :func:`model_inputs`; default: images).

    A file of a kind the model does not read is an error that says what the model reads."""
    reads = reads or _IMAGES_ONLY
    wanted = (IMAGE_SUFFIXES if "image" in reads.routes else ()) + (VIDEO_SUFFIXES if "video" in reads.routes else ())
    kinds = " or ".join(sorted(reads.routes))
    files: list[str] = []
    for item in inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, n)
                for n in os.listdir(item)
                if os.path.splitext(n)[1].lower() in wanted
            )
            if not found:
                raise DataError(f"input folder {item} has no {kinds} files ({', '.join(wanted)})")
            files.extend(found)
        elif os.path.isfile(item):
            reads.routes_for(item, item)  # a file of the wrong kind: say what the model reads
            files.append(item)
        else:
            raise DataError(f"input not found: {item}")
    if not files:
        raise DataError("no inputs given")
    return files


def _unique_stems(files: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    stems = []
    for f in files:
        stem = os.path.splitext(os.path.basename(f))[0]
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        stems.append(stem if n == 0 else f"{stem}_{n}")
    return stems


def run_inference(
    config: ConfigLike,
    checkpoint: str | None,
    inputs: Sequence[str],
    out_dir: str,
    device: str = "cpu",
    topk: int = 5,
    cfg_options: Sequence[str] | dict | None = None,
) -> list[dict]:
    """Predict on each input and write ``<name>.json`` and ``<name>.png`` into ``out_dir``.

    The JSON is ``{"file": path, **task summary}``; a classifier's (and a video recognizer's)
    summary is ``{"predictions": [{"label", "class_name", "score"}, ...]}`` with the
    top-``topk`` classes; a segmentor's is
    ``{"classes": [{"label", "class_name", "pixels", "fraction"}, ...], "label_map": path}``
    (``<name>_labels.png``, the dataset's own label values), see
    :class:`vitasks.visualization.SegPredictionDrawer`. The PNG is the
    image with the prediction drawn over it; for a video, the frames the model saw (the test
    pipeline's sampled, resized and cropped clip, every view) in a strip under the top-k classes.
    Drawing and summary come from the drawers that :func:`vitasks.visualization.select_drawers`
    picks for the model.

    A multi-task model's JSON is ``{"file", "tasks": {task: summary}}``, for an image every
    image task's (drawn over the image one after the other), for a video every clip task's
    (each task's strip of the clip it saw, one under the other); a folder gives both kinds
    when the model has both kinds of task.

    Returns the records written, each with ``json`` and ``png`` paths added.
    """
    if topk < 1:
        raise VitasksError(f"--topk must be >= 1, got {topk}")
    model = init_model(config, checkpoint, device=device, cfg_options=cfg_options)
    files = expand_inputs(inputs, model_inputs(model))
    os.makedirs(out_dir, exist_ok=True)
    records = []
    for path, stem in zip(files, _unique_stems(files)):
        packed = prepare_data(model, path)[0]
        prediction = predict_packed(model, [packed])[0]
        records.append(_write_prediction(model, path, stem, packed, prediction, out_dir, topk))
    return records


class _Picture:
    """One input's PNG: image predictions drawn over the image one after the other; a drawer
    that draws the model's input (a video's clip strip) makes a panel of its own, under it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.image: np.ndarray | None = None
        self.panels: list[np.ndarray] = []

    def draw(self, drawer: Any, sample: Any, class_names: list[str] | None, topk: int, model_input: Any) -> None:
        if getattr(drawer, "draws_model_input", False):
            self.panels.append(drawer.draw(drawer.load_image(model_input), sample, class_names, topk))
            return
        if self.image is None:
            self.image = drawer.load_image(self.path)
        self.image = drawer.draw(self.image, sample, class_names, topk)

    def save(self, png_path: str) -> None:
        from PIL import Image

        parts = ([self.image] if self.image is not None else []) + self.panels
        width = max(p.shape[1] for p in parts)
        padded = [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0)), constant_values=255) for p in parts]
        Image.fromarray(np.concatenate(padded, axis=0)).save(png_path)


def _summarize_and_draw(task_model: nn.Module, sample: Any, class_names: list[str] | None, topk: int,
                        out_dir: str, stem: str, picture: _Picture, model_input: Any) -> dict:
    """One task's summary (and extra files) from its drawers, and its drawing on ``picture``."""
    from vitasks.visualization import select_drawers

    summary: dict[str, Any] = {}
    for drawer in select_drawers(task_model, sample):
        summary.update(drawer.summarize(sample, class_names, topk))
        summary.update(drawer.write_files(sample, out_dir, stem))
        picture.draw(drawer, sample, class_names, topk, model_input)
    return summary


def _write_prediction(model: nn.Module, path: str, stem: str, packed: dict, prediction: Any, out_dir: str,
                      topk: int) -> dict:
    """``<stem>.json`` and ``<stem>.png`` for one input. A multi-task model's class names per
    task come from the config's ``class_names: {task: [...]}``."""
    picture = _Picture(path)
    if is_multitask(model):
        names_cfg = model.cfg.get("class_names")
        record: dict[str, Any] = {"file": path, "tasks": {}}
        parts = dict(_packed_parts(model, packed))
        for task, sample in prediction.items():
            class_names = names_cfg.get(task) if isinstance(names_cfg, Mapping) else None
            model_input = parts.get(task, parts.get(_IMAGE_TASKS))["inputs"]
            record["tasks"][task] = _summarize_and_draw(
                model.tasks[task], sample, class_names, topk, out_dir, f"{stem}_{task}", picture, model_input
            )
    else:
        class_names = model.dataset_meta.get("classes")
        record = {"file": path, **_summarize_and_draw(
            model, prediction, class_names, topk, out_dir, stem, picture, packed["inputs"]
        )}
    json_path = os.path.join(out_dir, stem + ".json")
    png_path = os.path.join(out_dir, stem + ".png")
    with open(json_path, "w") as f:
        json.dump(record, f, indent=2)
    picture.save(png_path)
    return {**record, "json": json_path, "png": png_path}


def attention_map(
    config: Any,
    checkpoint: str | None,
    image: str | np.ndarray,
    out: str,
    device: str = "cpu",
    head_fusion: str = "mean",
    add_residual: bool = True,
    cfg_options: Sequence[str] | dict | None = None,
) -> dict[str, torch.Tensor]:
    """Build the model, run the image through the config's test pipeline and the backbone,
    write the rollout / per-layer PNG grid to ``out``; returns the maps."""
    from vitasks.visualization.attention_map import (
        HEAD_FUSIONS, backbone_of, compute_attention_maps, save_attention_grid,
    )

    if head_fusion not in HEAD_FUSIONS:
        raise VitasksError(f"--head-fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    model = init_model(config, checkpoint, device=device, cfg_options=cfg_options)
    backbone = backbone_of(model)
    packed = prepare_data(model, image)
    # The picture the model sees (after resize / crop), not the original file.
    shown = packed[0]["inputs"].permute(1, 2, 0).numpy()
    if shown.shape[2] == 1:
        shown = np.repeat(shown, 3, axis=2)
    data = model.data_preprocessor(pseudo_collate(packed), False)
    maps = compute_attention_maps(backbone, data["inputs"], head_fusion, add_residual)
    name = image if isinstance(image, str) else "array"
    title = f"{os.path.basename(str(name))}: rollout ({head_fusion} over heads" + (
        ", residual)" if add_residual else ")")
    save_attention_grid(
        shown[:, :, :3].astype(np.uint8), maps["rollout"][0].cpu().numpy(), maps["layers"][0].cpu().numpy(), out,
        title,
    )
    return maps
