"""Throughput of an exported ONNX model with onnxruntime beside eager PyTorch, in one run.

The two are timed in alternation (one onnxruntime batch, one PyTorch batch, ...), with the
same number of threads, so a load that comes and goes on a shared machine falls on both alike;
the load average before and after is reported with the numbers.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from vitasks.benchmarks.machine import load_average
from vitasks.deploy.onnx import ort_session, run_onnxruntime, sample_batch
from vitasks.deploy.specs import export_input_shape, export_spec

__all__ = ["time_onnxruntime", "compare_onnx_eager", "compare_onnx_eager_model", "format_comparison"]


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _input_shape_of(session) -> tuple[int, ...]:
    shape = session.get_inputs()[0].shape[1:]
    if not all(isinstance(s, int) for s in shape):
        raise ValueError(f"the ONNX input has a non-fixed sample shape {shape}; give input_shape")
    return tuple(shape)


def time_onnxruntime(path: str, batch_size: int, iters: int = 10, warmup: int = 2,
                     threads: int | None = None, input_shape: Sequence[int] | None = None) -> list[float]:
    """Seconds per batch of ``iters`` onnxruntime runs of ``path`` on a ``batch_size`` batch
    (after ``warmup`` untimed ones), with ``threads`` intra-op threads (default torch's)."""
    session = ort_session(path, threads)
    shape = tuple(input_shape) if input_shape is not None else _input_shape_of(session)
    inputs = sample_batch(batch_size, shape).numpy()
    for _ in range(warmup):
        run_onnxruntime(session, inputs)
    return [_timed(lambda: run_onnxruntime(session, inputs)) for _ in range(iters)]


def compare_onnx_eager(
    path: str,
    config: str,
    checkpoint: str | None = None,
    batch_size: int = 8,
    iters: int = 10,
    warmup: int = 2,
    img_size: int | Sequence[int] | None = None,
    cfg_options: Sequence[str] | dict | None = None,
) -> dict[str, Any]:
    """:func:`compare_onnx_eager_model` with ``init_model(config, checkpoint)``."""
    from vitasks.apis import init_model

    model = init_model(config, checkpoint, device="cpu", cfg_options=cfg_options)
    return compare_onnx_eager_model(path, model, batch_size, iters, warmup, img_size)


def compare_onnx_eager_model(
    path: str,
    model: torch.nn.Module,
    batch_size: int = 8,
    iters: int = 10,
    warmup: int = 2,
    img_size: int | Sequence[int] | None = None,
) -> dict[str, Any]:
    """Images/s of ``path`` under onnxruntime and of ``model`` (what it was exported from) in
    eager PyTorch (``torch.no_grad``, float32, CPU), timed in alternation on the same batch with
    torch's thread count for both.

    Returns ``{"batch_size", "threads", "input_shape", "onnxruntime": {...}, "pytorch": {...},
    "speedup", "load_before", "load_after", "cpu_count"}``, each engine with ``images_per_s``
    (from the median batch time), ``median_s`` and ``times_s``.
    """
    model = model.eval()
    spec = export_spec(model)
    shape = export_input_shape(model, img_size)
    threads = torch.get_num_threads()
    session = ort_session(path, threads)
    inputs = sample_batch(batch_size, shape)
    array = inputs.numpy()

    def eager() -> None:
        with torch.no_grad():
            spec.forward(model, inputs)

    def onnx() -> None:
        run_onnxruntime(session, array)

    load_before = load_average()
    for _ in range(warmup):
        onnx()
        eager()
    times: dict[str, list[float]] = {"onnxruntime": [], "pytorch": []}
    for _ in range(iters):
        times["onnxruntime"].append(_timed(onnx))
        times["pytorch"].append(_timed(eager))
    result: dict[str, Any] = {"batch_size": batch_size, "threads": threads, "input_shape": list(shape),
                              "cpu_count": os.cpu_count(), "load_before": load_before, "load_after": load_average()}
    for name, values in times.items():
        median = statistics.median(values)
        result[name] = {"images_per_s": batch_size / median, "median_s": median,
                        "times_s": [round(t, 4) for t in values]}
    result["speedup"] = result["pytorch"]["median_s"] / result["onnxruntime"]["median_s"]
    return result


def format_comparison(result: dict[str, Any]) -> str:
    """The comparison as a small table, with threads and load."""
    rows = [f"batch {result['batch_size']}, input {tuple(result['input_shape'])}, {result['threads']} threads, "
            f"load average {result['load_before']} -> {result['load_after']} on {result['cpu_count']} CPUs",
            f"{'engine':<12} {'images/s':>10} {'median s/batch':>15} {'spread (min-max)':>20}"]
    for name in ("onnxruntime", "pytorch"):
        r = result[name]
        spread = f"{min(r['times_s']):.3f}-{max(r['times_s']):.3f}"
        rows.append(f"{name:<12} {r['images_per_s']:>10.2f} {r['median_s']:>15.4f} {spread:>20}")
    rows.append(f"onnxruntime / pytorch: {result['speedup']:.2f}x")
    return "\n".join(rows)

