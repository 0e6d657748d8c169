"""Time the plain-torch detection ops against the brute-force references of the tests (and against
torchvision's compiled ops, where a working torchvision is installed). Prints a Markdown table.

    .venv/bin/python tools/bench_ops.py [--threads 1] [--repeats 3] [--device cpu]
    .venv-torch214/bin/python tools/bench_ops.py   # adds torchvision's column (see crosscheck_ops.py)

"vitasks ops" is the plain-torch version (what CPU-only torch builds run); the torchvision column
is torchvision's kernel as vitasks calls it where ``kernels()`` is "torchvision" (batched NMS:
torchvision's NMS per class, as vitasks runs it, since torchvision's own ``batched_nms`` is not
exactly per-class NMS).

Workloads (the issue's): NMS and class-aware batched NMS over 10,000 boxes; RoIAlign of 1,000 RoIs
with 256 channels to 7x7 bins on one 200x200 feature map (stride 4 of an 800x800 image, boxes of
16-256 pixels a side), adaptive sampling (ViTDet's) and 2x2 samples, forward and forward+backward;
pasting 100 28x28 masks into a 1024x1024 image. Times are medians over ``--repeats`` runs; a
brute-force reference runs once, on all inputs or, where marked, on a slice whose time is scaled
up linearly (its cost is linear in the number of RoIs).
"""

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests" / "models" / "ops"))
sys.path.insert(0, str(REPO_ROOT / "tools"))

from crosscheck_ops import load_vitasks_ops  # noqa: E402
from ops_references import brute_nms, brute_roi_align  # noqa: E402


def working_torchvision_ops():
    """torchvision.ops if it imports and its compiled ops run, else None."""
    try:
        from torchvision import ops

        ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
        return ops
    except Exception:
        return None


def timed(fn: Callable, repeats: int, device: str) -> float:
    """Median wall time of ``fn()`` in seconds (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def once(fn: Callable) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def detection_boxes(n: int, image_size: float, min_side: float, max_side: float, generator) -> torch.Tensor:
    """Boxes like a detector's: centres anywhere, sides log-uniform in [min_side, max_side]."""
    centres = torch.rand(n, 2, generator=generator) * image_size
    log_sides = torch.rand(n, 2, generator=generator) * (torch.log(torch.tensor(max_side / min_side)))
    half = min_side * torch.exp(log_sides) / 2
    return torch.cat((centres - half, centres + half), dim=1).clamp(0, image_size)


def fmt(seconds: Optional[float], note: str = "") -> str:
    if seconds is None:
        return "n/a"
    text = f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"
    return text + note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--brute-rois", type=int, default=100,
                        help="RoIs given to the brute-force RoIAlign (its time is scaled to 1,000)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ops = load_vitasks_ops()
    tv = working_torchvision_ops()
    batched_nms_torchvision = importlib.import_module("vitasks.models.ops.nms").batched_nms_torchvision
    device = args.device
    generator = torch.Generator().manual_seed(0)
    rows = []

    # NMS over 10,000 boxes (a detector's pre-NMS candidates on a 1024 image).
    boxes = detection_boxes(10_000, 1024.0, 8.0, 512.0, generator)
    scores = torch.rand(10_000, generator=generator)
    classes = torch.randint(0, 80, (10_000,), generator=generator)
    on_device = boxes.to(device), scores.to(device), classes.to(device)
    for threshold in (0.5,):
        kept = len(ops.nms(on_device[0], on_device[1], threshold))
        rows.append((
            f"NMS, 10,000 boxes, IoU {threshold} ({kept} kept)",
            fmt(timed(lambda: ops.nms(on_device[0], on_device[1], threshold), args.repeats, device)),
            fmt(once(lambda: brute_nms(boxes, scores, threshold))),
            fmt(timed(lambda: tv.nms(on_device[0], on_device[1], threshold), args.repeats, device) if tv else None),
        ))
    rows.append((
        "batched NMS, 10,000 boxes, 80 classes, IoU 0.5",
        fmt(timed(lambda: ops.batched_nms(*on_device, 0.5), args.repeats, device)),
        fmt(once(lambda: brute_nms(boxes, scores, 0.5, classes.tolist()))),
        fmt(timed(lambda: batched_nms_torchvision(*on_device, 0.5), args.repeats, device) if tv else None),
    ))

    # RoIAlign: 1,000 RoIs, 256 channels, 7x7, one 200x200 map at stride 4.
    features = torch.randn(1, 256, 200, 200, generator=generator)
    roi_boxes = detection_boxes(1000, 800.0, 16.0, 256.0, generator)
    rois = torch.cat((torch.zeros(1000, 1), roi_boxes), dim=1)
    features_d, rois_d = features.to(device), rois.to(device)
    brute_slice = rois[: args.brute_rois]
    scale_note = f" (x{1000 / args.brute_rois:g} from {args.brute_rois} RoIs)" if args.brute_rois < 1000 else ""
    for sampling_ratio, name in ((0, "adaptive sampling"), (2, "2x2 samples")):
        def ours_forward():
            return ops.roi_align(features_d, rois_d, 7, 0.25, sampling_ratio, True)

        brute_time = once(lambda: brute_roi_align(features, brute_slice, (7, 7), 0.25, sampling_ratio, True))
        rows.append((
            f"RoIAlign fwd, 1,000 RoIs, 256 ch, 7x7, 200x200 map, {name}",
            fmt(timed(ours_forward, args.repeats, device)),
            fmt(brute_time * 1000 / len(brute_slice), scale_note),
            fmt(timed(lambda: tv.roi_align(features_d, rois_d, 7, 0.25, sampling_ratio, True),
                      args.repeats, device) if tv else None),
        ))

        leaf = features_d.clone().requires_grad_(True)

        def forward_backward(fn):
            return lambda: fn(leaf, rois_d, 7, 0.25, sampling_ratio, True).sum().backward()

        rows.append((
            f"RoIAlign fwd+bwd, same, {name}",
            fmt(timed(forward_backward(ops.roi_align), args.repeats, device)),
            "n/a",
            fmt(timed(forward_backward(tv.roi_align), args.repeats, device) if tv else None),
        ))

    # Mask pasting: 100 detections' 28x28 masks into a 1024x1024 image.
    masks = torch.rand(100, 28, 28, generator=generator).to(device)
    mask_boxes = detection_boxes(100, 1024.0, 16.0, 512.0, generator).to(device)
    rows.append((
        "paste 100 28x28 masks into 1024x1024",
        fmt(timed(lambda: ops.paste_masks_in_image(masks, mask_boxes, (1024, 1024)), args.repeats, device)),
        "n/a",
        "n/a (not in torchvision)",
    ))

    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} thread(s), "
          f"torchvision ops {'available' if tv else 'not available'}\n")
    print("| workload | vitasks ops | brute-force reference | torchvision |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
