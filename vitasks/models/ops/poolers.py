"""Multi-level RoI pooling for feature pyramids: each box is pooled from the level matching its
size (FPN's rule, as detectron2 applies it), with :func:`roi_align`."""

import math
from typing import Sequence, Tuple, Union

import torch
from torch import nn

from .boxes import box_area
from .roi_align import BoxesArg, boxes_to_rois, roi_align


def assign_boxes_to_levels(
    boxes: torch.Tensor,
    min_level: int,
    max_level: int,
    canonical_box_size: float = 224.0,
    canonical_level: int = 4,
) -> torch.Tensor:
    """Pyramid level of each box (K, 4), counted from ``min_level`` (0 = the finest level).

    A box of ``canonical_box_size`` pixels (sqrt of its area) goes to ``canonical_level``, and
    each halving or doubling moves one level: floor(canonical_level + log2(sqrt(area) / 224)),
    clamped to [min_level, max_level].
    """
    box_sizes = torch.sqrt(box_area(boxes).clamp(min=0))
    # The epsilon keeps boxes of exactly 2^k * 224 pixels on their level despite rounding.
    levels = torch.floor(canonical_level + torch.log2(box_sizes / canonical_box_size + 1e-8))
    return (levels.clamp(min=min_level, max=max_level) - min_level).long()


class RoIPooler(nn.Module):
    """RoIAlign over a feature pyramid.

    Args:
        output_size: bins per RoI (7 for box heads, 14 for mask heads).
        strides: stride of each level passed to :meth:`forward`, finest first; consecutive powers
            of two (4, 8, 16, 32 for p2-p5).
        sampling_ratio: as in :func:`roi_align`; 0 is adaptive (detectron2's default).
        aligned: as in :func:`roi_align`; True for ViTDet.
        canonical_box_size, canonical_level: the level rule of :func:`assign_boxes_to_levels`.
    """

    def __init__(
        self,
        output_size: Union[int, Tuple[int, int]],
        strides: Sequence[int],
        sampling_ratio: int = 0,
        aligned: bool = True,
        canonical_box_size: float = 224.0,
        canonical_level: int = 4,
    ) -> None:
        super().__init__()
        levels = [math.log2(s) for s in strides]
        if not strides or any(level != round(level) for level in levels) or any(
            b - a != 1 for a, b in zip(levels, levels[1:])
        ):
            raise ValueError(
                "RoIPooler strides must be consecutive powers of two, finest first; "
                f"got {list(strides)}"
            )
        self.output_size = output_size
        self.strides = tuple(int(s) for s in strides)
        self.min_level, self.max_level = int(levels[0]), int(levels[-1])
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, strides={self.strides}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )

    def forward(self, features: Sequence[torch.Tensor], boxes: BoxesArg) -> torch.Tensor:
        """Pooled features (K, C, P, P) for the RoIs in ``boxes`` (a list of (K_i, 4) per image,
        or (K, 5) with batch indices), in their order, from ``features``: one (N, C, H_l, W_l)
        map per stride."""
        if len(features) != len(self.strides):
            raise ValueError(
                f"RoIPooler was built for {len(self.strides)} levels (strides {self.strides}), "
                f"got {len(features)} feature maps"
            )
        rois = boxes_to_rois(boxes).to(features[0].device)
        if isinstance(self.output_size, int):
            out_h = out_w = self.output_size
        else:
            out_h, out_w = self.output_size
        channels = features[0].shape[1]
        if len(features) == 1:
            return roi_align(features[0], rois, (out_h, out_w), 1.0 / self.strides[0],
                             self.sampling_ratio, self.aligned)
        levels = assign_boxes_to_levels(
            rois[:, 1:], self.min_level, self.max_level, self.canonical_box_size,
            self.canonical_level,
        )
        pooled = features[0].new_zeros((rois.shape[0], channels, out_h, out_w))
        for level, (feature, stride) in enumerate(zip(features, self.strides)):
            members = (levels == level).nonzero().squeeze(1)
            if members.numel():
                pooled = pooled.index_put(
                    (members,),
                    roi_align(feature, rois[members], (out_h, out_w), 1.0 / stride,
                              self.sampling_ratio, self.aligned),
                )
        return pooled
