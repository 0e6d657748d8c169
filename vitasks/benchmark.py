"""Throughput, memory and FLOP efficiency of a config's model (``tools/benchmark.py``).

What is measured, per phase (inference, training):

- **images/s**: batch size / median wall time of the timed iterations (after warm-up
  iterations, which also absorb ``torch.compile``'s compilation). The device is synchronised
  around each iteration. Inference is ``model(x, mode="tensor")`` under ``torch.no_grad()``;
  a training step is that forward in train mode, ``loss = sum(mean(out))`` (task-independent,
  so any model can be timed without labels), backward and one ``torch.optim.AdamW`` step.
- **peak memory**: on CUDA, ``torch.cuda.max_memory_allocated`` during the phase (weights,
  activations, gradients and optimizer state; the caching allocator's reserve excluded). On
  the CPU, the peak resident set size of the process during the phase (Linux ``VmHWM``, reset
  per phase through ``/proc/self/clear_refs``; else ``ru_maxrss``) minus the resident size
  before the model was built: it counts weights, activations, gradients and optimizer state,
  and also whatever the allocator keeps from earlier phases, so read it as an upper bound.
- **GFLOPs per sample**: counted by ``torch.utils.flop_counter.FlopCounterMode`` on one sample
  (matmuls, convolutions, attention; elementwise ops are not counted, as is customary). One
  multiply-add is 2 FLOPs; GMACs = GFLOPs / 2 is printed too, the unit in which model cards
  ("ViT-B/16: 17.6 GFLOPs") usually state it. Training counts forward + backward; the
  recomputation of gradient checkpointing is not counted (model FLOPs, as in MFU).
- **achieved FLOP/s** = FLOPs per sample x images/s, and its **ratio to a plain matmul**
  (``a @ b``, square, ``--matmul-size``) timed in the same run on the same device: fp32, and
  also bf16 with ``--amp``. A ratio near 1 means the model runs as fast as the hardware's best
  dense kernel allows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from vitasks.errors import VitasksError

aten = torch.ops.aten


# FlopCounterMode knows the CUDA attention kernels and the math path (bmm), but not the fused
# CPU kernel that SDPA picks on the CPU: without these entries attention would count as zero.
def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    # Twice the forward (the gradients of both matmuls), as the math path counts on the meta
    # device; torch's own formula for the GPU kernels adds the recomputation of Q K^T, which
    # is not a model FLOP.
    return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)


EXTRA_FLOP_FORMULAS: dict[Any, Callable[..., int]] = {}
if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
    EXTRA_FLOP_FORMULAS[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flop
if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
    EXTRA_FLOP_FORMULAS[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flop


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts the fused CPU attention kernel."""
    return FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)


def matmul_flops(m: int, n: int, k: int) -> int:
    """FLOPs of an (m, k) @ (k, n) matmul: m*n*k multiply-adds, 2 FLOPs each."""
    return 2 * m * n * k


def _loss_of(out: Any) -> torch.Tensor:
    """``sum(mean(t))`` over every floating tensor in a (nested) model output."""
    if isinstance(out, torch.Tensor):
        return out.float().mean() if out.is_floating_point() else out.new_zeros((), dtype=torch.float32)
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        parts = [_loss_of(o) for o in out]
        parts = [p for p in parts if p.requires_grad] or parts
        return sum(parts[1:], parts[0]) if parts else torch.zeros(())
    return torch.zeros(())


def count_model_flops(model: nn.Module, inputs: torch.Tensor, train: bool = False) -> int:
    """FLOPs of ``model(inputs, mode="tensor")`` (and its backward when ``train``).

    Works on any device, including ``meta`` (no computation happens there). Gradients that the
    count leaves behind are cleared.
    """
    was_training = model.training
    model.train(train)
    try:
        with flop_counter() as counter:
            if train:
                _loss_of(model(inputs, mode="tensor")).backward()
            else:
                with torch.no_grad():
                    model(inputs, mode="tensor")
    finally:
        model.train(was_training)
        if train:
            model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


@contextlib.contextmanager
def init_on_meta():
    """Build modules with their parameters and buffers on the ``meta`` device.

    Each parameter or buffer is moved to ``meta`` as it is registered, so the (slow, for big
    models) random initialisation that follows runs on shapes only, while construction code that
    needs real values (e.g. ``torch.linspace(...).tolist()``) still works, unlike under
    ``with torch.device("meta")``. For FLOP counting, which needs shapes only.
    """
    register_parameter = nn.Module.register_parameter
    register_buffer = nn.Module.register_buffer

    def parameter_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def buffer_on_meta(module, name, tensor, persistent=True):
        if tensor is not None:
            tensor = tensor.to("meta")
        register_buffer(module, name, tensor, persistent)

    nn.Module.register_parameter = parameter_on_meta
    nn.Module.register_buffer = buffer_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter
        nn.Module.register_buffer = register_buffer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def time_matmul(size: int, dtype: torch.dtype, device: torch.device, iters: int = 5,
                warmup: int = 1) -> float:
    """FLOP/s of a square ``size`` matmul in ``dtype`` (median over ``iters``)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = _time(lambda: a @ b, device, warmup, iters)
    return matmul_flops(size, size, size) / statistics.median(times)


class _PeakMemory:
    """Peak memory of a phase in bytes; see the module docstring for what is counted."""

    def __init__(self, device: torch.device, baseline_rss: int) -> None:
        self.device = device
        self.baseline_rss = baseline_rss
        self.method = "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS - RSS before model"

    def __enter__(self) -> "_PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_peak_rss()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = max(0, _peak_rss() - self.baseline_rss)


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _current_rss() -> int:
    rss = _status_kb("VmRSS")
    return rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> None:
    # Linux: writing 5 resets VmHWM to the current RSS, so each phase gets its own peak.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss() -> int:
    hwm = _status_kb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _input_shape(cfg, batch_size: int, img_size: int) -> tuple[int, ...]:
    backbone = cfg.model.get("backbone", {}) or {}
    channels = int(backbone.get("in_channels", 3))
    frames = backbone.get("num_frames")
    if frames:  # video backbones take (B, C, T, H, W)
        return (batch_size, channels, int(frames), img_size, img_size)
    return (batch_size, channels, img_size, img_size)


def _config_img_size(cfg) -> int:
    for value in (cfg.get("img_size"), (cfg.model.get("backbone", {}) or {}).get("img_size")):
        if isinstance(value, int):
            return value
        if isinstance(value, (list, tuple)) and value:
            return int(value[0])
    return 224


def run_benchmark(
    config: str | Any,
    batch_size: int = 8,
    amp: bool = False,
    compile: bool = False,
    grad_ckpt: bool = False,
    img_size: int | None = None,
    iters: int = 10,
    warmup: int = 3,
    device: str | None = None,
    matmul_size: int = 4096,
    matmul_iters: int = 5,
    train: bool = True,
    cfg_options: list[str] | dict | None = None,
) -> dict[str, Any]:
    """Benchmark the model of ``config``; returns a flat-ish dict (see :func:`format_table`).

    Args:
        config: config path or mmengine Config.
        batch_size: images per iteration.
        amp: bf16 autocast (fp16 on GPUs without bf16).
        compile: ``torch.compile`` the model (compilation happens in the warm-up).
        grad_ckpt: gradient checkpointing in the backbone during training.
        img_size: input side; sets the config's top-level ``img_size`` and the backbone's
            ``img_size`` so the position embeddings fit without resampling.
        iters, warmup: timed and warm-up iterations per phase.
        device: "cpu", "cuda", ...; default CUDA when available.
        matmul_size, matmul_iters: the reference matmul.
        train: also benchmark a training step.
        cfg_options: extra config overrides.
    """
    from vitasks.apis import build_model, load_cfg

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    options: list[str] | dict | None = cfg_options
    if img_size is not None:
        # Before `${img_size}` references are resolved, so every key that follows it fits.
        if isinstance(cfg_options, dict):
            options = {**cfg_options, "img_size": int(img_size)}
        else:
            options = list(cfg_options or []) + [f"img_size={int(img_size)}"]
    cfg = load_cfg(config, options)
    if img_size is not None and isinstance(cfg.model.get("backbone"), dict) and "img_size" in cfg.model.backbone:
        cfg.model.backbone.img_size = int(img_size)
    size = int(img_size) if img_size is not None else _config_img_size(cfg)

    baseline_rss = _current_rss()
    model = build_model(cfg).to(dev)
    if grad_ckpt:
        backbone = getattr(model, "backbone", None)
        if not hasattr(backbone, "set_grad_checkpointing"):
            raise VitasksError(
                f"--grad-ckpt: the backbone ({type(backbone).__name__}) has no set_grad_checkpointing()"
            )
    shape = _input_shape(cfg, batch_size, size)
    inputs = torch.randn(shape, device=dev)
    one = inputs[:1]

    amp_dtype = torch.bfloat16
    if amp and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        amp_dtype = torch.float16

    def autocast():
        return torch.autocast(dev.type, dtype=amp_dtype, enabled=amp)

    infer_flops, train_flops = _model_flops(cfg, model, one, train)

    runner = torch.compile(model) if compile else model
    result: dict[str, Any] = {
        "config": getattr(cfg, "filename", None) or (config if isinstance(config, str) else None),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "input_shape": list(shape),
        "amp": amp,
        "amp_dtype": str(amp_dtype).replace("torch.", "") if amp else None,
        "compile": compile,
        "grad_ckpt": grad_ckpt,
        "iters": iters,
        "warmup": warmup,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflops_per_sample": {"inference": infer_flops / 1e9, "training": train_flops / 1e9},
        "gmacs_per_sample": {"inference": infer_flops / 2e9, "training": train_flops / 2e9},
        "memory_measure": None,
        "phases": {},
    }

    # Inference.
    model.eval()

    def infer_step():
        with torch.no_grad(), autocast():
            return runner(inputs, mode="tensor")

    with _PeakMemory(dev, baseline_rss) as mem:
        times = _time(infer_step, dev, warmup, iters)
    result["memory_measure"] = mem.method
    result["phases"]["inference"] = _phase(times, batch_size, infer_flops, mem.peak)

    # Training.
    if train:
        model.train()
        if grad_ckpt:
            model.backbone.set_grad_checkpointing(True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

        def train_step():
            with autocast():
                loss = _loss_of(runner(inputs, mode="tensor"))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        with _PeakMemory(dev, baseline_rss) as mem:
            times = _time(train_step, dev, warmup, iters)
        result["phases"]["training"] = _phase(times, batch_size, train_flops, mem.peak)
        del optimizer
    del runner, model, inputs
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    # The reference, last so that its buffers do not inflate the model's memory numbers.
    refs = {"float32": time_matmul(matmul_size, torch.float32, dev, matmul_iters)}
    if amp:
        refs[result["amp_dtype"]] = time_matmul(matmul_size, amp_dtype, dev, matmul_iters)
    result["matmul"] = {"size": matmul_size, "tflops": {k: v / 1e12 for k, v in refs.items()}}
    for phase in result["phases"].values():
        phase["ratio_to_matmul"] = {k: phase["tflops"] * 1e12 / v for k, v in refs.items()}
    return result


def _model_flops(cfg, model: nn.Module, one: torch.Tensor, train: bool) -> tuple[int, int]:
    """Model FLOPs of one sample (inference, training), eager, without checkpointing: counted on
    a copy built on the meta device (no computation, no memory), else on the model itself."""
    try:
        from vitasks.apis import build_model

        with init_on_meta():
            meta_model = build_model(cfg)
        meta_one = torch.empty(one.shape, device="meta")
        infer = count_model_flops(meta_model, meta_one, train=False)
        return infer, count_model_flops(meta_model, meta_one, train=True) if train else 0
    except (NotImplementedError, RuntimeError):  # an op without a meta kernel
        infer = count_model_flops(model, one, train=False)
        return infer, count_model_flops(model, one, train=True) if train else 0


def _phase(times: list[float], batch_size: int, flops_per_sample: int, peak: int) -> dict[str, Any]:
    median = statistics.median(times)
    ips = batch_size / median
    return {
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        "images_per_s": ips,
        "peak_memory_mib": peak / 2**20,
        "tflops": flops_per_sample * ips / 1e12,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cpus)"
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} cpus)"


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of :func:`run_benchmark`'s result."""
    refs = result["matmul"]["tflops"]
    head = (
        f"config: {result['config']}\n"
        f"device: {result['device']} ({result['device_name']}), threads {result['threads']}, "
        f"batch {result['batch_size']}, input {tuple(result['input_shape'])}, "
        f"amp {result['amp_dtype'] or 'off'}, compile {'on' if result['compile'] else 'off'}, "
        f"grad-ckpt {'on' if result['grad_ckpt'] else 'off'}\n"
        f"params {result['params_m']:.2f} M; per sample: inference "
        f"{result['gflops_per_sample']['inference']:.2f} GFLOPs "
        f"({result['gmacs_per_sample']['inference']:.2f} GMACs), training (fwd+bwd) "
        f"{result['gflops_per_sample']['training']:.2f} GFLOPs\n"
        f"matmul {result['matmul']['size']}^3 reference: "
        + ", ".join(f"{k} {v * 1e3:.1f} GFLOP/s" for k, v in refs.items())
        + f"\nmemory: {result['memory_measure']}\n"
    )
    cols = ["phase", "images/s", "ms/iter", "peak MiB", "GFLOP/s"] + [f"/ {k} mm" for k in refs]
    rows = []
    for name, p in result["phases"].items():
        rows.append(
            [name, f"{p['images_per_s']:.2f}", f"{p['median_s'] * 1e3:.1f}", f"{p['peak_memory_mib']:.0f}",
             f"{p['tflops'] * 1e3:.1f}"] + [f"{p['ratio_to_matmul'][k]:.2f}" for k in refs]
        )
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return head + "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="tools/benchmark.py",
        description="Inference and training throughput, peak memory, FLOPs and FLOP/s efficiency "
        "relative to a plain matmul, for the model of a config.",
    )
    p.add_argument("config", help="config file (YAML)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (fp16 on GPUs without bf16)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in training")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the config's)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per phase")
    p.add_argument("--warmup", type=int, default=3, help="warm-up iterations per phase")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--matmul-size", type=int, default=4096, help="side of the reference matmul")
    p.add_argument("--matmul-iters", type=int, default=5)
    p.add_argument("--no-train", action="store_true", help="inference only")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    p.add_argument("--cfg-options", nargs="+", default=None, metavar="KEY=VALUE",
                   help="override config keys (dotted), as for the other commands")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in ("batch_size", "iters", "matmul_size", "matmul_iters"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    try:
        result = run_benchmark(
            args.config, batch_size=args.batch_size, amp=args.amp, compile=args.compile,
            grad_ckpt=args.grad_ckpt, img_size=args.img_size, iters=args.iters,
            warmup=max(0, args.warmup), device=args.device, matmul_size=args.matmul_size,
            matmul_iters=args.matmul_iters, train=not args.no_train, cfg_options=args.cfg_options,
        )
    except VitasksError as e:
        print(f"vitasks: error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
