"""Python API: build a model from a config, run it on images or videos, write drawn predictions.

>>> from vitasks.apis import init_model, inference_model
>>> model = init_model("configs/demo/cls.yaml", "work_dirs/cls/epoch_1.pth")
>>> logits = model(normalised_batch, mode="tensor")          # raw head output, (N, K)
>>> sample = inference_model(model, "cat.jpg")                 # the config's test pipeline
>>> sample.pred_score.topk(5)
>>> video = init_model("configs/demo/video_synthetic.yaml", "work_dirs/video_synthetic/epoch_30.pth")
>>> inference_model(video, "clip.mp4").pred_score                # sampled and cropped as in testing

``run_inference`` is what ``vitasks infer`` / ``tools/infer.py`` call: one JSON and one PNG per
input. The drawing is chosen per task (see :mod:`vitasks.visualization.drawers`), so a new task
registers a drawer and needs no change here.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch
from mmengine.config import Config
from mmengine.dataset import Compose, pseudo_collate
from torch import nn

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
    if isinstance(config, (str, os.PathLike)):
        from vitasks.config import load_config

        cfg = load_config(str(config), cfg_options)
    elif isinstance(config, (Config, dict)):
        cfg = copy.deepcopy(config) if isinstance(config, Config) else Config(copy.deepcopy(config))
        if cfg_options:
            from vitasks.config import parse_cfg_options

            options = dict(cfg_options) if isinstance(cfg_options, dict) else parse_cfg_options(cfg_options)
            cfg.merge_from_dict(options, allow_list_keys=True)
    else:
        raise ConfigError(f"expected a config path, mmengine Config or dict, got {type(config).__name__}")
    from vitasks.plugins import import_plugins

    import_plugins(cfg)
    return cfg


def _where(cfg: Config) -> str:
    return getattr(cfg, "filename", None) or "config"


def build_model(cfg: Config) -> nn.Module:
    """Build ``cfg.model`` from the vitasks registry (weights as initialised by the modules)."""
    if "model" not in cfg or not isinstance(cfg.model, dict):
        raise ConfigError(f"{_where(cfg)}: no `model` section (a dict with a `type`)")
    try:
        return MODELS.build(cfg.model)
    except KeyError as e:  # an unregistered type; validate_config gives suggestions
        raise ConfigError(f"{_where(cfg)}: model: {e.args[0] if e.args else e}") from e


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


def test_pipeline_cfg(cfg: Config) -> list[dict]:
    """The test pipeline: ``test_dataloader.dataset.pipeline`` (else the val loader's, else a
    top-level ``test_pipeline``). The dataset itself is not needed."""
    dataset = test_dataset_cfg(cfg)
    pipeline = dataset.get("pipeline") if dataset else None
    if pipeline is None:
        pipeline = cfg.get("test_pipeline")
    if not pipeline:
        raise ConfigError(
            f"{_where(cfg)}: no test pipeline; inference reads `test_dataloader.dataset.pipeline` "
            "(or `val_dataloader.dataset.pipeline`, or a top-level `test_pipeline`)"
        )
    return [dict(t) for t in pipeline]


def _type_name(t: dict) -> str:
    kind = t.get("type")
    return kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))


def build_test_pipeline(cfg: Config, from_array: bool = False) -> Compose:
    """Compose of the test pipeline without annotation loaders (and without the image loader
    when the inputs are arrays)."""
    steps = []
    for t in test_pipeline_cfg(cfg):
        name = _type_name(t)
        if name in ANNOTATION_LOADERS or (from_array and name in IMAGE_LOADERS):
            continue
        try:
            steps.append(TRANSFORMS.build(t))
        except KeyError as e:
            raise ConfigError(f"{_where(cfg)}: test pipeline: {e.args[0] if e.args else e}") from e
    return Compose(steps)


def reads_videos(cfg: Config) -> bool:
    """Whether the config's test pipeline decodes videos (a video recognizer's) rather than
    loading images."""
    return any(_type_name(t) in VIDEO_DECODERS for t in test_pipeline_cfg(cfg))


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
    """Run the config's test pipeline on each input: ``[{"inputs": ..., "data_samples": ...}]``.

    Inputs are file paths (images, or videos for a model whose test pipeline decodes videos:
    whatever the pipeline's loader reads) or, for image models, RGB uint8 arrays (H, W, 3)."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike, np.ndarray)) else list(inputs)
    cfg = model.cfg
    video = reads_videos(cfg)
    pipelines: dict[bool, Compose] = {}
    data = []
    for i, item in enumerate(items):
        from_array = isinstance(item, np.ndarray)
        if from_array and video:
            raise DataError(
                f"inputs[{i}]: this model's test pipeline decodes video files; give the path of a video "
                f"({', '.join(VIDEO_SUFFIXES)}), not an array"
            )
        if from_array not in pipelines:
            pipelines[from_array] = build_test_pipeline(cfg, from_array)
        if from_array:
            results = _array_results(item, i)
        else:
            path = os.fspath(item)
            if not os.path.exists(path):
                raise DataError(f"input not found: {path}")
            # A video's sampler reads its frame count from the file (the pipeline probes it).
            results = {"filename": path} if video else {"img_path": path}
        packed = pipelines[from_array](results)
        if packed is None:
            raise DataError(f"the test pipeline dropped input {i} ({item if not from_array else 'array'})")
        data.append(packed)
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
    multi-task model, one ``{task: sample}`` per input, every task's prediction from one backbone
    pass.
    """
    if not hasattr(model, "cfg"):
        raise VitasksError("inference_model needs a model from init_model (it reads model.cfg)")
    single = isinstance(inputs, (str, os.PathLike, np.ndarray))
    samples = predict_packed(model, prepare_data(model, inputs), batch_size)
    return samples[0] if single else samples


def predict_packed(model: nn.Module, data: list[dict], batch_size: int = 1) -> list[Any]:
    """The model's predictions on inputs already through the test pipeline (:func:`prepare_data`),
    one per input (``{task: sample}`` for a multi-task model)."""
    samples = []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = pseudo_collate(data[start:start + batch_size])
            if hasattr(model, "predict_all"):  # a multi-task model: every task, one backbone pass
                per_task = model.predict_all(batch)
                samples.extend({name: found[i] for name, found in per_task.items()}
                               for i in range(len(batch["inputs"])))
            else:
                samples.extend(model.test_step(batch))
    return samples


# --------------------------------------------------------------------------------------------
# Command-line inference


def expand_inputs(inputs: Sequence[str], videos: bool = False) -> list[str]:
    """Files as given; folders replaced by their files of the model's kind (sorted, not
    recursive): images, or videos when ``videos`` (a model whose test pipeline decodes videos).

    A video given to an image model, or an image given to a video model, is an error that says
    which the model reads.
    """
    wanted, other = (VIDEO_SUFFIXES, IMAGE_SUFFIXES) if videos else (IMAGE_SUFFIXES, VIDEO_SUFFIXES)
    kind, other_kind = ("video", "image") if videos else ("image", "video")
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
                raise DataError(f"input folder {item} has no {kind} files ({', '.join(wanted)})")
            files.extend(found)
        elif os.path.isfile(item):
            if os.path.splitext(item)[1].lower() in other:
                raise DataError(
                    f"input {item} is {'an' if other_kind == 'image' else 'a'} {other_kind}; inference reads "
                    f"{kind}s only with this model (its test pipeline "
                    f"{'decodes videos' if videos else 'decodes no videos'}; {kind} files: {', '.join(wanted)})"
                )
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

    Returns the records written, each with ``json`` and ``png`` paths added.
    """
    from vitasks.visualization import select_drawers

    if topk < 1:
        raise VitasksError(f"--topk must be >= 1, got {topk}")
    model = init_model(config, checkpoint, device=device, cfg_options=cfg_options)
    files = expand_inputs(inputs, videos=reads_videos(model.cfg))
    class_names = model.dataset_meta.get("classes")
    os.makedirs(out_dir, exist_ok=True)
    records = []
    for path, stem in zip(files, _unique_stems(files)):
        packed = prepare_data(model, path)
        sample = predict_packed(model, packed)[0]
        if isinstance(sample, dict):  # a multi-task model
            records.append(_draw_tasks(model, path, stem, sample, out_dir, topk))
            continue
        drawers = select_drawers(model, sample)
        record: dict[str, Any] = {"file": path}
        for drawer in drawers:
            record.update(drawer.summarize(sample, class_names, topk))
            record.update(drawer.write_files(sample, out_dir, stem))
        # A video drawer draws the clip the model saw (the pipeline's output), not the file.
        source = packed[0]["inputs"] if getattr(drawers[0], "draws_model_input", False) else path
        image = drawers[0].load_image(source)
        for drawer in drawers:
            image = drawer.draw(image, sample, class_names, topk)
        json_path = os.path.join(out_dir, stem + ".json")
        png_path = os.path.join(out_dir, stem + ".png")
        with open(json_path, "w") as f:
            json.dump(record, f, indent=2)
        from PIL import Image

        Image.fromarray(image).save(png_path)
        records.append({**record, "json": json_path, "png": png_path})
    return records


def _draw_tasks(model: nn.Module, path: str, stem: str, samples: dict, out_dir: str, topk: int) -> dict:
    """A multi-task model's predictions for one image: ``{"file", "tasks": {task: summary}}`` as
    JSON and every task drawn over the image, one after the other, in one PNG. Class names per
    task come from the config's ``class_names: {task: [...]}``."""
    from PIL import Image

    from vitasks.visualization import select_drawers

    names_cfg = model.cfg.get("class_names")
    record: dict[str, Any] = {"file": path, "tasks": {}}
    image = None
    for task, sample in samples.items():
        class_names = names_cfg.get(task) if isinstance(names_cfg, dict) else None
        drawers = select_drawers(model.tasks[task], sample)
        summary: dict[str, Any] = {}
        for drawer in drawers:
            summary.update(drawer.summarize(sample, class_names, topk))
            summary.update(drawer.write_files(sample, out_dir, f"{stem}_{task}"))
            if image is None:
                image = drawer.load_image(path)
            image = drawer.draw(image, sample, class_names, topk)
        record["tasks"][task] = summary
    json_path = os.path.join(out_dir, stem + ".json")
    png_path = os.path.join(out_dir, stem + ".png")
    with open(json_path, "w") as f:
        json.dump(record, f, indent=2)
    Image.fromarray(image).save(png_path)
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
