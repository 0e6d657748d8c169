"""ONNX export of a task model, checked against onnxruntime.

``python tools/export_onnx.py CONFIG CKPT OUT.onnx [--batch-size N] [--opset K] [--img-size H [W]]
[--rtol R] [--time ITERS] [--cfg-options ...]``

The graph takes an already-normalised float32 batch, as ``model(inputs, mode="tensor")`` does
(DESIGN.md), with a dynamic batch axis and a fixed image size; what it returns is the task's
:class:`~vitasks.deploy.specs.ExportSpec` (classifier: logits; segmentor: whole-image logits at
the input size). The preprocessing (mean/std of the config's data preprocessor, channel order,
the test pipeline) and the post-processing are written into the file's ``metadata_props``.

Exporter: ``torch.export`` (non-strict) then torch's dynamo-based ONNX translator
(``torch.onnx.export`` of the ExportedProgram). On torch 2.13 the TorchScript-based exporter
(``dynamo=False``) is deprecated and cannot export UperNet's pyramid pooling
(``adaptive_avg_pool2d`` to sizes that do not divide the feature map); ``torch.onnx.export(model,
dynamo=True)`` alone falls back to weaker capture strategies that can bake a value computed
outside torch (a ``.numpy()`` call) into the graph as a constant. Capturing with
``torch.export`` here keeps that from happening and lets an error name the module at fault.

After writing, onnxruntime runs the file on a seeded random batch at two batch sizes and the
outputs are compared with PyTorch's: above ``rtol`` (1e-4) relative difference
(``max |onnx - torch| / max |torch|`` per output) the export fails.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from vitasks.deploy.specs import ExportSpec, export_input_shape, export_spec, preprocessing
from vitasks.errors import VitasksError

#: The relative difference above which an export fails (issue 12).
DEFAULT_RTOL = 1e-4
#: The trace sample's batch: 2, since torch.export specialises a dimension of size 1.
TRACE_BATCH = 2
#: Files above this are written with their weights beside them (ONNX's protobuf limit is 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 31
#: Prefix of the metadata keys this module writes.
META_PREFIX = "vitasks."
INPUT_NAME = "inputs"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ExportError(VitasksError):
    """The model cannot be exported (the message names the module at fault when it is known)."""


class ExportMismatchError(ExportError):
    """The exported graph's outputs differ from PyTorch's above the tolerance."""


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401  (torch's ONNX translator)
    except ImportError as e:
        raise ExportError(
            f"ONNX export needs onnx, onnxruntime and onnxscript ({e}); install them with "
            "`pip install -e .[deploy]` (or `pip install onnx onnxruntime onnxscript`)"
        ) from e


class _ExportModule(nn.Module):
    """The model behind a plain ``forward(inputs)``: what the spec says to trace."""

    def __init__(self, model: nn.Module, spec: ExportSpec) -> None:
        super().__init__()
        self.model = model
        self._spec_forward = spec.forward

    def forward(self, inputs: torch.Tensor):
        out = self._spec_forward(self.model, inputs)
        return tuple(out) if isinstance(out, (list, tuple)) else out


# --------------------------------------------------------------------------------------------
# Naming the module at fault


def _first_line(exc: BaseException) -> str:
    text = _ANSI.sub("", str(exc)).strip()
    if "## Exception summary" in text:  # torch.onnx's reports: the summary is the useful part
        text = text.split("## Exception summary", 1)[1].strip()
    return text.splitlines()[0].strip().rstrip(".") if text else type(exc).__name__


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _module_path(path: str) -> str:
    """A path under the export wrapper (``model.head.fc``) as a path in the task model."""
    return "" if path == "model" else path[len("model."):] if path.startswith("model.") else path


def find_failing_module(exc: BaseException, root: nn.Module) -> tuple[str, str] | None:
    """``(path in the model, class name)`` of the module where an export failed, or None.

    Capture errors (torch.export runs the Python code on fake tensors) are raised inside the
    module's ``forward``: the innermost traceback frame whose ``self`` is one of ``root``'s
    modules names it. Translation errors are raised on a graph node: its ``nn_module_stack``
    metadata names the module that produced it.
    """
    names = {id(m): name for name, m in root.named_modules()}
    modules = dict(root.named_modules())
    found: tuple[str, str] | None = None
    for link in _exception_chain(exc):
        tb = link.__traceback__
        while tb is not None:
            frame_locals = tb.tb_frame.f_locals
            owner = frame_locals.get("self")
            if isinstance(owner, nn.Module) and id(owner) in names and owner is not root:
                found = (_module_path(names[id(owner)]), type(owner).__name__)
            node = frame_locals.get("node")
            if isinstance(node, torch.fx.Node):
                stack = node.meta.get("nn_module_stack") or {}
                if stack:
                    path, _ = list(stack.values())[-1]
                    module = modules.get(path)
                    found = (_module_path(path), type(module).__name__ if module is not None else "?")
            tb = tb.tb_next
    return found if found and found[0] else None


def _batch_dynamic_shapes(module: nn.Module, args: tuple, kwargs: dict, batch_size: int):
    """``dynamic_shapes`` for torch.export: axis 0 of every tensor of batch size ``batch_size``
    is the batch (positional arguments, then keyword ones in signature order)."""
    from torch.utils._pytree import tree_map

    batch = torch.export.Dim("batch", min=1)

    def spec(leaf):
        is_batched = isinstance(leaf, torch.Tensor) and leaf.ndim > 0 and leaf.shape[0] == batch_size
        return {0: batch} if is_batched else None

    order = list(inspect.signature(module.forward).parameters)
    named = sorted(kwargs, key=lambda k: order.index(k) if k in order else len(order))
    return tuple(tree_map(spec, a) for a in args) + tuple(tree_map(spec, kwargs[k]) for k in named)


def _traces(module: nn.Module, call: tuple[tuple, dict], batch_size: int) -> bool:
    args, kwargs = call
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.export.export(module, args, kwargs, strict=False,
                                dynamic_shapes=_batch_dynamic_shapes(module, args, kwargs, batch_size))
        return True
    except Exception:  # noqa: BLE001 - any failure counts
        return False


def probe_failing_module(root: nn.Module, sample: torch.Tensor) -> tuple[str, str] | None:
    """``(path, class name)`` of the deepest module that torch.export cannot trace on its own,
    found by exporting submodules on the inputs they got in an eager run: for errors that carry
    no Python frame of the module (a batch size fixed by the code shows only when the graph is
    checked). Descends into the first child that fails; a module whose children all trace is
    itself at fault. Only run when an export has already failed: it costs one capture per module
    tried."""
    calls: dict[str, tuple[tuple, dict]] = {}
    hooks = []
    for name, module in root.named_modules():
        if name:
            def record(mod, args, kwargs, name=name):
                calls.setdefault(name, (args, kwargs))
            hooks.append(module.register_forward_pre_hook(record, with_kwargs=True))
    try:
        with torch.no_grad():
            root(sample)
    except Exception:  # noqa: BLE001 - the model fails in eager mode too: nothing to probe
        return None
    finally:
        for hook in hooks:
            hook.remove()

    def called_children(module: nn.Module, prefix: str):
        # The shallowest descendants that were called (a ModuleList is a container, never called).
        for child_name, child in module.named_children():
            path = f"{prefix}.{child_name}" if prefix else child_name
            if path in calls:
                yield path, child
            else:
                yield from called_children(child, path)

    at_fault, module = "", root
    while True:
        for path, child in called_children(module, at_fault):
            if not _traces(child, calls[path], sample.shape[0]):
                at_fault, module = path, child
                break
        else:
            break
    return (_module_path(at_fault), type(module).__name__) if _module_path(at_fault) else None


def _describe(model: nn.Module, where: tuple[str, str] | None) -> str:
    if where is None:
        return f"{type(model).__name__} (the module at fault could not be determined)"
    path, cls = where
    return f"{type(model).__name__}: module `{path}` ({cls})"


# --------------------------------------------------------------------------------------------
# Export


@contextlib.contextmanager
def _quiet_exporter():
    """torch.export / torch.onnx print progress, FutureWarnings and whole graphs on failure; the
    error raised here says what matters."""
    loggers = [logging.getLogger(n) for n in ("torch.export", "torch._export", "torch.onnx", "torch._dynamo",
                                              "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def capture(model: nn.Module, spec: ExportSpec, sample: torch.Tensor):
    """``torch.export`` of the spec's forward with a dynamic batch axis; an untraceable module
    raises :class:`ExportError` naming it."""
    wrapper = _ExportModule(model, spec).eval()
    batch = torch.export.Dim("batch", min=1)
    try:
        with _quiet_exporter(), torch.no_grad():
            return torch.export.export(wrapper, (sample,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as e:  # noqa: BLE001 - any capture failure becomes one clear message
        where = find_failing_module(e, wrapper) or probe_failing_module(wrapper, sample)
        if "batch" in str(e) and ("specializ" in str(e) or "Constraints violated" in str(e)):
            problem = "its code fixes the batch size"
            advice = "Take the batch size from the input (x.shape[0], or -1 in a reshape), not a number"
        else:
            problem = "torch.export could not trace it"
            advice = ("Make that forward traceable: no .numpy() / .item() / .tolist(), no Python `if` on "
                      "tensor values, shapes from tensors' .shape")
        raise ExportError(
            f"cannot export {_describe(model, where)}: {problem}: {_first_line(_exception_chain(e)[-1])}. "
            f"{advice}"
        ) from e


def convert(model: nn.Module, program, spec: ExportSpec, opset: int | None):
    """The ONNX program of a captured model (``torch.onnx.ONNXProgram``); an op without an ONNX
    translation raises :class:`ExportError` naming the module that uses it."""
    kwargs: dict[str, Any] = {"opset_version": opset} if opset is not None else {}
    try:
        with _quiet_exporter():
            return torch.onnx.export(
                program, dynamo=True, input_names=[INPUT_NAME], output_names=spec.output_names,
                # Names the batch axis "batch" in the graph's inputs and outputs.
                dynamic_shapes=({0: "batch"},), verbose=False, **kwargs,
            )
    except Exception as e:  # noqa: BLE001
        where = find_failing_module(e, _ExportModule(model, spec))
        raise ExportError(
            f"cannot export {_describe(model, where)}: the ONNX exporter cannot translate it"
            f"{f' at opset {opset}' if opset else ''}: {_first_line(_exception_chain(e)[-1])}"
        ) from e


def _set_metadata(onnx_program, metadata: dict[str, str]) -> None:
    props = onnx_program.model.metadata_props
    for key, value in metadata.items():
        props[key] = value


def _save(onnx_program, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    size = sum(t.numel() * t.element_size() for t in onnx_program.exported_program.state_dict.values())
    onnx_program.save(path, external_data=size >= EXTERNAL_DATA_BYTES)


# --------------------------------------------------------------------------------------------
# Checking with onnxruntime


def ort_session(path: str, threads: int | None = None):
    """An onnxruntime CPU session; ``threads`` intra-op threads (default torch's), not spinning
    while idle (which costs a lot on a shared machine)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: no notes on nodes it could not constant-fold
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run_onnxruntime(session, inputs: np.ndarray) -> list[np.ndarray]:
    """The session's outputs for one input batch."""
    return session.run(None, {session.get_inputs()[0].name: inputs})


def relative_difference(actual: np.ndarray, expected: np.ndarray) -> float:
    """``max |actual - expected| / max |expected|`` (the absolute difference when ``expected``
    is all zeros); ``inf`` when the shapes differ."""
    if actual.shape != expected.shape:
        return float("inf")
    diff = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64)), initial=0.0))
    scale = float(np.max(np.abs(expected.astype(np.float64)), initial=0.0))
    return diff / scale if scale > 0 else diff


def sample_batch(batch_size: int, input_shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """A seeded standard-normal batch: what normalised images look like to the model."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch_size, *input_shape), generator=generator)


def check_batch_sizes(batch_size: int) -> list[int]:
    """The two batch sizes checked: ``batch_size`` and one other, so the batch axis is shown to
    be dynamic."""
    return [batch_size, 1] if batch_size > 1 else [1, TRACE_BATCH]


def verify(model: nn.Module, spec: ExportSpec, path: str, input_shape: Sequence[int],
           batch_sizes: Sequence[int], rtol: float = DEFAULT_RTOL) -> tuple[dict[str, float], list[str]]:
    """Run ``path`` with onnxruntime and the model with PyTorch on the same seeded batches.

    Returns ``({"<output>@<batch>": relative difference}, notes)``, the notes naming outputs that
    PyTorch returns as all zeros (an untrained head: the check then shows little). Raises
    :class:`ExportMismatchError` above ``rtol``."""
    session = ort_session(path)
    differences: dict[str, float] = {}
    failures, zero_outputs = [], set()
    for i, batch in enumerate(batch_sizes):
        inputs = sample_batch(batch, input_shape, seed=i + 1)
        with torch.no_grad():
            expected = spec.forward(model, inputs)
        expected = list(expected) if isinstance(expected, (list, tuple)) else [expected]
        actual = run_onnxruntime(session, inputs.numpy())
        if len(actual) != len(expected):
            raise ExportMismatchError(
                f"{path}: the ONNX graph has {len(actual)} outputs, PyTorch returns {len(expected)}"
            )
        for name, got, want in zip(spec.output_names, actual, expected):
            want = want.detach().float().numpy()
            if not np.any(want):
                zero_outputs.add(name)
            diff = relative_difference(np.asarray(got), want)
            differences[f"{name}@{batch}"] = diff
            if not diff <= rtol:
                shapes = "" if np.shape(got) == want.shape else f" (shape {np.shape(got)} vs {want.shape})"
                failures.append(f"output `{name}` at batch {batch}: {diff:.3g}{shapes}")
    if failures:
        raise ExportMismatchError(
            f"{path}: onnxruntime's outputs differ from PyTorch's above the tolerance {rtol:g} (relative, "
            f"max |onnx - torch| / max |torch|): " + "; ".join(failures)
            + ". The file was written but is not right; an op the exporter translates differently is "
            "the usual cause"
        )
    notes = [f"PyTorch's `{name}` is all zeros on the check batches (untrained weights?): the comparison "
             "shows little for it" for name in sorted(zero_outputs)]
    return differences, notes


# --------------------------------------------------------------------------------------------
# The whole export


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and checked."""

    path: str
    input_shape: tuple[int, ...]
    output_names: list[str]
    opset: int
    differences: dict[str, float]
    metadata: dict[str, str]
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        worst = max(self.differences.values()) if self.differences else float("nan")
        batches = sorted({int(k.rsplit("@", 1)[1]) for k in self.differences})
        lines = [
            f"wrote {self.path} (opset {self.opset})",
            f"input `{INPUT_NAME}`: float32 (N, {', '.join(map(str, self.input_shape))}), N dynamic",
            f"outputs: {', '.join(self.output_names)}",
            f"checked with onnxruntime at batch sizes {batches}: max relative difference {worst:.2e}",
            f"preprocessing: {self.metadata.get(META_PREFIX + 'input', '')}; "
            f"mean {self.metadata.get(META_PREFIX + 'mean')}, std {self.metadata.get(META_PREFIX + 'std')}",
        ]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _metadata(model: nn.Module, spec: ExportSpec, input_shape: Sequence[int],
              extra: dict[str, str] | None) -> dict[str, str]:
    prep = preprocessing(model)
    meta = {
        "task_model": type(model).__name__,
        "input": prep["input"],
        "input_shape": json.dumps(["N", *input_shape]),
        "mean": prep["mean"],
        "std": prep["std"],
        "channel_order": prep["channel_order"],
        "outputs": json.dumps(spec.outputs),
        "postprocess": spec.postprocess,
    }
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        from vitasks.apis import test_pipeline_cfg

        with contextlib.suppress(VitasksError):
            meta["test_pipeline"] = json.dumps(test_pipeline_cfg(cfg), default=str)
    classes = (getattr(model, "dataset_meta", None) or {}).get("classes")
    if classes is not None:
        meta["classes"] = json.dumps(list(classes))
    meta.update(extra or {})
    return {META_PREFIX + k: str(v) for k, v in meta.items() if v is not None and v != ""}


def export_onnx(
    model: nn.Module,
    path: str,
    batch_size: int = TRACE_BATCH,
    opset: int | None = None,
    img_size: int | Sequence[int] | None = None,
    rtol: float = DEFAULT_RTOL,
    metadata: dict[str, str] | None = None,
) -> ExportResult:
    """Export ``model`` (eval mode, CPU) to ``path`` and check it with onnxruntime.

    Args:
        model: a task model, e.g. from :func:`vitasks.apis.init_model`.
        path: the ``.onnx`` file written.
        batch_size: a batch size checked (with one other); the batch axis is dynamic.
        opset: ONNX opset (default: the exporter's).
        img_size: input ``H`` or ``(H, W)`` (default: the backbone's ``img_size``).
        rtol: the largest relative difference accepted.
        metadata: extra ``metadata_props`` (keys get the ``vitasks.`` prefix).

    Raises:
        ExportError: the model cannot be traced or translated (names the module);
        ExportMismatchError: onnxruntime disagrees with PyTorch above ``rtol``.
    """
    _require_onnx()
    if batch_size < 1:
        raise ExportError(f"--batch-size must be >= 1, got {batch_size}")
    devices = {p.device.type for p in model.parameters()}
    if devices - {"cpu"}:
        raise ExportError(
            f"export a model on the CPU (init_model(..., device='cpu')); this one is on {sorted(devices)}"
        )
    model = model.eval()
    spec = export_spec(model)
    input_shape = export_input_shape(model, img_size)
    sample = sample_batch(max(batch_size, TRACE_BATCH), input_shape)
    program = capture(model, spec, sample)
    onnx_program = convert(model, program, spec, opset)
    meta = _metadata(model, spec, input_shape, metadata)
    _set_metadata(onnx_program, meta)
    _save(onnx_program, path)
    differences, check_notes = verify(model, spec, path, input_shape, check_batch_sizes(batch_size), rtol)
    opset_used = onnx_program.model.opset_imports.get("", opset or 0)
    return ExportResult(path=path, input_shape=tuple(input_shape), output_names=spec.output_names,
                        opset=int(opset_used), differences=differences, metadata=meta,
                        notes=spec.notes + check_notes)


def export_from_config(
    config: str,
    checkpoint: str | None,
    path: str,
    cfg_options: Sequence[str] | dict | None = None,
    **kwargs: Any,
) -> ExportResult:
    """:func:`export_onnx` of ``init_model(config, checkpoint)``; config and checkpoint names
    go into the metadata."""
    from vitasks.apis import init_model

    model = init_model(config, checkpoint, device="cpu", cfg_options=cfg_options)
    extra = {"config": os.path.basename(str(config)),
             "checkpoint": os.path.basename(str(checkpoint)) if checkpoint else "none (initial weights)"}
    extra.update(kwargs.pop("metadata", None) or {})
    return export_onnx(model, path, metadata=extra, **kwargs)
