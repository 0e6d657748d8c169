"""Deployment: ONNX export checked with onnxruntime (``tools/export_onnx.py``), and timing of
the exported model beside eager PyTorch. Needs the ``deploy`` extra (onnx, onnxruntime,
onnxscript)."""

from vitasks.deploy.onnx import (
    DEFAULT_RTOL,
    ExportError,
    ExportMismatchError,
    ExportResult,
    export_from_config,
    export_onnx,
    find_failing_module,
)
from vitasks.deploy.specs import ExportSpec, export_input_shape, export_spec, preprocessing

__all__ = [
    "DEFAULT_RTOL",
    "ExportError",
    "ExportMismatchError",
    "ExportResult",
    "ExportSpec",
    "export_from_config",
    "export_input_shape",
    "export_onnx",
    "export_spec",
    "find_failing_module",
    "preprocessing",
]
