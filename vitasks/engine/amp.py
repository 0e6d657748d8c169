"""Mixed-precision training that works on CPU and GPU.

mmengine's ``AmpOptimWrapper`` refuses to be built without a GPU (an assertion in its
constructor) and always creates a CUDA ``GradScaler``. :class:`MixedPrecisionOptimWrapper` keeps
its behaviour (and its ``backward``/``step``/state-dict code, by subclassing) but autocasts on
whatever device the run uses:

- ``dtype="bfloat16"`` (the default, what ``--amp`` selects): autocast to bf16, no loss
  scaling (bf16 has float32's exponent range);
- ``dtype="float16"``: autocast to fp16 with dynamic loss scaling (``torch.amp.GradScaler``),
  meant for GPUs (CPU fp16 works but is slow).

bf16 autocast on a CPU without native bf16 instructions (AVX-512 BF16 / AMX, Arm BF16) is
emulated and several times slower than float32: :func:`warn_if_bf16_is_slow` says so once per
process (``tools/train.py --amp`` and ``tools/test.py --amp`` call it through
:mod:`vitasks.engine.launch`).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Optional, Union

import torch
from mmengine.device import get_device
from mmengine.optim import AmpOptimWrapper, OptimWrapper

from vitasks.checks import one_of
from vitasks.errors import ConfigError
from vitasks.registry import OPTIM_WRAPPERS

__all__ = ["MixedPrecisionOptimWrapper", "autocast_dtype", "SlowBf16Warning", "slow_bf16_reason",
           "warn_if_bf16_is_slow"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    """``"bfloat16"``/``"float16"`` (or the torch dtype, or None) as a torch dtype."""
    if dtype is None or dtype in _DTYPES.values():
        return dtype
    return _DTYPES[one_of(dtype, tuple(_DTYPES), "optim_wrapper.dtype")]


def device_type() -> str:
    """The device type the Runner puts the model on: 'cuda', 'cpu', ..."""
    return get_device().split(":")[0]


class SlowBf16Warning(UserWarning):
    """bf16 autocast was asked for on a CPU that emulates bf16 (slower than float32)."""


# One warning per process: train and test in one process, or several runs, say it once.
_warned_slow_bf16 = False


def slow_bf16_reason(device: str, dtype: Union[str, torch.dtype, None], info=None) -> Optional[str]:
    """Why autocast to ``dtype`` on ``device`` will be slower than float32, or None.

    Only bf16 on a CPU known to lack native bf16 instructions has a reason; GPUs, float16,
    CPUs with bf16 and CPUs of unknown capability (``info.bf16 is None``) have none.

    Args:
        device: device type (``"cpu"``, ``"cuda"``...).
        dtype: the autocast dtype (``"bfloat16"`` or a torch dtype).
        info: a :class:`~vitasks.benchmarks.machine.CpuInfo`; default this machine's.
    """
    if device != "cpu" or autocast_dtype(dtype) != torch.bfloat16:
        return None
    if info is None:
        from vitasks.benchmarks.machine import cpu_info

        info = cpu_info()
    if info.bf16 is not False:
        return None
    flags = ", ".join(info.flags) or "none of avx512f, avx512_bf16, amx_tile, amx_bf16, bf16"
    return (
        f"this CPU ({info.model_name}, ISA {info.isa}) has no AVX-512 BF16 / AMX (x86) or BF16 (Arm) "
        f"instructions (flags: {flags}): bf16 autocast is emulated and will be several times slower "
        "than float32 (a ViT-B/16 ran 6.7x slower); drop --amp (and optim_wrapper.dtype) on this machine"
    )


def warn_if_bf16_is_slow(device: str, dtype: Union[str, torch.dtype, None], info=None) -> Optional[str]:
    """Warn (:class:`SlowBf16Warning`, once per process) when :func:`slow_bf16_reason` has a
    reason. Returns the reason, or None."""
    global _warned_slow_bf16
    reason = slow_bf16_reason(device, dtype, info)
    if reason is not None and not _warned_slow_bf16:
        _warned_slow_bf16 = True
        warnings.warn(reason, SlowBf16Warning, stacklevel=2)
    return reason


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
