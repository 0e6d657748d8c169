"""RoIAlign in plain torch, equal to ``torchvision.ops.roi_align``.

The definition (Mask R-CNN's, as torchvision and detectron2 implement it). A RoI
(x1, y1, x2, y2) is scaled by ``spatial_scale`` and, when ``aligned``, shifted by -0.5 cell: cell
i spans [i, i + 1) in box coordinates but is sampled at index i, so its centre i + 0.5 must map
to i. Without ``aligned`` the RoI's width and height are raised to at least 1 cell. The RoI is
cut into ``output_size`` bins; each bin averages ``grid_h x grid_w`` bilinear samples placed at
the centres of a regular sub-grid, where the grid is ``sampling_ratio`` per side, or, when
``sampling_ratio <= 0``, ``ceil(roi_height / output_height)`` by ``ceil(roi_width / output_width)``
(one sample per feature cell, at least). A sample further than one cell outside the feature map
contributes 0 (it still counts in the average); one within that margin is clamped onto the
border.

How it is vectorised: bilinear weights are separable, ``w(y, x) = w_y(y) * w_x(x)``, and so is the
validity test, so each RoI needs only the two neighbouring rows of each sample row and the two
neighbouring columns of each sample column. One gather (``index_select`` on a channels-last
table of the feature map) fetches those rows x columns x channels values for a step of RoIs, and
two small batched matmuls apply the row and column weights and sum the samples of each bin. RoIs
are grouped by their sampling grid (the adaptive grid differs between RoIs) and taken in steps
that bound memory. The backward runs the same steps in reverse (weights spread each bin's
gradient over its taps, ``index_add_`` puts them back into one gradient table); RoIs get no
gradient, as in torchvision.

:func:`roi_align` runs torchvision's compiled RoIAlign where :func:`kernels` chose it
(:mod:`.selection`), given the same RoIs (a list of boxes per image turned into (K, 5) the same
way), the same ``aligned`` and ``sampling_ratio`` and the same float32 (or float64) computation
under autocast; :func:`roi_align_torch` and :func:`roi_align_torchvision` are the two, for tests
and tools.
"""

from dataclasses import dataclass
from typing import List, Sequence, Tuple, Union

import torch

from ._precision import as_float, autocast_off
from .selection import kernels, torchvision_ops

# Values gathered per step (RoIs x sample rows x sample columns x channels): 1M floats = 4 MB.
# Small steps are faster, not only leaner: buffers this size are recycled by the allocator, while
# tens of megabytes come fresh from the OS each time and pay a page fault per 4 KB.
GATHER_BUDGET = 1 << 20

BoxesArg = Union[torch.Tensor, Sequence[torch.Tensor]]


def _pair(size: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def boxes_to_rois(boxes: BoxesArg) -> torch.Tensor:
    """RoIs (K, 5) as (batch_index, x1, y1, x2, y2) from either such a tensor or a list with one
    (K_i, 4) box tensor per image (image i gets batch index i)."""
    if isinstance(boxes, torch.Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(
                "RoIs must be a (K, 5) tensor of (batch_index, x1, y1, x2, y2) or a list of "
                f"(K_i, 4) box tensors, one per image; got a tensor of shape {tuple(boxes.shape)}"
            )
        return boxes
    per_image = []
    for image_index, image_boxes in enumerate(boxes):
        if image_boxes.dim() != 2 or image_boxes.shape[1] != 4:
            raise ValueError(
                f"boxes of image {image_index} must have shape (K, 4), "
                f"got {tuple(image_boxes.shape)}"
            )
        index_column = image_boxes.new_full((image_boxes.shape[0], 1), image_index)
        per_image.append(torch.cat((index_column, image_boxes), dim=1))
    if not per_image:
        return torch.zeros((0, 5))
    return torch.cat(per_image)


def _bilinear_taps(coords: torch.Tensor, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """For sample positions along one axis of length ``size``: the two neighbouring cell indices
    (..., 2) and their interpolation weights (..., 2), with torchvision's border rules."""
    valid = (coords >= -1.0) & (coords <= size)
    coords = torch.where(valid, coords, torch.zeros_like(coords)).clamp(min=0)
    low = coords.floor()
    # A sample on or past the last cell reads that cell alone.
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(coords), coords - low)
    weights = torch.stack((1 - frac, frac), dim=-1) * valid[..., None]
    indices = torch.stack((low, high), dim=-1).long()
    return indices, weights


def _sample_positions(
    start: torch.Tensor, bin_size: torch.Tensor, num_bins: int, grid: int
) -> torch.Tensor:
    """Sample coordinates (K, num_bins, grid) along one axis, in torchvision's operation order
    (start + bin * bin_size + (i + 0.5) * bin_size / grid) so they agree with it to the bit."""
    bins = torch.arange(num_bins, dtype=start.dtype, device=start.device)
    offsets = torch.arange(grid, dtype=start.dtype, device=start.device) + 0.5
    bin_starts = start[:, None, None] + bins[None, :, None] * bin_size[:, None, None]
    return bin_starts + offsets[None, None, :] * bin_size[:, None, None] / grid


@dataclass
class _Step:
    """One memory-bounded piece of work: some RoIs of one sampling grid, some output rows."""

    rois: torch.Tensor  # (k,) positions in the RoI list
    out_rows: slice  # output rows of those RoIs computed here
    batch_index: torch.Tensor  # (k,) image of each RoI
    rows: torch.Tensor  # (k, p, 2 * grid_h) feature rows read for each output row
    row_weights: torch.Tensor  # (k, p, 2 * grid_h) their weights (0 for samples off the map)
    cols: torch.Tensor  # (k, q, 2 * grid_w) feature columns read for each output column
    col_weights: torch.Tensor  # (k, q, 2 * grid_w)
    count: int  # samples per bin, grid_h * grid_w: the average's denominator

    def cells(self, height: int, width: int) -> torch.Tensor:
        """(k * p * 2 * grid_h * q * 2 * grid_w,) rows of the (N * H * W, C) feature table."""
        k = self.rows.shape[0]
        row_index = self.batch_index[:, None, None] * height + self.rows.reshape(k, -1, 1)
        return (row_index * width + self.cols.reshape(k, 1, -1)).reshape(-1)


def _plan(
    y_samples: torch.Tensor,
    x_samples: torch.Tensor,
    members: torch.Tensor,
    batch_index: torch.Tensor,
    height: int,
    width: int,
    channels: int,
) -> List[_Step]:
    """Steps for the RoIs ``members`` that share one sampling grid, with sample coordinates
    (K, p, grid_h) and (K, q, grid_w): as many RoIs per step as the gather budget allows, or, for
    RoIs with a huge grid, one RoI and a few output rows per step."""
    num_rois, out_h, grid_h = y_samples.shape
    out_w, grid_w = x_samples.shape[1:]
    rows, row_weights = (
        taps.reshape(num_rois, out_h, 2 * grid_h) for taps in _bilinear_taps(y_samples, height)
    )
    cols, col_weights = (
        taps.reshape(num_rois, out_w, 2 * grid_w) for taps in _bilinear_taps(x_samples, width)
    )
    per_output_row = (2 * grid_h) * (out_w * 2 * grid_w) * channels
    rows_per_step = max(1, min(out_h, GATHER_BUDGET // per_output_row))
    if rows_per_step == out_h:  # whole RoIs fit: take as many as the budget allows
        rois_per_step = max(1, GATHER_BUDGET // (per_output_row * out_h))
    else:  # one RoI at a time, a few output rows per step
        rois_per_step = 1
    steps = []
    for first in range(0, num_rois, rois_per_step):
        some = slice(first, first + rois_per_step)
        for first_row in range(0, out_h, rows_per_step):
            out_rows = slice(first_row, first_row + rows_per_step)
            steps.append(_Step(
                rois=members[some], out_rows=out_rows, batch_index=batch_index[some],
                rows=rows[some, out_rows], row_weights=row_weights[some, out_rows],
                cols=cols[some], col_weights=col_weights[some], count=grid_h * grid_w,
            ))
    return steps


class _RoIAlignFunction(torch.autograd.Function):
    """Bins (K, p, q, C) from a channels-last feature table (N * H * W, C), step by step.

    Forward, per step: gather the tap rows x tap columns x channels values, then two batched
    matmuls weight and sum the row taps and the column taps of each bin. Backward runs the same
    steps in reverse into one gradient table (autograd through the gather would allocate a
    full-size gradient per step)."""

    @staticmethod
    def forward(ctx, table, steps, image_size, output_shape):
        height, width = image_size
        num_rois, out_h, out_w, channels = output_shape
        bins = table.new_zeros(output_shape)
        for step in steps:
            k, p, taps_h = step.rows.shape
            taps_w = step.cols.shape[2]
            values = table.index_select(0, step.cells(height, width))  # contiguous channel rows
            values = values.reshape(k, p, taps_h, out_w * taps_w * channels)
            values = torch.matmul(step.row_weights.reshape(k, p, 1, taps_h), values)
            values = values.reshape(k, p, out_w, taps_w, channels)
            values = torch.matmul(step.col_weights.reshape(k, 1, out_w, 1, taps_w), values)
            bins[step.rois, step.out_rows] = values.reshape(k, p, out_w, channels) / step.count
        ctx.steps, ctx.image_size, ctx.table_shape = steps, image_size, table.shape
        return bins

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_bins):
        height, width = ctx.image_size
        channels = ctx.table_shape[1]
        grad_table = grad_bins.new_zeros(ctx.table_shape)
        for step in ctx.steps:
            k, p, taps_h = step.rows.shape
            out_w, taps_w = step.cols.shape[1:]
            grad = grad_bins[step.rois, step.out_rows] / step.count  # (k, p, q, C)
            # Spread each bin's gradient over its column taps, then over its row taps.
            grad = step.col_weights.reshape(k, 1, out_w, taps_w, 1) * grad[..., None, :]
            grad = step.row_weights.reshape(k, p, taps_h, 1) * grad.reshape(k, p, 1, -1)
            grad_table.index_add_(0, step.cells(height, width), grad.reshape(-1, channels))
        return grad_table, None, None, None


def roi_align(
    input: torch.Tensor,
    boxes: BoxesArg,
    output_size: Union[int, Tuple[int, int]],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> torch.Tensor:
    """RoIAlign; same arguments and result as ``torchvision.ops.roi_align`` (and run by it where
    :func:`kernels` is ``"torchvision"``).

    Args:
        input: feature maps (N, C, H, W).
        boxes: RoIs (K, 5) as (batch_index, x1, y1, x2, y2) in image coordinates, or a list of
            (K_i, 4) box tensors, one per image.
        output_size: bins per RoI, ``int`` or ``(height, width)``.
        spatial_scale: feature-map cells per image pixel (1 / stride).
        sampling_ratio: samples per bin side; ``<= 0`` picks ceil(roi size / output size) per RoI.
        aligned: shift boxes by -0.5 cell so that samples fall on pixel centres (detectron2's and
            ViTDet's choice); ``False`` is the original Mask R-CNN definition.

    Returns:
        (K, C, output_height, output_width) in the dtype of ``input`` (computed in float32, or
        float64 for float64 input, also under autocast).
    """
    if kernels() == "torchvision":
        return roi_align_torchvision(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    return roi_align_torch(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)


def _roi_align(bins_of, input: torch.Tensor, boxes: BoxesArg, output_size, spatial_scale: float = 1.0,
               sampling_ratio: int = -1, aligned: bool = False) -> torch.Tensor:
    """:func:`roi_align` with ``bins_of(features, rois, out_h, out_w, spatial_scale, sampling_ratio,
    aligned)`` computing the (K, C, out_h, out_w) bins of a non-empty input, rois in the
    features' dtype."""
    if input.dim() != 4:
        raise ValueError(f"roi_align expects features (N, C, H, W), got shape {tuple(input.shape)}")
    out_h, out_w = _pair(output_size)
    rois = boxes_to_rois(boxes).to(input.device)
    if rois.shape[0] == 0 or input.shape[2] == 0 or input.shape[3] == 0:
        return input.new_zeros((rois.shape[0], input.shape[1], out_h, out_w))
    with autocast_off(input.device.type):
        features = as_float(input)
        bins = bins_of(features, rois.detach().to(features.dtype), out_h, out_w, float(spatial_scale),
                       int(sampling_ratio), bool(aligned))
    return bins.to(input.dtype)


def roi_align_torchvision(*args, **kwargs) -> torch.Tensor:
    """:func:`roi_align` (same arguments) on torchvision's kernel, whatever :func:`kernels` chose
    (needs torchvision)."""
    return _roi_align(_torchvision_bins, *args, **kwargs)


def roi_align_torch(*args, **kwargs) -> torch.Tensor:
    """:func:`roi_align` (same arguments) in plain torch, whatever :func:`kernels` chose."""
    return _roi_align(_torch_bins, *args, **kwargs)


def _torchvision_bins(features, rois, out_h, out_w, spatial_scale, sampling_ratio, aligned) -> torch.Tensor:
    return torchvision_ops().roi_align(features, rois, (out_h, out_w), spatial_scale, sampling_ratio, aligned)


def _torch_bins(features, rois, out_h, out_w, spatial_scale, sampling_ratio, aligned) -> torch.Tensor:
    num_rois = rois.shape[0]
    channels, height, width = features.shape[1:]
    offset = 0.5 if aligned else 0.0
    start_x = rois[:, 1] * spatial_scale - offset
    start_y = rois[:, 2] * spatial_scale - offset
    roi_w = (rois[:, 3] * spatial_scale - offset) - start_x
    roi_h = (rois[:, 4] * spatial_scale - offset) - start_y
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / out_w, roi_h / out_h
    if sampling_ratio > 0:
        grids = torch.full((num_rois, 2), sampling_ratio, dtype=torch.long, device=rois.device)
    else:
        grids = torch.stack((torch.ceil(roi_h / out_h), torch.ceil(roi_w / out_w)), dim=1)
        grids = torch.nan_to_num(grids, nan=0.0, posinf=0.0, neginf=0.0).long()
    batch_index = rois[:, 0].long()

    group_grids, group_of_roi = torch.unique(grids, dim=0, return_inverse=True)
    steps: List[_Step] = []
    for group, (grid_h, grid_w) in enumerate(group_grids.tolist()):
        if grid_h <= 0 or grid_w <= 0:
            # An empty sampling grid (an inverted RoI with adaptive sampling) averages
            # nothing: its bins stay 0.
            continue
        members = (group_of_roi == group).nonzero().squeeze(1)
        y_samples = _sample_positions(start_y[members], bin_h[members], out_h, grid_h)
        x_samples = _sample_positions(start_x[members], bin_w[members], out_w, grid_w)
        steps += _plan(y_samples, x_samples, members, batch_index[members], height, width,
                       channels)
    # Channels-last, one row per feature cell: the gather reads whole channel vectors.
    table = features.permute(0, 2, 3, 1).reshape(-1, channels)
    bins = _RoIAlignFunction.apply(
        table, steps, (height, width), (num_rois, out_h, out_w, channels)
    )
    return bins.permute(0, 3, 1, 2).contiguous()
