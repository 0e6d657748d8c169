"""The machine a measurement ran on: the CPU (name, vector ISA, native bf16) and the load.

The one place that reads them: the benchmarks print them beside every number, and the engine's
bf16 check (:func:`vitasks.engine.amp.slow_bf16_reason`) asks whether bf16 autocast will be fast
or slow here. This module imports only torch, so any layer may use it.

bf16 autocast is only fast on CPUs with native bf16 arithmetic: AVX-512 BF16 or AMX on x86
(Cooper Lake, Sapphire Rapids and later; AMD Zen 4 and later), the BF16 extension on Arm
(Neoverse V1/N2, Graviton 3, Apple M2 and later). Elsewhere every bf16 operation is emulated
through float32 conversions, and a ViT-B/16 ran 6.7x slower under bf16 autocast than in plain
float32 on an AVX2-only CPU (0.52 against 3.48 images/s).

Detection, most reliable first:

1. ``/proc/cpuinfo`` (Linux): the ``flags`` line on x86 (``avx512_bf16``, ``amx_bf16``), the
   ``Features`` line on aarch64 (``bf16``);
2. the CPU description PyTorch builds with the cpuinfo library (other systems, x86 only);
3. otherwise unknown: ``bf16`` is None and nobody warns.

:func:`parse_cpuinfo` works on a text, so it is tested with the files of CPUs we do not have.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple

import torch

__all__ = ["CpuInfo", "cpu_info", "cpu_name", "load_average", "parse_cpuinfo", "X86_BF16_FLAGS",
           "ARM_BF16_FEATURE"]

#: x86 ``/proc/cpuinfo`` flags of native bf16 arithmetic (AVX-512 BF16; AMX tiles with bf16).
X86_BF16_FLAGS: Tuple[str, ...] = ("avx512_bf16", "amx_bf16")
#: The aarch64 ``Features`` entry of the BF16 extension (BFDOT, BFMMLA...).
ARM_BF16_FEATURE = "bf16"
# The flags shown in messages: the vector ISA a reader needs to judge the CPU.
_SHOWN_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "asimd", "sve", "bf16")

_X86 = ("x86_64", "amd64", "i386", "i686", "x86")
_ARM = ("aarch64", "arm64")


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's name, vector ISA and bf16 support.

    Attributes:
        model_name: e.g. ``"Intel(R) Xeon(R) Platinum 8480+"`` (``"unknown"`` when not found).
        arch: the machine architecture (``x86_64``, ``aarch64``, ...).
        isa: the vector ISA PyTorch's kernels use (``torch.backends.cpu.get_cpu_capability()``:
            ``DEFAULT``, ``AVX2``, ``AVX512``, ``SVE256``...).
        bf16: True with native bf16 instructions, False without, None when unknown.
        flags: the relevant flags found (e.g. ``("avx2",)``), for messages.
        source: where the answer came from (``/proc/cpuinfo``, ``torch cpuinfo``, ``unknown``).
    """

    model_name: str = "unknown"
    arch: str = "unknown"
    isa: str = "unknown"
    bf16: Optional[bool] = None
    flags: Tuple[str, ...] = field(default_factory=tuple)
    source: str = "unknown"

    def describe(self) -> str:
        """One line for logs and the benchmark: name, ISA level, bf16 support."""
        if self.bf16 is None:
            bf16 = "unknown"
        elif self.bf16:
            bf16 = "yes (" + ", ".join(f for f in self.flags if f in X86_BF16_FLAGS + (ARM_BF16_FEATURE,)) + ")"
        else:
            bf16 = "no, emulated (no AVX-512 BF16 / AMX / Arm BF16 instructions)"
        return f"{self.model_name} [{self.arch}], ISA {self.isa}, native bf16: {bf16}"


def _fields(text: str) -> dict:
    """The first value of every ``key : value`` line (the first processor's block)."""
    values: dict = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        if sep and key and key not in values:
            values[key] = value.strip()
    return values


def parse_cpuinfo(text: str, arch: str, isa: str = "unknown") -> CpuInfo:
    """Read a ``/proc/cpuinfo`` text of a CPU of architecture ``arch``.

    x86: ``bf16`` from the ``flags`` line (True with ``avx512_bf16`` or ``amx_bf16``); aarch64:
    from ``Features`` (True with ``bf16``). A text without that line, or another architecture,
    gives ``bf16=None`` (unknown).
    """
    arch = (arch or "unknown").lower()
    values = _fields(text)
    # x86 says "model name"; Arm kernels print no name, some boards a "Hardware" or "model name".
    name = values.get("model name") or values.get("hardware") or values.get("cpu model") or "unknown"
    bf16: Optional[bool] = None
    flags: Tuple[str, ...] = ()
    if arch in _X86 and "flags" in values:
        have = set(values["flags"].split())
        flags = tuple(f for f in _SHOWN_FLAGS if f in have)
        bf16 = any(f in have for f in X86_BF16_FLAGS)
    elif arch in _ARM and "features" in values:
        have = set(values["features"].split())
        flags = tuple(f for f in _SHOWN_FLAGS if f in have)
        bf16 = ARM_BF16_FEATURE in have
    return CpuInfo(model_name=name, arch=arch, isa=isa, bf16=bf16, flags=flags,
                   source="/proc/cpuinfo" if bf16 is not None else "unknown")


def from_torch_cpuinfo(description: Mapping, arch: str, isa: str = "unknown") -> CpuInfo:
    """The same from PyTorch's cpuinfo description (``torch._C._cpu._get_cpu_capability()``,
    a dict of ``{"avx2": True, "avx512_bf16": False, "cpu_name": ..., ...}``), x86 only."""
    arch = (arch or "unknown").lower()
    name = str(description.get("cpu_name") or "unknown")
    if arch not in _X86 or not all(f in description for f in X86_BF16_FLAGS):
        return CpuInfo(model_name=name, arch=arch, isa=isa)
    # cpuinfo spells AVX-512 Foundation "avx512_f"; /proc/cpuinfo "avx512f".
    have = {("avx512f" if k == "avx512_f" else k) for k, v in description.items() if v is True}
    return CpuInfo(model_name=name, arch=arch, isa=isa, bf16=any(f in have for f in X86_BF16_FLAGS),
                   flags=tuple(f for f in _SHOWN_FLAGS if f in have), source="torch cpuinfo")


def _torch_isa() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's :class:`CpuInfo` (computed once per process)."""
    arch, isa = platform.machine(), _torch_isa()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            info = parse_cpuinfo(f.read(), arch, isa)
        if info.bf16 is not None:
            return info
    except OSError:
        info = CpuInfo(arch=arch.lower(), isa=isa)
    # Not Linux (or a cpuinfo without flags): PyTorch's own CPU description, a private API
    # that may change, hence the guard.
    describe = getattr(getattr(torch._C, "_cpu", None), "_get_cpu_capability", None)
    if callable(describe):
        try:
            description = describe()
        except RuntimeError:
            description = None
        if isinstance(description, Mapping):
            found = from_torch_cpuinfo(description, arch, isa)
            if found.bf16 is not None or info.model_name == "unknown":
                return found
    return info


def cpu_name() -> str:
    """The CPU's name and the number of CPUs, for the header of a measurement."""
    return f"{cpu_info().model_name} ({os.cpu_count()} cpus)"


def load_average() -> Optional[list]:
    """The 1, 5 and 15 minute load averages (rounded), or None where the system has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
