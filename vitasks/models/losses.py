"""Losses shared by the task heads.

One cross-entropy serves classification (hard labels or the soft targets that Mixup/CutMix
produce) and dense prediction (a label per pixel, with an ignore index).
"""

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitasks.checks import InRange, checked, config_key
from vitasks.errors import ConfigError
from vitasks.registry import MODELS


def balanced_class_weight(labels: torch.Tensor, num_classes: int, ignore_index: int,
                          max_ratio: float = 10.0) -> torch.Tensor:
    """``sqrt(min(n / (P n_k), max_ratio))`` per class from a batch of hard labels (``n``
    labelled elements, ``P`` classes present, ``n_k`` elements of class ``k``); 1 for absent
    classes (they have no element to weigh)."""
    valid = labels[labels != ignore_index].long()
    counts = torch.bincount(valid.flatten(), minlength=num_classes)[:num_classes].float()
    present = counts > 0
    if not present.any():
        return torch.ones(num_classes, device=labels.device)
    ratio = valid.numel() / (present.sum() * counts.clamp(min=1))
    return torch.where(present, ratio.clamp(max=max_ratio).sqrt(), torch.ones_like(ratio))


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
        class_weight: Optional per-class weights (K values), or ``"balanced"``: for dense hard
            labels, weights from the batch's own label counts, ``w_k = sqrt(min(n / (P n_k),
            10))`` with ``n`` labelled pixels, ``P`` classes present and ``n_k`` pixels of class
            ``k`` (1 when all present classes are equally common; rare classes up to 3.2x), so
            that a recipe keeps working whatever ``num_classes`` it is retargeted to.
        ignore_index: Hard-label value to ignore (255 for segmentation maps).
        avg_non_ignore: Divide by the non-ignored elements only (default: by all elements).
    """

    config_key = "model.head.loss"

    @checked
    def __init__(
        self,
        loss_weight: float = 1.0,
        label_smoothing: InRange(0, 1, high_open=True) = 0.0,
        class_weight: Optional[Sequence[float] | str] = None,
        ignore_index: int = 255,
        avg_non_ignore: bool = False,
    ) -> None:
        super().__init__()
        self.config_path = config_key(default=self.config_key)  # for errors at run time too
        self.loss_weight = float(loss_weight)
        self.label_smoothing = float(label_smoothing)
        self.ignore_index = int(ignore_index)
        self.avg_non_ignore = bool(avg_non_ignore)
        self.balanced = isinstance(class_weight, str)
        if self.balanced:
            if class_weight != "balanced":
                raise ConfigError(
                    f"{self.config_path}.class_weight must be a list of K numbers or 'balanced', got {class_weight!r}"
                )
            class_weight = None
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
                    f"{self.config_path}.class_weight has {self.class_weight.numel()} values but "
                    f"the logits have {pred.shape[1]} classes"
                )
            class_weight = self.class_weight.to(device=pred.device, dtype=pred.dtype)
        elif self.balanced and pred.dim() > 2 and not target.is_floating_point():
            class_weight = balanced_class_weight(target, pred.shape[1], self.ignore_index).to(pred.dtype)

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
            + (", class_weight='balanced'" if self.balanced else "")
        )


@MODELS.register_module()
class DiceLoss(nn.Module):
    """Soft Dice loss over classes for dense prediction (V-Net's squared form, as mmseg 0.x's
    softmax ``DiceLoss``), the usual companion of cross-entropy when a few classes cover most
    pixels: each class counts the same, whatever its area.

    With ``p`` the softmax of the logits and ``t`` the one-hot labels, summed over the labelled
    pixels of the whole batch (pixels equal to ``ignore_index`` are left out)::

        dice_k = (2 sum p_k t_k + smooth) / (sum p_k^e + sum t_k^e + smooth)
        loss   = loss_weight * mean_k (1 - dice_k)

    A class absent from the batch still counts: its term pushes its predicted probability
    towards 0.

    Args:
        loss_weight: Multiplies the loss.
        smooth: Added to numerator and denominator (keeps empty classes finite).
        exponent: ``e`` in the denominator (2: V-Net, mmseg's default).
        ignore_index: Label value of unlabelled pixels.
    """

    config_key = "model.decode_head.loss_decode"

    @checked
    def __init__(self, loss_weight: float = 1.0, smooth: InRange(0) = 1.0, exponent: InRange(0, low_open=True) = 2.0,
                 ignore_index: int = 255) -> None:
        super().__init__()
        self.loss_weight = float(loss_weight)
        self.smooth = float(smooth)
        self.exponent = float(exponent)
        self.ignore_index = int(ignore_index)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``pred``: logits ``(N, K, H, W)``; ``target``: labels ``(N, H, W)``; a scalar."""
        if pred.dim() != 4 or target.shape != pred.shape[:1] + pred.shape[2:]:
            raise ValueError(
                f"DiceLoss: needs logits (N, K, H, W) and labels (N, H, W), got {tuple(pred.shape)} "
                f"and {tuple(target.shape)}"
            )
        num_classes = pred.shape[1]
        valid = (target != self.ignore_index).unsqueeze(1).to(pred.dtype)
        prob = pred.softmax(dim=1) * valid
        # Ignored pixels get class 0 here, then are zeroed by `valid`.
        onehot = F.one_hot(torch.where(target == self.ignore_index, 0, target).long(), num_classes)
        onehot = onehot.permute(0, 3, 1, 2).to(pred.dtype) * valid
        dims = (0, 2, 3)
        intersection = (prob * onehot).sum(dims)
        denominator = prob.pow(self.exponent).sum(dims) + onehot.pow(self.exponent).sum(dims)
        dice = (2 * intersection + self.smooth) / (denominator + self.smooth)
        return self.loss_weight * (1 - dice).mean()
