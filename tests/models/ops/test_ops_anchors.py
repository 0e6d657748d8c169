"""Anchors: the cell anchors' sizes and ratios, and their layout over the image (centres on every
cell's corner, level by level, in (row, column, anchor) order)."""

import math

import pytest
import torch

from vitasks.models.ops import AnchorGenerator, cell_anchors

# CI's second leg runs these too: on torchvision's kernels there (.ci/run).
pytestmark = pytest.mark.torch_leg


def test_cell_anchors_sizes_and_ratios():
    anchors = cell_anchors((32, 64), (0.5, 1.0, 2.0))
    assert anchors.shape == (6, 4)
    widths, heights = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    # Size-major order: (32, 0.5), (32, 1), (32, 2), (64, 0.5), ...
    torch.testing.assert_close(widths * heights, torch.tensor([32.0**2] * 3 + [64.0**2] * 3))
    torch.testing.assert_close(heights / widths, torch.tensor([0.5, 1.0, 2.0] * 2))
    torch.testing.assert_close(anchors[:, :2], -anchors[:, 2:])  # centred on (0, 0)
    w = math.sqrt(32**2 / 0.5)  # 45.25: the wide anchor of size 32
    torch.testing.assert_close(anchors[0], torch.tensor([-w / 2, -w / 4, w / 2, w / 4]))
    torch.testing.assert_close(anchors[1], torch.tensor([-16.0, -16.0, 16.0, 16.0]))


def test_vitdet_anchors_cover_a_1024_image_level_by_level():
    generator = AnchorGenerator()  # sizes 32..512 on strides 4..64, ratios 0.5/1/2, offset 0
    assert generator.num_anchors_per_location == [3] * 5
    assert generator.state_dict() == {}  # derived from the arguments, not saved
    strides, sizes = (4, 8, 16, 32, 64), (32, 64, 128, 256, 512)
    features = [torch.zeros(1, 2, 1024 // s, 1024 // s) for s in strides]
    anchors = generator(features)
    for level_anchors, stride, size in zip(anchors, strides, sizes):
        cells = 1024 // stride
        assert level_anchors.shape == (cells * cells * 3, 4)
        grid = level_anchors.reshape(cells, cells, 3, 4)
        centres = (grid[..., :2] + grid[..., 2:]) / 2
        # Anchor (row i, column j, k) is centred on the corner (j * stride, i * stride) of its cell.
        expected_x = torch.arange(cells).float()[None, :, None] * stride
        expected_y = torch.arange(cells).float()[:, None, None] * stride
        torch.testing.assert_close(centres[..., 0], expected_x.expand(cells, cells, 3))
        torch.testing.assert_close(centres[..., 1], expected_y.expand(cells, cells, 3))
        # The centres span the image from 0 to 1024 - stride in steps of the stride.
        assert centres[..., 0].min() == 0 and centres[..., 0].max() == 1024 - stride
        # The square anchor of each cell is size x size, 8 strides wide.
        torch.testing.assert_close(grid[5, 7, 1], torch.tensor([7.0 * stride - size / 2, 5.0 * stride - size / 2,
                                                                  7.0 * stride + size / 2, 5.0 * stride + size / 2]))
    # Every image pixel is inside some square anchor of the finest level.
    finest = anchors[0].reshape(-1, 3, 4)[:, 1]
    assert finest[:, :2].min() <= 0 and finest[:, 2:].max() >= 1024
    assert (finest[1:, 0] - finest[:-1, 0]).clamp(min=0).max() <= 32  # no gaps along a row


def test_anchor_order_matches_a_flattened_prediction_map_and_offset():
    generator = AnchorGenerator(sizes=((16, 24),), aspect_ratios=(1.0, 2.0), strides=(8,), offset=0.5)
    assert generator.num_anchors_per_location == [4]
    (anchors,) = generator.grid_anchors([(3, 5)])
    base = cell_anchors((16, 24), (1.0, 2.0))
    # A head's (A, H, W) map is read as (H, W, A): index (i * W + j) * A + k.
    for i in range(3):
        for j in range(5):
            for k in range(4):
                shift = torch.tensor([(j + 0.5) * 8, (i + 0.5) * 8] * 2)
                torch.testing.assert_close(anchors[(i * 5 + j) * 4 + k], base[k] + shift)


def test_anchor_generator_argument_errors():
    with pytest.raises(ValueError, match="one entry of sizes per stride"):
        AnchorGenerator(sizes=(32, 64), strides=(4, 8, 16))
    with pytest.raises(ValueError, match="expected 5 feature levels"):
        AnchorGenerator().grid_anchors([(4, 4)])
