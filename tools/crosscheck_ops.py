"""Cross-check vitasks' plain-torch detection ops against torchvision's compiled ones.

vitasks runs torchvision's kernels where torchvision works and its plain-torch ones otherwise
(``vitasks.models.ops.kernels()``); this script compares the plain-torch versions (``nms_torch``,
``batched_nms_torch``, ``roi_align_torch``, whatever the process chose) with torchvision itself,
on many more cases than the tests (tests/models/ops/test_ops_kernels.py, CI's second leg). It
needs torchvision with working ops, i.e. the second leg's environment:

    bash tools/setup_env.sh torch214    # .venv-torch214: torch 2.14.1 + torchvision 0.29.1 + timm
    .venv-torch214/bin/python tools/crosscheck_ops.py [--device cpu|cuda] [--seed 0]

It compares:

- ``nms`` and ``batched_nms`` (both of torchvision's code paths: on the CPU, the coordinate
  offset up to 1,000 boxes (4,000 coordinates) and the per-class loop above) on random boxes with degenerate, duplicate,
  out-of-image boxes and tied scores: the kept indices must be identical;
- ``roi_align`` with aligned True / False, sampling ratios -1, 0, 1, 2, 4, several spatial scales
  and random RoIs (inside, partly or fully outside the map, tiny, huge, empty, inverted):
  outputs and gradients, reported as the largest difference relative to the largest value;
- ``box_iou`` (where torchvision's is defined: pairs that are not both empty).

Exit status 1 if an NMS result differs (batched NMS is compared with torchvision's NMS run per
class, which is what batched NMS means; torchvision's own ``batched_nms`` only approximates that,
see ``check_nms``) or a relative float difference exceeds 1e-4.
"""

import argparse
import importlib
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, List, Tuple

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
FLOAT_TOLERANCE = 1e-4


def load_vitasks_ops():
    """vitasks' plain-torch ops under the ops' usual names (whatever kernels() chose)."""
    from vitasks.models import ops

    nms_module = importlib.import_module("vitasks.models.ops.nms")
    roi_align_module = importlib.import_module("vitasks.models.ops.roi_align")
    return SimpleNamespace(
        nms=nms_module.nms_torch, batched_nms=nms_module.batched_nms_torch,
        roi_align=roi_align_module.roi_align_torch, box_iou=ops.box_iou,
        paste_masks_in_image=ops.paste_masks_in_image,
    )


def load_torchvision_ops():
    """torchvision.ops, or exit with a message saying how to get a working one."""
    try:
        import torchvision
        from torchvision import ops

        ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)  # the compiled ops really load
    except Exception as error:  # ImportError, or RuntimeError from a wheel built for another torch
        sys.exit(
            f"crosscheck_ops.py needs torchvision with working ops ({type(error).__name__}: "
            f"{error}).\nRun it with the environment described at the top of this file."
        )
    return torchvision, ops


def random_boxes(n: int, image_size: float, generator: torch.Generator) -> torch.Tensor:
    """Boxes of every kind: mostly inside the image, some outside, tiny, duplicated, empty."""
    centres = torch.rand(n, 2, generator=generator) * image_size * 1.2 - 0.1 * image_size
    half_sides = torch.rand(n, 2, generator=generator) ** 2 * image_size / 4
    boxes = torch.cat((centres - half_sides, centres + half_sides), dim=1)
    if n >= 20:
        boxes[::19, 2] = boxes[::19, 0]  # zero width
        boxes[3::13] = boxes[2::13][: len(boxes[3::13])]  # duplicates
    return boxes


def per_class_nms(tv_ops, boxes, scores, classes, threshold) -> torch.Tensor:
    """What batched NMS promises, from torchvision's own NMS run on each class alone: the kept
    boxes of all classes, by descending score, ties in input order."""
    keep = torch.zeros(len(scores), dtype=torch.bool)
    for label in classes.unique():
        members = (classes == label).nonzero().squeeze(1)
        keep[members[tv_ops.nms(boxes[members], scores[members], threshold)].cpu()] = True
    order = torch.sort(scores.cpu(), descending=True, stable=True).indices
    return order[keep[order]]


def check_nms(ours, tv_ops, device: str, generator: torch.Generator) -> List[Tuple[str, str, bool]]:
    rows = []
    for n in (0, 1, 50, 1000, 3999, 5000, 10000):
        boxes = random_boxes(n, 1000.0, generator).to(device)
        scores = torch.rand(n, generator=generator).to(device)
        if n >= 50:
            scores[1::7] = scores[::7][: len(scores[1::7])]  # ties
        classes = torch.randint(0, 20, (n,), generator=generator).to(device)
        for threshold in (0.3, 0.5, 0.7):
            same = torch.equal(ours.nms(boxes, scores, threshold).cpu(), tv_ops.nms(boxes, scores, threshold).cpu())
            rows.append((f"nms n={n} iou={threshold}", "identical" if same else "DIFFERENT", same))
            keep = ours.batched_nms(boxes, scores, classes, threshold).cpu()
            same = torch.equal(keep, per_class_nms(tv_ops, boxes, scores, classes, threshold))
            # torchvision's batched_nms itself only approximates per-class NMS: up to 1,000
            # boxes on the CPU it shifts each class by class * (max coordinate + 1), which rounds
            # float32 coordinates; above, it orders equal scores with an unstable sort. Its
            # differences from per-class NMS are shown but do not fail the check.
            reference = tv_ops.batched_nms(boxes, scores, classes, threshold).cpu()
            changed = len(set(keep.tolist()) ^ set(reference.tolist()))
            vs_batched = "same order" if torch.equal(keep, reference) else (
                f"{changed} boxes differ" if changed else "same set, tie order differs")
            result = ("identical" if same else "DIFFERENT") + f" to per-class nms; torchvision batched: {vs_batched}"
            rows.append((f"batched_nms n={n} iou={threshold}", result, same))
    return rows


def random_rois(n: int, num_images: int, image_size: float, generator: torch.Generator) -> torch.Tensor:
    boxes = random_boxes(n, image_size, generator)
    boxes[5::17, 2:] = boxes[5::17, :2] - 4  # inverted
    boxes[6::17] *= 3  # huge, partly far outside
    batch = torch.randint(0, num_images, (n, 1), generator=generator).float()
    return torch.cat((batch, boxes), dim=1)


def max_difference(fn_ours: Callable, fn_reference: Callable, features: torch.Tensor) -> Tuple[float, float]:
    """Largest differences of the outputs and of the gradients (of a random projection of the
    output), each relative to the largest magnitude of torchvision's values (at least 1): many RoIs
    add their gradients into the same cells, so gradients reach tens and float32 sums in a
    different order differ by more than 1e-4 in absolute terms."""
    ours_in = features.clone().requires_grad_(True)
    reference_in = features.clone().requires_grad_(True)
    out_ours, out_reference = fn_ours(ours_in), fn_reference(reference_in)
    projection = torch.randn_like(out_reference)
    (out_ours * projection).sum().backward()
    (out_reference * projection).sum().backward()

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        if b.numel() == 0:
            return 0.0
        return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()

    return relative(out_ours, out_reference), relative(ours_in.grad, reference_in.grad)


def check_roi_align(ours, tv_ops, device: str, generator: torch.Generator) -> List[Tuple[str, str, bool]]:
    rows = []
    image_size = 256.0
    for stride in (1, 4, 16):
        side = int(image_size) // stride
        features = torch.randn(2, 8, side, side + 3, generator=generator).to(device)
        rois = random_rois(300, 2, image_size, generator).to(device)
        for aligned in (True, False):
            for sampling_ratio in (-1, 0, 1, 2, 4):
                for output_size in ((7, 7), (14, 14), (3, 5)):
                    args = (rois, output_size, 1.0 / stride, sampling_ratio, aligned)
                    out_diff, grad_diff = max_difference(
                        lambda f: ours.roi_align(f, *args), lambda f: tv_ops.roi_align(f, *args), features
                    )
                    ok = out_diff <= FLOAT_TOLERANCE and grad_diff <= FLOAT_TOLERANCE
                    name = (f"roi_align stride={stride} aligned={aligned} sampling={sampling_ratio} "
                            f"out={output_size[0]}x{output_size[1]}")
                    rows.append((name, f"out {out_diff:.2e}  grad {grad_diff:.2e}", ok))
    # Boxes as a list per image give the same as (K, 5).
    features = torch.randn(2, 4, 32, 32, generator=generator).to(device)
    per_image = [random_boxes(40, 32.0, generator).to(device) for _ in range(2)]
    diff = (ours.roi_align(features, per_image, 7, 1.0, 0, True)
            - tv_ops.roi_align(features, per_image, 7, 1.0, 0, True)).abs().max().item()
    rows.append(("roi_align boxes as a list per image", f"out {diff:.2e}", diff <= FLOAT_TOLERANCE))
    return rows


def check_box_iou(ours, tv_ops, device: str, generator: torch.Generator) -> List[Tuple[str, str, bool]]:
    boxes1 = random_boxes(500, 100.0, generator).to(device)
    boxes2 = random_boxes(300, 100.0, generator).to(device)
    reference = tv_ops.box_iou(boxes1, boxes2)
    defined = ~torch.isnan(reference)  # torchvision gives 0/0 for two empty boxes
    diff = (ours.box_iou(boxes1, boxes2) - reference)[defined].abs().max().item()
    return [("box_iou", f"{diff:.2e}", diff <= 1e-6)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torchvision, tv_ops = load_torchvision_ops()
    ours = load_vitasks_ops()
    generator = torch.Generator().manual_seed(args.seed)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, device {args.device}")
    rows = []
    for check in (check_nms, check_roi_align, check_box_iou):
        rows += check(ours, tv_ops, args.device, generator)
    width = max(len(name) for name, _, _ in rows)
    for name, result, ok in rows:
        print(f"{name:<{width}}  {result}{'' if ok else '   <-- FAIL'}")
    failures = sum(not ok for _, _, ok in rows)
    roi_rows = [r for r in rows if r[0].startswith("roi_align stride")]
    worst_out = max(float(r[1].split()[1]) for r in roi_rows)
    worst_grad = max(float(r[1].split()[3]) for r in roi_rows)
    nms_rows = [r for r in rows if "nms" in r[0]]
    print(f"\nNMS / batched NMS: {sum(ok for _, _, ok in nms_rows)} of {len(nms_rows)} identical")
    print(f"RoIAlign ({len(roi_rows)} settings): max relative difference output {worst_out:.2e}, "
          f"gradient {worst_grad:.2e}")
    print("all equal" if failures == 0 else f"{failures} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
