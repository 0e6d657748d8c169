"""What a task model exports: the function traced, its outputs, the input it takes.

A task model declares its export by duck typing (models do not import this package):

- ``forward_export(inputs) -> Tensor | tuple[Tensor, ...]``: what the ONNX graph computes from an
  already-normalised batch. A detector, for instance, returns its raw head outputs here and
  leaves box decoding and NMS to the caller;
- ``export_outputs``: ``{output name: what it holds}``, one entry per returned tensor, in order;
- ``export_postprocess`` (optional): a sentence on turning the outputs into predictions, stored
  in the ONNX metadata;
- ``export_input_shape`` (optional): the per-sample input shape, ``(3, H, W)`` or ``(3, T, H, W)``.

Task models that predate this contract get their spec here (:data:`BUILTIN_SPECS`, by class
name); a model with neither falls back to ``model(inputs, mode="tensor")`` (DESIGN.md's raw head
output), with one output named ``output``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from vitasks.checks import int_pair
from vitasks.errors import ConfigError

ExportForward = Callable[[nn.Module, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, ...]"]


@dataclass
class ExportSpec:
    """How one task model is exported.

    Attributes:
        forward: ``forward(model, inputs)``, the computation traced into the graph.
        outputs: ``{name: description}`` of the returned tensors, in order.
        postprocess: how a caller turns the outputs into predictions.
    """

    forward: ExportForward
    outputs: dict[str, str]
    postprocess: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def output_names(self) -> list[str]:
        return list(self.outputs)


def _classifier_spec(model: nn.Module) -> ExportSpec:
    return ExportSpec(
        forward=lambda m, x: m(x, mode="tensor"),
        outputs={"logits": "class logits (N, K), before softmax"},
        postprocess="softmax over axis 1 gives the class scores (the model's pred_score); argmax the label",
    )


def _recognizer_spec(model: nn.Module) -> ExportSpec:
    return ExportSpec(
        forward=lambda m, x: m(x, mode="tensor"),
        outputs={"logits": "clip logits (N, K) of clips (N, 3, T, H, W), before softmax"},
        postprocess=(
            "one clip per row: for a video's several views (clips x crops), average the softmaxes "
            "('prob', the head's average_clips) or the logits ('score'), then argmax"
        ),
    )


def _segmentor_spec(model: nn.Module) -> ExportSpec:
    # Whole-image inference (EncoderDecoder.encode_decode): pad to the backbone's stride, run,
    # upsample bilinearly, cut the padding. Logits rather than the label map, so a caller can
    # resize them to the original image size before the argmax, as `predict` does.
    notes = []
    test_cfg = getattr(model, "test_cfg", None)
    if getattr(test_cfg, "mode", "whole") != "whole" or getattr(test_cfg, "ratios", [1.0]) != [1.0]:
        notes.append(
            "the config's test_cfg asks for sliding-window or test-time-augmented inference; the ONNX "
            "graph is whole-image inference at the export size (run it per window for sliding windows)"
        )
    return ExportSpec(
        forward=lambda m, x: m.encode_decode(x),
        outputs={"seg_logits": "per-pixel class logits (N, K, H, W) at the input size, whole-image inference"},
        postprocess=(
            "resize the logits bilinearly to the original image size, then argmax over axis 1 gives the "
            "label map in training ids 0..K-1 (add 1 for a dataset read with reduce_zero_label, e.g. ADE20K)"
        ),
        notes=notes,
    )


#: Specs for task models that do not define ``forward_export`` themselves, by class name.
BUILTIN_SPECS: dict[str, Callable[[nn.Module], ExportSpec]] = {
    "ImageClassifier": _classifier_spec,
    "EncoderDecoder": _segmentor_spec,
    "Recognizer": _recognizer_spec,
}


def export_spec(model: nn.Module) -> ExportSpec:
    """The model's own ``forward_export`` contract, else the built-in spec of its class (or of a
    base class), else ``model(inputs, mode="tensor")``."""
    own = getattr(model, "forward_export", None)
    if callable(own):
        outputs = dict(getattr(model, "export_outputs", None) or {"output": "the model's forward_export output"})
        return ExportSpec(
            forward=lambda m, x: m.forward_export(x),
            outputs=outputs,
            postprocess=str(getattr(model, "export_postprocess", "")),
        )
    for cls in type(model).__mro__:
        if cls.__name__ in BUILTIN_SPECS:
            return BUILTIN_SPECS[cls.__name__](model)
    return ExportSpec(
        forward=lambda m, x: m(x, mode="tensor"),
        outputs={"output": 'the raw head output, model(inputs, mode="tensor")'},
    )


def export_input_shape(model: nn.Module, img_size: int | Sequence[int] | None = None) -> tuple[int, ...]:
    """Per-sample input shape: ``(C, H, W)``, or ``(C, T, H, W)`` for a video backbone (one with
    ``num_frames``). ``img_size`` overrides the backbone's ``img_size``."""
    declared = getattr(model, "export_input_shape", None)
    if declared is not None and img_size is None:
        return tuple(int(s) for s in (declared() if callable(declared) else declared))
    backbone = getattr(model, "backbone", None)
    size = img_size if img_size is not None else getattr(backbone, "img_size", None)
    if size is None:
        raise ConfigError(
            f"cannot tell the input size of {type(model).__name__} (its backbone has no img_size): "
            "give it with --img-size H [W]"
        )
    height, width = int_pair(size, "--img-size" if img_size is not None else "model.backbone.img_size")
    cfg = getattr(model, "cfg", None)
    backbone_cfg = (cfg.get("model") or {}).get("backbone") if cfg is not None else None
    channels = int((backbone_cfg or {}).get("in_channels", 3)) if isinstance(backbone_cfg, dict) else 3
    frames = getattr(backbone, "num_frames", None)
    if frames:
        return (channels, int(frames), height, width)
    return (channels, height, width)


def _as_list(value) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return [round(float(v), 4) for v in value.flatten()]
    return [float(v) for v in value]


def preprocessing(model: nn.Module) -> dict[str, str]:
    """What a caller does to an image before the graph, from the model's data preprocessor:
    ``{"mean": "[...]", "std": "[...]", "channel_order": ..., "input": ...}`` (strings, as ONNX
    metadata holds them)."""
    prep = getattr(model, "data_preprocessor", None)
    mean = std = None
    if prep is not None and getattr(prep, "_enable_normalize", getattr(prep, "normalize", True)):
        mean, std = _as_list(getattr(prep, "mean", None)), _as_list(getattr(prep, "std", None))
    swap = bool(getattr(prep, "_channel_conversion", False) or getattr(prep, "to_rgb", False))
    order = "BGR (the config swaps the loaded RGB channels, to_rgb: true)" if swap else "RGB"
    if mean is not None and std is not None:
        rule = "float32 (pixel - mean) / std per channel, pixels 0-255"
    else:
        rule = "float32 pixels 0-255 (the model's preprocessor does not normalise)"
    per_image = getattr(prep, "per_image_norm", None)
    if per_image is not None:
        rule = f"{rule}, {per_image.describe()}"
    return {
        "mean": json.dumps(mean),
        "std": json.dumps(std),
        "channel_order": order,
        "input": f"{rule}, channel order {order}, layout N C H W (video: N C T H W)",
    }
