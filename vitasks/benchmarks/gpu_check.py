"""Check a GPU machine in one command (``bash tools/gpu_check.sh``): which SDPA kernels run, which
kernels the detection ops run (torchvision's, checked equal to plain torch on the GPU), the
benchmark table (fp32, bf16, ``--compile``) and the MFU of a ViT-B/16 bf16 training step.

MFU (model FLOPs utilisation) = the FLOPs a training step needs (forward + backward, counted by
:mod:`vitasks.benchmarks.throughput`: recomputation of gradient checkpointing not counted) per second, over
the GPU's dense bf16 peak. The peak comes from :data:`BF16_PEAK_TFLOPS` by device name, or
``--peak-tflops``. The batch is the largest power of two that fits (``--batch-size`` to fix it).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["BF16_PEAK_TFLOPS", "bf16_peak_tflops", "sdpa_kernels", "detection_kernels", "largest_batch", "gpu_check"]

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets. Matched
# against torch.cuda.get_device_name() in this order (first substring that matches).
BF16_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
)


def bf16_peak_tflops(device_name: str) -> Optional[float]:
    """The dense bf16 peak of a GPU by its name, or None when the table does not know it."""
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def sdpa_kernels(device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                 shape: tuple = (8, 12, 197, 64)) -> dict[str, Any]:
    """Which of SDPA's backends run attention of ``shape`` (B, heads, N, head_dim), and which one
    SDPA picks by itself (the kernel names a profiler sees)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    backends = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        try:
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, k, v)
            backends[name.lower()] = "runs"
        except RuntimeError as e:
            backends[name.lower()] = f"not available: {str(e).splitlines()[0][:120]}"
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    names = sorted({e.key for e in prof.key_averages()})
    chosen = [n for n in names if any(s in n.lower() for s in ("flash", "efficient", "fmha", "cudnn", "math"))]
    return {"backends": backends, "default_kernels": chosen}


def detection_kernels(device: str = "cuda") -> dict[str, Any]:
    """Which kernels NMS, batched NMS and RoIAlign run (``vitasks.models.ops.kernels()``) and,
    with torchvision's, whether they give on ``device`` what vitasks' plain-torch ones give."""
    import importlib

    from vitasks.models.ops import kernels

    info: dict[str, Any] = {"kernels": kernels()}
    if info["kernels"] != "torchvision":
        return info
    nms_ops = importlib.import_module("vitasks.models.ops.nms")
    roi_ops = importlib.import_module("vitasks.models.ops.roi_align")
    g = torch.Generator().manual_seed(0)
    centres, sides = torch.rand(3000, 2, generator=g) * 800, torch.rand(3000, 2, generator=g) * 100 + 4
    boxes = torch.cat((centres - sides / 2, centres + sides / 2), dim=1).to(device)
    scores = (torch.rand(3000, generator=g) * 50).round().to(device)  # ties
    classes = torch.randint(0, 20, (3000,), generator=g).to(device)
    info["nms_equal"] = torch.equal(nms_ops.nms_torchvision(boxes, scores, 0.5).cpu(),
                                    nms_ops.nms_torch(boxes, scores, 0.5).cpu())
    info["batched_nms_equal"] = torch.equal(nms_ops.batched_nms_torchvision(boxes, scores, classes, 0.5).cpu(),
                                            nms_ops.batched_nms_torch(boxes, scores, classes, 0.5).cpu())
    features = torch.randn(2, 64, 100, 100, generator=g).to(device)
    rois = torch.cat((torch.randint(0, 2, (500, 1), generator=g).float().to(device), boxes[:500]), dim=1)
    diffs = []
    for fn in (roi_ops.roi_align_torchvision, roi_ops.roi_align_torch):
        leaf = features.clone().requires_grad_(True)
        out = fn(leaf, rois, 7, 0.125, 0, True)
        out.square().sum().backward()
        diffs.append((out.detach(), leaf.grad))
    (out_tv, grad_tv), (out_pt, grad_pt) = diffs
    info["roi_align_max_rel_diff"] = max(
        ((a - b).abs().max() / b.abs().max().clamp(min=1)).item() for a, b in ((out_pt, out_tv), (grad_pt, grad_tv)))
    return info


def largest_batch(try_batch, start: int = 8, limit: int = 1024) -> int:
    """The largest power of two from ``start`` up to ``limit`` for which ``try_batch(b)`` runs
    without running out of memory."""
    best, batch = 0, start
    while batch <= limit:
        try:
            try_batch(batch)
        except torch.OutOfMemoryError:
            break
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        best, batch = batch, batch * 2
    if best == 0:
        raise RuntimeError(f"not even a batch of {start} fits")
    return best


def gpu_check(config: str, batch_size: Optional[int] = None, peak_tflops: Optional[float] = None,
              iters: int = 10, compile: bool = True) -> dict[str, Any]:
    """Run the checks on the current CUDA device; returns everything measured."""
    from vitasks.benchmarks.throughput import run_benchmark

    if not torch.cuda.is_available():
        raise RuntimeError("gpu_check needs a CUDA device (torch.cuda.is_available() is False)")
    name = torch.cuda.get_device_name()
    peak = peak_tflops or bf16_peak_tflops(name)
    report: dict[str, Any] = {"device": name, "torch": torch.__version__, "bf16_peak_tflops": peak,
                              "sdpa": sdpa_kernels("cuda"), "ops": detection_kernels("cuda")}
    rows = {}
    for label, amp, comp in (("fp32 eager", False, False), ("bf16 eager", True, False), ("bf16 compile", True, True)):
        if comp and not compile:
            continue
        rows[label] = run_benchmark(config, batch_size=64, amp=amp, compile=comp, iters=iters, warmup=3)
    report["table"] = rows

    def train_at(batch: int) -> dict:
        return run_benchmark(config, batch_size=batch, amp=True, compile=compile, iters=3, warmup=2)

    batch = batch_size or largest_batch(lambda b: train_at(b))
    result = train_at(batch) if batch_size else run_benchmark(config, batch_size=batch, amp=True,
                                                              compile=compile, iters=iters, warmup=3)
    train_tflops = result["phases"]["training"]["tflops"]
    report["mfu"] = {"batch_size": batch, "train_tflops": train_tflops,
                     "mfu": train_tflops / peak if peak else None}
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as markdown (for the README's GPU section)."""
    lines = [f"GPU: {report['device']}, torch {report['torch']}, dense bf16 peak "
             f"{report['bf16_peak_tflops']} TFLOP/s", "", "SDPA backends (bf16, 8 x 12 heads x 197 tokens x 64):"]
    for backend, state in report["sdpa"]["backends"].items():
        lines.append(f"- {backend}: {state}")
    lines.append(f"- picked by default: {', '.join(report['sdpa']['default_kernels']) or 'unknown'}")
    ops = report.get("ops")
    if ops:
        line = f"Detection ops (NMS, batched NMS, RoIAlign): {ops['kernels']}'s kernels"
        if "nms_equal" in ops:
            line += (f"; on the GPU equal to plain torch: NMS {ops['nms_equal']}, batched NMS "
                     f"{ops['batched_nms_equal']}, RoIAlign and its gradient to "
                     f"{ops['roi_align_max_rel_diff']:.1e} (relative)")
        lines += ["", line]
    lines += ["", "| run | inference img/s | training img/s | training TFLOP/s |", "|---|---|---|---|"]
    for label, r in report["table"].items():
        inf, tr = r["phases"].get("inference", {}), r["phases"].get("training", {})
        lines.append(f"| {label} | {inf.get('images_per_s', float('nan')):.1f} | "
                     f"{tr.get('images_per_s', float('nan')):.1f} | {tr.get('tflops', float('nan')):.1f} |")
    m = report["mfu"]
    mfu = f"{100 * m['mfu']:.1f} %" if m["mfu"] is not None else "n/a (unknown peak: --peak-tflops)"
    lines += ["", f"ViT-B/16 bf16 training step at batch {m['batch_size']}: {m['train_tflops']:.1f} TFLOP/s, MFU {mfu}"]
    return "\n".join(lines)
