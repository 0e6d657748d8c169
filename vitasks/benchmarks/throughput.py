"""Throughput, memory and FLOP efficiency of a config's model (``tools/benchmark.py``).

What is measured, per phase (inference, training):

- **images/s**: batch size / median wall time of the timed iterations, after warm-up
  iterations (at least 2 with ``--compile``: the first one compiles; its time is reported as
  ``first_iter_s``, "1st iter s" in the table). The device is synchronised around each
  iteration; every timed iteration is kept in the JSON (``times_s``). Inference is
  ``model(x, mode="tensor")`` under ``torch.no_grad()``; a training step is that forward in
  train mode, ``loss = sum(mean(out))`` (task-independent, so any model can be timed without
  labels), backward and one step of the optimizer that training would use (the config's
  ``optim_wrapper``, built as the Runner builds it, with its parameter groups and options such
  as ``fused``; ``torch.optim.AdamW`` when the config has none).
- **--compile**: ``torch.compile`` (inductor). Inference is compiled with
  :data:`COMPILE_INFERENCE_OPTIONS` (``freezing``: weights are constants of the inference
  graph, so autocast's per-call weight casts and the GEMM weight packing happen once, at
  compile time); training with the defaults.
- **peak memory**: on CUDA, ``torch.cuda.max_memory_allocated`` during the phase (weights,
  activations, gradients and optimizer state; the caching allocator's reserve excluded). On
  the CPU, the peak resident set size of the process during the phase (Linux ``VmHWM``, reset
  per phase through ``/proc/self/clear_refs``; else ``ru_maxrss``) minus the resident size
  before the model was built: it counts weights, activations, gradients and optimizer state,
  and also whatever the allocator keeps from earlier phases, so read it as an upper bound.
- **GFLOPs per sample**: counted by ``torch.utils.flop_counter.FlopCounterMode`` on the batch, per sample
  (matmuls, convolutions, attention; elementwise ops are not counted, as is customary). One
  multiply-add is 2 FLOPs; GMACs = GFLOPs / 2 is printed too, the unit in which model cards
  ("ViT-B/16: 17.6 GFLOPs") usually state it. Training counts forward + backward; the
  recomputation of gradient checkpointing is not counted (model FLOPs, as in MFU).
- **achieved FLOP/s** = FLOPs per sample x images/s, and its **ratio to a plain matmul**
  (``a @ b``, square, ``--matmul-size``) timed in the same run on the same device with the same
  threads: fp32, and also bf16 with ``--amp``. The reference is the median of
  ``--matmul-iters`` runs before the model and as many after it (after 2 untimed ones each
  time), so one disturbance on a shared machine does not set it alone. A ratio near 1 means the
  model runs as fast as the hardware's best dense kernel allows.
- **tokens per block**: for a ViT backbone, the tokens each block's attention sees (counted
  on the meta copy): a token reduction (``model.backbone.token_reduction``: ToMe's merges,
  TokenLearner, visual tokens) shows as a shrinking set, and its FLOPs are counted on that set
  (merging, tokenizer and projector ops included).
- **cpu**: the host CPU's name, the vector ISA PyTorch's kernels use and whether it has native
  bf16 instructions (AVX-512 BF16 / AMX, Arm BF16; :mod:`vitasks.benchmarks.machine`), printed
  above the table. Without them bf16 is emulated and ``--amp`` on the CPU is several times
  slower than float32: the table then says so.
- The load average before and after is recorded: on a shared CPU, other processes (and idle
  OpenMP threads spinning, see ``OMP_WAIT_POLICY``) make every figure noisy; compare runs
  made on a quiet machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from vitasks.engine.amp import slow_bf16_reason
from vitasks.benchmarks.machine import CpuInfo, cpu_info, cpu_name, load_average
from vitasks.errors import VitasksError

aten = torch.ops.aten

#: Inductor options of ``--compile`` for inference. ``freezing`` treats the weights as constants
#: of the inference graph: it folds what is recomputed from them on every call (autocast's
#: weight casts to bf16) and prepacks them for oneDNN's GEMM on the CPU. Training graphs are
#: compiled with the defaults (weights change there).
COMPILE_INFERENCE_OPTIONS: dict[str, Any] = {"freezing": True}


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


def _time(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> tuple[list[float], list[float]]:
    """Wall times of ``warmup`` then ``iters`` calls of ``fn`` (device synchronised around each):
    (warm-up times, timed times). The first warm-up call includes any compilation."""
    warm, times = [], []
    for i in range(warmup + iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        (warm if i < warmup else times).append(time.perf_counter() - start)
    return warm, times


def time_matmul(size: int, dtype: torch.dtype, device: torch.device, iters: int = 5,
                warmup: int = 2) -> list[float]:
    """FLOP/s of each of ``iters`` square ``size`` matmuls in ``dtype`` (after ``warmup`` untimed
    ones, which let the BLAS library set up its threads and buffers), with the same threads as
    the model."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    _, times = _time(lambda: torch.mm(a, b, out=out), device, warmup, iters)
    return [matmul_flops(size, size, size) / t for t in times]


class PeakMemory:
    """Peak memory of a phase in bytes; see the module docstring for what is counted."""

    def __init__(self, device: torch.device, baseline_rss: int) -> None:
        self.device = device
        self.baseline_rss = baseline_rss
        self.method = "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS - RSS before model"

    def __enter__(self) -> "PeakMemory":
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


def current_rss() -> int:
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
    onnx: bool = False,
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
        onnx: also export the model as ONNX (checked against PyTorch, see vitasks.deploy) and time
            it with onnxruntime beside eager PyTorch, alternating, same threads (CPU, fp32).
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
    amp_dtype = torch.bfloat16
    if amp and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        amp_dtype = torch.float16
    cpu = cpu_info()

    # The reference first (and again at the end): a BLAS kernel timed at two moments, so that a
    # short disturbance on a shared machine does not set the ratio on its own.
    ref_dtypes = {"float32": torch.float32}
    if amp:
        ref_dtypes[str(amp_dtype).replace("torch.", "")] = amp_dtype
    ref_samples: dict[str, list[float]] = {
        k: time_matmul(matmul_size, dt, dev, matmul_iters) for k, dt in ref_dtypes.items()
    }
    load_before = load_average()

    baseline_rss = current_rss()
    model = build_model(cfg).to(dev)
    if grad_ckpt:
        backbone = getattr(model, "backbone", None)
        if not hasattr(backbone, "set_grad_checkpointing"):
            raise VitasksError(
                f"--grad-ckpt: the backbone ({type(backbone).__name__}) has no set_grad_checkpointing()"
            )
    shape = _input_shape(cfg, batch_size, size)
    inputs = torch.randn(shape, device=dev)

    def autocast():
        return torch.autocast(dev.type, dtype=amp_dtype, enabled=amp)

    infer_flops, train_flops = _model_flops(cfg, model, inputs, train)
    tokens_per_block = _tokens_per_block(cfg, model, inputs)
    if compile:
        warmup = max(warmup, 2)  # the first call compiles; the second may still specialise

    result: dict[str, Any] = {
        "config": getattr(cfg, "filename", None) or (config if isinstance(config, str) else None),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        # The host CPU's capability: whether bf16 is native or emulated decides whether --amp
        # helps or hurts on the CPU (see vitasks.benchmarks.machine).
        "cpu": dataclasses.asdict(cpu),
        "amp_note": slow_bf16_reason(dev.type, amp_dtype, cpu) if amp else None,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "batch_size": batch_size,
        "input_shape": list(shape),
        "amp": amp,
        "amp_dtype": str(amp_dtype).replace("torch.", "") if amp else None,
        "compile": compile,
        "compile_options": {"inference": COMPILE_INFERENCE_OPTIONS, "training": {}} if compile else None,
        "grad_ckpt": grad_ckpt,
        "iters": iters,
        "warmup": warmup,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "token_reduction": _token_reduction_name(model),
        "tokens_per_block": tokens_per_block,
        "gflops_per_sample": {"inference": infer_flops / 1e9, "training": train_flops / 1e9 if train else None},
        "gmacs_per_sample": {"inference": infer_flops / 2e9, "training": train_flops / 2e9 if train else None},
        "memory_measure": None,
        "optimizer": None,
        "phases": {},
    }

    # Inference. With --compile: inductor with `freezing` (weights become constants of the graph,
    # so it folds the per-call work on them: autocast's weight casts, weight prepacking for the
    # CPU GEMM kernels) -- valid because weights do not change during inference.
    model.eval()
    runner = torch.compile(model) if compile else model

    def infer_step():
        with torch.no_grad(), autocast():
            return runner(inputs, mode="tensor")

    # The options as inductor's global config while the graph compiles (at the first call):
    # `torch.compile(options=...)` applies them too late for `freezing` to take effect.
    inductor_options = _inductor_config(COMPILE_INFERENCE_OPTIONS) if compile else contextlib.nullcontext()
    with inductor_options, PeakMemory(dev, baseline_rss) as mem:
        warm, times = _time(infer_step, dev, warmup, iters)
    result["memory_measure"] = mem.method
    result["phases"]["inference"] = _phase(warm, times, batch_size, infer_flops, mem.peak)
    del runner
    if compile:
        torch._dynamo.reset()  # the frozen inference graph holds copies of the weights

    # onnxruntime beside eager PyTorch: fp32 on the CPU, whatever --amp / --compile say.
    if onnx:
        if dev.type != "cpu":
            raise VitasksError("--onnx times onnxruntime's CPU provider: run it with --device cpu")
        import tempfile

        from vitasks.deploy.onnx import export_onnx
        from vitasks.benchmarks.onnx_timing import compare_onnx_eager_model

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            export_onnx(model, path, batch_size=batch_size, img_size=size)
            result["onnxruntime"] = compare_onnx_eager_model(path, model, batch_size, iters, warmup, img_size=size)

    # Training: forward, loss, backward and the optimizer step that training would use.
    if train:
        model.train()
        if grad_ckpt:
            model.backbone.set_grad_checkpointing(True)
        optimizer, result["optimizer"] = _build_optimizer(cfg, model)
        runner = torch.compile(model) if compile else model

        def train_step():
            with autocast():
                loss = _loss_of(runner(inputs, mode="tensor"))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        with PeakMemory(dev, baseline_rss) as mem:
            warm, times = _time(train_step, dev, warmup, iters)
        result["phases"]["training"] = _phase(warm, times, batch_size, train_flops, mem.peak)
        del optimizer, runner
    del model, inputs
    if compile:
        torch._dynamo.reset()
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    for k, dt in ref_dtypes.items():
        ref_samples[k] += time_matmul(matmul_size, dt, dev, matmul_iters)
    refs = {k: statistics.median(v) for k, v in ref_samples.items()}
    result["load_average"] = {"before": load_before, "after": load_average()}
    result["matmul"] = {
        "size": matmul_size,
        "tflops": {k: v / 1e12 for k, v in refs.items()},
        "samples_tflops": {k: [x / 1e12 for x in v] for k, v in ref_samples.items()},
    }
    for phase in result["phases"].values():
        phase["ratio_to_matmul"] = {k: phase["tflops"] * 1e12 / v for k, v in refs.items()}
    return result


def _inductor_config(options: dict[str, Any]):
    import torch._inductor.config as inductor_config

    return inductor_config.patch(options)


@contextlib.contextmanager
def _quiet_mmengine():
    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel("WARNING")
    try:
        yield
    finally:
        logger.setLevel(level)


def _build_optimizer(cfg, model: nn.Module) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer that training would use: the config's ``optim_wrapper`` built as the Runner
    builds it (constructor, parameter groups, the optimizer's own options such as ``fused``);
    without one, ``torch.optim.AdamW`` with its defaults. Returns it and a description."""
    ow = cfg.get("optim_wrapper")
    if isinstance(ow, dict) and isinstance(ow.get("optimizer"), dict):
        import copy

        from vitasks.registry import OPTIM_WRAPPER_CONSTRUCTORS

        ow = copy.deepcopy(dict(ow))
        ow["type"] = "OptimWrapper"  # autocast is the benchmark's; only the optimizer is wanted
        for key in ("dtype", "loss_scale"):
            ow.pop(key, None)
        constructor = OPTIM_WRAPPER_CONSTRUCTORS.build(dict(
            type=ow.pop("constructor", "DefaultOptimWrapperConstructor"),
            optim_wrapper_cfg=ow, paramwise_cfg=ow.pop("paramwise_cfg", None)))
        with _quiet_mmengine():  # one log line per parameter group otherwise
            optimizer = constructor(model).optimizer
        source = "config optim_wrapper"
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
        source = "default (no optim_wrapper in the config)"
    flags = [f"{k}={optimizer.defaults[k]}" for k in ("foreach", "fused") if k in optimizer.defaults]
    return optimizer, f"{type(optimizer).__name__}({', '.join(flags)}) from {source}"


def _model_flops(cfg, model: nn.Module, inputs: torch.Tensor, train: bool) -> tuple[int, int]:
    """Model FLOPs per sample (inference, training), eager, without checkpointing: the whole
    batch is counted (training-mode BatchNorm needs more than one sample) and divided by its size,
    on a copy built on the meta device (no computation, no memory), else on the model itself."""
    batch = inputs.shape[0]
    try:
        from vitasks.apis import build_model

        with init_on_meta():
            meta_model = build_model(cfg)
        meta_inputs = torch.empty(inputs.shape, device="meta")
        infer = count_model_flops(meta_model, meta_inputs, train=False)
        trained = count_model_flops(meta_model, meta_inputs, train=True) if train else 0
    except (NotImplementedError, RuntimeError):  # an op without a meta kernel
        infer = count_model_flops(model, inputs, train=False)
        trained = count_model_flops(model, inputs, train=True) if train else 0
    return infer // batch, trained // batch


def _token_reduction_name(model: nn.Module) -> str | None:
    reduction = getattr(getattr(model, "backbone", None), "token_reduction", None)
    if reduction is None:
        return None
    return f"{type(reduction).__name__}({reduction.extra_repr()})"


def _tokens_per_block(cfg, model: nn.Module, inputs: torch.Tensor) -> list[int] | None:
    """Tokens entering each block's attention (a one-sample pass on a meta copy; None when the
    model has no ViT blocks or the pass fails on meta)."""
    from vitasks.models.layers.token_reduction import count_tokens

    if not hasattr(getattr(model, "backbone", None), "blocks") or inputs.dim() != 4:
        return None
    try:
        from vitasks.apis import build_model

        with init_on_meta():
            meta_model = build_model(cfg)
        meta_model.eval()
        return count_tokens(meta_model, torch.empty((1, *inputs.shape[1:]), device="meta")) or None
    except (NotImplementedError, RuntimeError):
        return None


def _phase(warm: list[float], times: list[float], batch_size: int, flops_per_sample: int,
           peak: int) -> dict[str, Any]:
    median = statistics.median(times)
    ips = batch_size / median
    return {
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        "times_s": times,
        # The first warm-up iteration: with --compile, mostly compilation time.
        "first_iter_s": warm[0] if warm else None,
        "images_per_s": ips,
        "peak_memory_mib": peak / 2**20,
        "tflops": flops_per_sample * ips / 1e12,
    }


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of :func:`run_benchmark`'s result."""
    refs = result["matmul"]["tflops"]
    train_gflops = result["gflops_per_sample"].get("training")
    load = result.get("load_average")
    head = (
        f"config: {result['config']}\n"
        f"device: {result['device']} ({result['device_name']}), threads {result['threads']}, "
        f"batch {result['batch_size']}, input {tuple(result['input_shape'])}, "
        f"amp {result['amp_dtype'] or 'off'}, compile {'on' if result['compile'] else 'off'}, "
        f"grad-ckpt {'on' if result['grad_ckpt'] else 'off'}\n"
        + (f"cpu: {CpuInfo(**result['cpu']).describe()}\n" if result.get("cpu") else "")
        + (f"warning: {result['amp_note']}\n" if result.get("amp_note") else "")
        + f"params {result['params_m']:.2f} M; per sample: inference "
        f"{result['gflops_per_sample']['inference']:.2f} GFLOPs "
        f"({result['gmacs_per_sample']['inference']:.2f} GMACs), training (fwd+bwd) "
        + (f"{train_gflops:.2f} GFLOPs" if train_gflops is not None else "n/a")
        + (f"\ntoken reduction: {result['token_reduction']}" if result.get("token_reduction") else "")
        + (f"\ntokens per block: {' '.join(map(str, result['tokens_per_block']))}"
           if result.get("tokens_per_block") and result.get("token_reduction") else "")
        + f"\nmatmul {result['matmul']['size']}^3 reference (median of "
        f"{len(next(iter(result['matmul']['samples_tflops'].values())))} runs, before and after the model): "
        + ", ".join(f"{k} {v * 1e3:.1f} GFLOP/s" for k, v in refs.items())
        + (f"\noptimizer: {result['optimizer']}" if result.get("optimizer") else "")
        + f"\nmemory: {result['memory_measure']}"
        + (f"\nload average (1, 5, 15 min): before {load['before']}, after {load['after']}"
           if load and load.get("before") else "")
        + "\n"
    )
    cols = ["phase", "images/s", "ms/iter", "min-max ms", "1st iter s", "peak MiB", "GFLOP/s"] + [
        f"/ {k} mm" for k in refs]
    rows = []
    for name, p in result["phases"].items():
        first = p.get("first_iter_s")
        rows.append(
            [name, f"{p['images_per_s']:.2f}", f"{p['median_s'] * 1e3:.1f}",
             f"{p['min_s'] * 1e3:.0f}-{p['max_s'] * 1e3:.0f}", f"{first:.1f}" if first is not None else "-",
             f"{p['peak_memory_mib']:.0f}", f"{p['tflops'] * 1e3:.1f}"]
            + [f"{p['ratio_to_matmul'][k]:.2f}" for k in refs]
        )
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    table = head + "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows])
    if result.get("onnxruntime"):
        from vitasks.benchmarks.onnx_timing import format_comparison

        table += "\n\nonnxruntime beside eager PyTorch (fp32, alternating batches):\n" + format_comparison(
            result["onnxruntime"])
    return table
