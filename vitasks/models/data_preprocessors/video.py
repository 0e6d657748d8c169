"""Video data preprocessor: stack the clips, fold the views into the batch, cast and normalise;
in training optionally erase rectangles (timm's RandomErasing, one draw per clip) and mix clips
(Mixup / CutMix).

The dataloader hands over uint8 clips ``(3, T, H, W)`` or, at test time, views ``(V, 3, T, H, W)``
(``V = clips x crops``, from :class:`~vitasks.data.video_transforms.PackVideoInputs`). The model
gets ``(N x V, 3, T, H, W)`` floats, view ``v`` of sample ``n`` at row ``n x V + v``, and each data
sample records ``num_views = V``, so a recognizer can average its ``V`` scores back to one.
"""

from typing import List, Optional, Union

import torch
from mmengine.model import BaseDataPreprocessor

from vitasks.checks import InRange, ListOf, checked, config_key
from vitasks.registry import MODELS

from .batch_augments import build_batch_augments, build_random_erasing, mix_batch
from .normalization import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["VideoDataPreprocessor"]


@MODELS.register_module()
class VideoDataPreprocessor(BaseDataPreprocessor):
    """Stacks uint8 clips, folds views into the batch, normalises; batch augments in training.

    Args:
        mean: Per-channel mean in 0-255 RGB (ImageNet's by default; 127.5 for VideoMAE-style
            [-1, 1] inputs).
        std: Per-channel std in 0-255.
        num_classes: Number of classes; needed to turn labels into soft targets when
            ``batch_augments`` is set.
        batch_augments: ``{augments: [{type: Mixup, alpha: 0.8}, {type: CutMix, alpha: 1.0}],
            probs: [0.5, 0.5]}``: one drawn per batch, applied to whole clips (CutMix cuts the
            same box out of every frame); ``None`` for none.
        non_blocking: Non-blocking host-to-device copies.
        random_erasing: timm's RandomErasing in training after normalisation, one draw per clip
            (the same rectangles on every frame, as VideoMAE: ``{type: RandomErasing,
            probability: 0.25, mode: pixel}``); ``None`` for none.
    """

    config_key = "model.data_preprocessor"

    @checked
    def __init__(
        self,
        mean: ListOf(InRange(), length=3) = IMAGENET_MEAN,
        std: ListOf(InRange(0, low_open=True), length=3) = IMAGENET_STD,
        num_classes: Optional[int] = None,
        batch_augments: Optional[dict] = None,
        non_blocking: bool = False,
        random_erasing: Optional[dict] = None,
    ) -> None:
        super().__init__(non_blocking=non_blocking)
        where = self.config_path = config_key(default=self.config_key)  # for errors at run time too
        self.random_erasing = build_random_erasing(random_erasing, where)
        # (3, 1, 1, 1): broadcast over (N, 3, T, H, W).
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1, 1), False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1, 1), False)
        self.num_classes = num_classes
        self.batch_augments = build_batch_augments(batch_augments, num_classes, where)

    @staticmethod
    def stack_views(inputs: Union[torch.Tensor, List[torch.Tensor]]) -> torch.Tensor:
        """A batch as ``(N, V, 3, T, H, W)`` from a list of ``(3, T, H, W)`` or ``(V, 3, T, H,
        W)`` clips, or from a tensor ``(N, 3, T, H, W)`` / ``(N, V, 3, T, H, W)``."""
        if isinstance(inputs, torch.Tensor):
            batch = inputs
            if batch.dim() == 5:
                batch = batch.unsqueeze(1)
        else:
            if not inputs:
                raise ValueError("VideoDataPreprocessor: the batch is empty")
            shapes = {tuple(x.shape) for x in inputs}
            if len(shapes) > 1:
                raise ValueError(
                    "VideoDataPreprocessor: the clips of a batch differ in shape "
                    f"{sorted(shapes)}; every sample needs the same views, frames and size"
                )
            batch = torch.stack(list(inputs))
            if batch.dim() == 5:
                batch = batch.unsqueeze(1)
        if batch.dim() != 6 or batch.shape[2] != 3:
            raise ValueError(
                "VideoDataPreprocessor: expected clips (3, T, H, W) or views (V, 3, T, H, W), "
                f"got a batch of shape {tuple(batch.shape)}"
            )
        return batch

    def forward(self, data: dict, training: bool = False) -> dict:
        data = self.cast_data(data)
        batch = self.stack_views(data["inputs"])  # (N, V, 3, T, H, W), uint8 or float
        num_samples, num_views = batch.shape[:2]
        batch = (batch.float() - self.mean) / self.std
        samples = data.get("data_samples")
        if samples:
            if len(samples) != num_samples:
                raise ValueError(f"VideoDataPreprocessor: {num_samples} clips but {len(samples)} data samples")
            for sample in samples:
                sample.set_metainfo({"num_views": num_views})
        if training and self.random_erasing is not None:
            # Every view of every sample is a clip (N x V, 3, T, H, W) with a draw of its own.
            batch = self.random_erasing(batch.flatten(0, 1)).view(batch.shape)
        if training and self.batch_augments is not None and samples:
            # all views of a sample move together
            batch = mix_batch(self.batch_augments, batch, samples, self.num_classes, self.config_path)
        data["inputs"] = batch.flatten(0, 1)
        return data
