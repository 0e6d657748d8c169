"""Losses shared by the task heads.

One cross-entropy serves classification (hard labels or the soft targets that Mixup/CutMix
produce) and dense prediction (a label per pixel, with an ignore index).
"""

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitasks.errors import ConfigError
from vitasks.registry import MODELS


@MODELS.register_module()
class CrossEntropyLoss(nn.Module):
    """Softmax cross-entropy for hard, soft and dense targets.

    Target forms, for logits of shape ``(N, K, ...)``:

    - hard labels, ``(N,)`` for ``(N, K)`` logits or ``(N, H, W)`` for ``(N, K, H, W)`` logits:
      integer class indices; entries equal to ``ignore_index`` contribute nothing. For
      per-image labels ``(N,)`` the ignore index applies only when it is not a class index
      (``0 <= ignore_index < K`` is a real class, e.g. ImageNet's class 255);
    - soft targets, a float tensor of the logits' shape (``(N, K)`` from Mixup/CutMix): the loss
      of a sample is ``-sum_k t_k log p_k``.

    ``label_smoothing`` mixes the target with the uniform distribution:
    ``t' = (1 - eps) t + eps / K`` (PyTorch's definition), for hard and soft targets alike.
    ``class_weight`` scales each class's term (PyTorch's ``weight``: for hard labels a sample is
    scaled by the weight of its class).

    Reduction: the sum of the per-element losses divided by the number of elements, ignored
    ones included (``avg_non_ignore=False``, mmseg's default and the BEiT/MAE ADE20K recipe);
    with ``avg_non_ignore=True`` by the number of non-ignored elements only (the mean over
    labelled pixels). The two differ only when labels are ignored. An explicit ``avg_factor``
    replaces the divisor.

    Args:
        loss_weight: Multiplies the loss.
        label_smoothing: Smoothing factor ``eps`` in [0, 1).
        class_weight: Optional per-class weights (K values).
        ignore_index: Hard-label value to ignore (255 for segmentation maps).
        avg_non_ignore: Divide by the non-ignored elements only (default: by all elements).
    """

    def __init__(
        self,
        loss_weight: float = 1.0,
        label_smoothing: float = 0.0,
        class_weight: Optional[Sequence[float]] = None,
        ignore_index: int = 255,
        avg_non_ignore: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(
                f"CrossEntropyLoss: label_smoothing must be in [0, 1), got {label_smoothing}"
            )
        self.loss_weight = float(loss_weight)
        self.label_smoothing = float(label_smoothing)
        self.ignore_index = int(ignore_index)
        self.avg_non_ignore = bool(avg_non_ignore)
        if class_weight is not None:
            # A buffer so that it follows the module to the logits' device; not saved in
            # checkpoints because it comes from the config.
            self.register_buffer(
                "class_weight", torch.as_tensor(class_weight, dtype=torch.float32), persistent=False
            )
        else:
            self.class_weight = None

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        weight: Optional[torch.Tensor] = None,
        avg_factor: Optional[float] = None,
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            pred: Logits ``(N, K)`` or ``(N, K, H, W)``.
            target: Hard labels (shape of ``pred`` without dim 1) or soft targets (shape of
                ``pred``, floating point).
            weight: Optional per-element weights, shape of the per-element loss (``(N,)`` or
                ``(N, H, W)``).
            avg_factor: Optional divisor replacing the default one.

        Returns:
            A scalar tensor.
        """
        class_weight = None
        if self.class_weight is not None:
            if self.class_weight.numel() != pred.shape[1]:
                raise ConfigError(
                    f"CrossEntropyLoss: class_weight has {self.class_weight.numel()} values but "
                    f"the logits have {pred.shape[1]} classes"
                )
            class_weight = self.class_weight.to(device=pred.device, dtype=pred.dtype)

        soft = target.shape == pred.shape and target.is_floating_point()
        if soft:
            # Soft targets: no element is ignored.
            loss = F.cross_entropy(
                pred,
                target.to(pred.dtype),
                weight=class_weight,
                reduction="none",
                label_smoothing=self.label_smoothing,
            )
            num_valid = loss.numel()
        else:
            if target.shape != pred.shape[:1] + pred.shape[2:]:
                raise ValueError(
                    f"CrossEntropyLoss: hard labels of shape {tuple(target.shape)} do not fit "
                    f"logits of shape {tuple(pred.shape)} (expected {tuple(pred.shape[:1] + pred.shape[2:])})"
                )
            target = target.long()
            ignore_index = self.ignore_index
            if pred.dim() == 2 and 0 <= ignore_index < pred.shape[1]:
                ignore_index = -100  # a real class of a per-image label: ignore nothing
            loss = F.cross_entropy(
                pred,
                target,
                weight=class_weight,
                reduction="none",
                ignore_index=ignore_index,
                label_smoothing=self.label_smoothing,
            )
            # F.cross_entropy already gives 0 at ignored positions; count the rest.
            num_valid = int((target != ignore_index).sum())

        if weight is not None:
            loss = loss * weight.to(loss.dtype)
        if avg_factor is None:
            avg_factor = num_valid if self.avg_non_ignore else loss.numel()
        # max(., 1): a batch with every element ignored gives a zero loss (with a gradient path).
        return self.loss_weight * loss.sum() / max(float(avg_factor), 1.0)

    def extra_repr(self) -> str:
        return (
            f"loss_weight={self.loss_weight}, label_smoothing={self.label_smoothing}, "
            f"ignore_index={self.ignore_index}, avg_non_ignore={self.avg_non_ignore}"
        )
