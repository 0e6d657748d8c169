"""Brute-force references for the detection ops, written plainly from the definitions (one box,
bin, sample or pixel at a time, in float64). The tests compare the ops with them, and
tools/bench_ops.py times them next to the ops."""

import math

import numpy as np
import torch


def brute_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, groups=None) -> list:
    boxes, scores = boxes.tolist(), scores.tolist()
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # Python's sort is stable
    kept = []
    for i in order:
        suppressed = False
        for j in kept:
            if groups is not None and groups[i] != groups[j]:
                continue
            a, b = boxes[j], boxes[i]
            inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            if union != 0 and inter / union > threshold:
                suppressed = True
                break
        if not suppressed:
            kept.append(i)
    return kept


def brute_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """One sample at a time, in float64, as Mask R-CNN / torchvision define RoIAlign."""
    features = features.double().numpy()
    _, channels, height, width = features.shape
    out_h, out_w = output_size
    out = np.zeros((len(rois), channels, out_h, out_w))

    def bilinear(image, y, x):
        if y < -1.0 or y > height or x < -1.0 or x > width:
            return np.zeros(channels)
        y, x = max(y, 0.0), max(x, 0.0)
        y0, x0 = int(math.floor(y)), int(math.floor(x))
        if y0 >= height - 1:
            y0 = y1 = height - 1
            y = float(y0)
        else:
            y1 = y0 + 1
        if x0 >= width - 1:
            x0 = x1 = width - 1
            x = float(x0)
        else:
            x1 = x0 + 1
        ly, lx = y - y0, x - x0
        return ((1 - ly) * (1 - lx) * image[:, y0, x0] + (1 - ly) * lx * image[:, y0, x1]
                + ly * (1 - lx) * image[:, y1, x0] + ly * lx * image[:, y1, x1])

    offset = 0.5 if aligned else 0.0
    for k, (b, x1, y1, x2, y2) in enumerate(rois.double().tolist()):
        start_x, start_y = x1 * spatial_scale - offset, y1 * spatial_scale - offset
        roi_w, roi_h = x2 * spatial_scale - offset - start_x, y2 * spatial_scale - offset - start_y
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_w, bin_h = roi_w / out_w, roi_h / out_h
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / out_h)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / out_w)
        count = max(grid_h * grid_w, 1)
        for ph in range(out_h):
            for pw in range(out_w):
                total = np.zeros(channels)
                for iy in range(grid_h):
                    y = start_y + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = start_x + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        total += bilinear(features[int(b)], y, x)
                out[k, :, ph, pw] = total / count
    return torch.from_numpy(out)


def brute_paste(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Probability of every pixel of every image, one pixel at a time, in float64. The grid's
    cells tile the box: cell (i, j) has its centre at box_start + (j + 0.5) * box_size / M."""
    masks = masks.double().numpy()
    cells_h, cells_w = masks.shape[1:]
    out = np.zeros((len(masks), height, width))

    def cell(mask, i, j):
        return mask[i, j] if 0 <= i < cells_h and 0 <= j < cells_w else 0.0

    for n, (x0, y0, x1, y1) in enumerate(boxes.double().tolist()):
        if not (x1 > x0 and y1 > y0):
            continue
        for py in range(height):
            v = (py + 0.5 - y0) / (y1 - y0) * cells_h - 0.5  # position in cell-centre units
            for px in range(width):
                u = (px + 0.5 - x0) / (x1 - x0) * cells_w - 0.5
                i, j = math.floor(v), math.floor(u)
                fv, fu = v - i, u - j
                out[n, py, px] = ((1 - fv) * (1 - fu) * cell(masks[n], i, j) + (1 - fv) * fu * cell(masks[n], i, j + 1)
                                  + fv * (1 - fu) * cell(masks[n], i + 1, j) + fv * fu * cell(masks[n], i + 1, j + 1))
    return torch.from_numpy(out)
