"""Anchor boxes for the RPN, laid out as detectron2's ``DefaultAnchorGenerator`` lays them out.

On a feature level of stride s and size (H, W), every cell (i, j) holds the level's cell anchors
(one per size and aspect ratio, centred on 0) shifted to ``((j + offset) * s, (i + offset) * s)``.
ViTDet's RPN uses one size per level, 32, 64, 128, 256, 512 on p2-p6 (strides 4-64), aspect ratios
(height / width) 0.5, 1 and 2, and offset 0, so the anchors of a level are centred on the top-left
corner of each of its cells.
"""

import math
from typing import List, Sequence, Tuple, Union

import torch
from torch import nn

SizesArg = Sequence[Union[float, Sequence[float]]]


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> torch.Tensor:
    """Anchors (len(sizes) * len(aspect_ratios), 4) centred on (0, 0), size-major: for each size
    s and ratio r = height / width, the box of area s^2 with w = sqrt(s^2 / r), h = r * w."""
    anchors = []
    for size in sizes:
        area = float(size) ** 2
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            anchors.append((-w / 2, -h / 2, w / 2, h / 2))
    return torch.tensor(anchors, dtype=torch.float32)


class AnchorGenerator(nn.Module):
    """Anchors for every cell of every feature level.

    Args:
        sizes: per level, its anchor sizes (sqrt of the area, in image pixels); a plain number
            is one size for that level.
        aspect_ratios: height / width ratios, used on every level.
        strides: per level, its stride in image pixels.
        offset: where in a cell the anchors are centred, as a fraction of the stride (0: the
            cell's top-left corner, 0.5: its centre).
    """

    def __init__(
        self,
        sizes: SizesArg = (32, 64, 128, 256, 512),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        strides: Sequence[int] = (4, 8, 16, 32, 64),
        offset: float = 0.0,
    ) -> None:
        super().__init__()
        level_sizes = [tuple(s) if isinstance(s, (list, tuple)) else (s,) for s in sizes]
        if len(level_sizes) != len(strides):
            raise ValueError(
                f"AnchorGenerator needs one entry of sizes per stride: {len(level_sizes)} sizes, "
                f"{len(strides)} strides"
            )
        if not 0.0 <= offset < 1.0:
            raise ValueError(f"AnchorGenerator offset must be in [0, 1), got {offset}")
        self.strides = tuple(int(s) for s in strides)
        self.offset = float(offset)
        self.num_levels = len(self.strides)
        for level, level_size in enumerate(level_sizes):
            # Non-persistent: follow the module's device, stay out of checkpoints.
            self.register_buffer(
                f"cell_anchors_{level}", cell_anchors(level_size, aspect_ratios), persistent=False
            )

    @property
    def num_anchors_per_location(self) -> List[int]:
        """Anchors per cell on each level (the RPN head predicts this many per position)."""
        return [self.level_cell_anchors(level).shape[0] for level in range(self.num_levels)]

    def level_cell_anchors(self, level: int) -> torch.Tensor:
        return getattr(self, f"cell_anchors_{level}")

    def grid_anchors(self, grid_sizes: Sequence[Tuple[int, int]]) -> List[torch.Tensor]:
        """Per level, anchors (H * W * A, 4) in (x1, y1, x2, y2) image pixels, ordered by row,
        then column, then cell anchor (the order of a (A, H, W) prediction map permuted to
        (H, W, A))."""
        if len(grid_sizes) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature levels, got {len(grid_sizes)}")
        anchors = []
        for level, (height, width) in enumerate(grid_sizes):
            base = self.level_cell_anchors(level)
            stride = self.strides[level]
            columns = torch.arange(width, device=base.device, dtype=base.dtype)
            rows = torch.arange(height, device=base.device, dtype=base.dtype)
            shift_x = (columns + self.offset) * stride
            shift_y = (rows + self.offset) * stride
            shift_y, shift_x = torch.meshgrid(shift_y, shift_x, indexing="ij")
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).reshape(-1, 1, 4)
            anchors.append((shifts + base[None]).reshape(-1, 4))
        return anchors

    def forward(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Anchors for feature maps (N, C, H_l, W_l), one tensor per level (shared by the images
        of the batch)."""
        return self.grid_anchors([tuple(f.shape[-2:]) for f in features])
