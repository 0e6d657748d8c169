"""Mixed-precision training that works on CPU and GPU.

mmengine's ``AmpOptimWrapper`` refuses to be built without a GPU (an assertion in its
constructor) and always creates a CUDA ``GradScaler``. :class:`MixedPrecisionOptimWrapper` keeps
its behaviour (and its ``backward``/``step``/state-dict code, by subclassing) but autocasts on
whatever device the run uses:

- ``dtype="bfloat16"`` (the default, what ``--amp`` selects): autocast to bf16, no loss
  scaling (bf16 has float32's exponent range);
- ``dtype="float16"``: autocast to fp16 with dynamic loss scaling (``torch.amp.GradScaler``),
  meant for GPUs (CPU fp16 works but is slow).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional, Union

import torch
from mmengine.device import get_device
from mmengine.optim import AmpOptimWrapper, OptimWrapper

from vitasks.errors import ConfigError
from vitasks.registry import OPTIM_WRAPPERS

__all__ = ["MixedPrecisionOptimWrapper", "autocast_dtype"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    """``"bfloat16"``/``"float16"`` (or the torch dtype, or None) as a torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype not in (None, *_DTYPES.values()):
            raise ConfigError(f"optim_wrapper.dtype: expected bfloat16 or float16, got {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"optim_wrapper.dtype: expected 'bfloat16' or 'float16', got {dtype!r}")
    return _DTYPES[dtype]


def device_type() -> str:
    """The device type the Runner puts the model on: 'cuda', 'cpu', ..."""
    return get_device().split(":")[0]


@OPTIM_WRAPPERS.register_module()
class MixedPrecisionOptimWrapper(AmpOptimWrapper):
    """Optimizer wrapper with autocast in ``optim_context`` (train step forward + loss).

    Args:
        dtype: ``"bfloat16"`` (default) or ``"float16"``.
        loss_scale: for float16 only: ``"dynamic"`` (default), a fixed initial scale (float),
            or a dict of ``torch.amp.GradScaler`` arguments.
        **kwargs: arguments of mmengine's ``OptimWrapper`` (optimizer, clip_grad,
            accumulative_counts).
    """

    def __init__(
        self,
        dtype: Union[str, torch.dtype] = "bfloat16",
        loss_scale: Union[str, float, dict] = "dynamic",
        **kwargs,
    ):
        # Skip AmpOptimWrapper.__init__ (it asserts a GPU); set up its attributes ourselves.
        OptimWrapper.__init__(self, **kwargs)
        self.cast_dtype = autocast_dtype(dtype)
        self.device_type = device_type()
        self._scale_update_param = None
        use_scaler = self.cast_dtype == torch.float16
        if loss_scale == "dynamic":
            scaler_args = {}
        elif isinstance(loss_scale, (int, float)):
            self._scale_update_param = float(loss_scale)
            scaler_args = dict(init_scale=float(loss_scale))
        elif isinstance(loss_scale, dict):
            scaler_args = dict(loss_scale)
        else:
            raise ConfigError(
                f"optim_wrapper.loss_scale: expected 'dynamic', a number or a dict, got {loss_scale!r}"
            )
        self.loss_scaler = torch.amp.GradScaler(self.device_type, enabled=use_scaler, **scaler_args)

    @contextmanager
    def optim_context(self, model: torch.nn.Module):
        with OptimWrapper.optim_context(self, model), torch.autocast(
            device_type=self.device_type, dtype=self.cast_dtype
        ):
            yield
