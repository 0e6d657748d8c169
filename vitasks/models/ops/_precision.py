"""Precision helpers shared by the ops: box and sampling arithmetic runs in float32 (or float64)
even when the model runs in float16/bfloat16 under autocast."""

import contextlib

import torch


def as_float(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32, or as it is if it is float64: the precision box arithmetic needs
    (half-precision coordinates lose whole pixels at COCO image sizes)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context in which autocast does not lower matmuls to half precision on ``device_type``."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
