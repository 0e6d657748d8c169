"""Encoder-decoder semantic segmentor: backbone (+ neck) + decode head (+ auxiliary heads).

Inference (``model.test_cfg``):

- ``{mode: whole}``: the image at once;
- ``{mode: slide, crop_size: [512, 512], stride: [341, 341], windows_per_batch: 8}``:
  overlapping windows (the last row/column aligned to the image's edge), run through the model
  ``windows_per_batch`` at a time; per-pixel logits are summed and divided by how many windows
  covered the pixel;
- ``tta: {ratios: [0.5, 0.75, 1.0, 1.25, 1.5, 1.75], flip: true}`` on top of either: the input
  is resized by each ratio (and mirrored), logits are mirrored back, resized to the original
  image size and averaged (``merge: logits``, default; ``merge: probs`` averages softmax scores
  as mmseg's TTA does).

Predictions are cut to the unpadded input, resized (bilinear, on logits) to the image's
``ori_shape`` and arg-maxed, so they are scored against labels at their original size.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.nn as nn

from vitasks.checks import InRange, IntPair, ListOf, OneOf, OrNone, PositiveInt, building, checked, config_key, options
from vitasks.errors import ConfigError
from vitasks.models.heads.decode_head import resize
from vitasks.models.tasks.base import TaskModel
from vitasks.registry import MODELS
from vitasks.structures import DataSample, PixelData

class SegTTA:
    """Checked ``model.test_cfg.tta``: resize ``ratios``, ``flip`` and how passes ``merge``."""

    config_key = "model.test_cfg.tta"

    @checked
    def __init__(self, ratios: ListOf(InRange(0, low_open=True)) = (1.0,), flip: bool = False,
                 merge: OneOf("logits", "probs") = "logits") -> None:
        self.ratios, self.flip, self.merge = [float(r) for r in ratios], bool(flip), merge


def _check_slide(where: str, crop_size, stride) -> None:
    if crop_size is None or stride is None:
        raise ConfigError(f"{where}: mode 'slide' needs crop_size and stride, e.g. "
                          "crop_size: [512, 512], stride: [341, 341]")


class SegTestConfig:
    """Checked ``model.test_cfg`` of :class:`EncoderDecoder` (see the module docstring)."""

    config_key = "model.test_cfg"

    @checked
    def __init__(self, mode: str = "whole", crop_size: OrNone(IntPair) = None, stride: OrNone(IntPair) = None,
                 windows_per_batch: PositiveInt = 8, size_divisor: OrNone(PositiveInt) = None,
                 tta: dict | None = None) -> None:
        where = self.config_path = config_key(default=self.config_key)
        if mode not in ("whole", "slide"):
            raise ConfigError(f"{where}.mode must be 'whole' or 'slide', got {mode!r}")
        if mode == "slide":
            _check_slide(where, crop_size, stride)
        self.mode, self.windows_per_batch, self.size_divisor = mode, windows_per_batch, size_divisor
        self.crop_size, self.stride = (crop_size, stride) if mode == "slide" else (None, None)
        tta = options({} if tta is None else tta, f"{where}.tta", ["ratios", "flip", "merge"])
        with building("tta", root=where):
            tta = SegTTA(**tta)
        self.ratios, self.flip, self.merge = tta.ratios, tta.flip, tta.merge

    @classmethod
    def from_config(cls, cfg: dict | None) -> SegTestConfig:
        known = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
        with building("test_cfg", root="model"):
            return cls(**options(cfg or {}, config_key(), known))


def slide_windows(
    height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """Windows ``(y0, y1, x0, x1)`` covering an image: a grid of ``stride`` steps whose last
    row/column is moved back to end at the image's edge; windows are ``min(crop, image)`` big."""
    (crop_h, crop_w), (stride_h, stride_w) = crop, stride
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * stride_h + crop_h, height), min(c * stride_w + crop_w, width)
            y0, x0 = max(y1 - crop_h, 0), max(x1 - crop_w, 0)
            boxes.append((y0, y1, x0, x1))
    return boxes


@MODELS.register_module()
class EncoderDecoder(TaskModel):
    """Semantic segmentor following mmengine's BaseModel protocol.

    ``forward(inputs, data_samples, mode)``:

    - ``"tensor"``: the decode head's raw logits ``(N, K, h, w)`` (at the head's stride);
    - ``"loss"``: ``decode.loss_ce``, ``decode.acc_seg`` and ``aux.loss_ce`` (``aux_{i}.`` for a
      list of auxiliary heads);
    - ``"predict"``: the samples with ``seg_logits`` (PixelData ``(K, H, W)``) and
      ``pred_sem_seg`` (PixelData ``(1, H, W)``) at the original image size.

    Args:
        backbone: backbone config (``VisionTransformer`` with ``out_indices``).
        decode_head: decode head config (``UPerHead``, ``SETRPUPHead``, ``SegmenterMaskHead``...).
        neck: optional neck config (``Feature2Pyramid``).
        auxiliary_head: optional auxiliary head config or list of configs (training only).
        train_cfg: accepted for mmseg compatibility; nothing is read from it.
        test_cfg: inference settings, see the module docstring.
        data_preprocessor: default ``SegDataPreprocessor()``.
        init_cfg: mmengine initialisation config.
    """

    default_preprocessor = dict(type="SegDataPreprocessor")

    def __init__(
        self,
        backbone: dict,
        decode_head: dict,
        neck: dict | None = None,
        auxiliary_head: dict | Sequence[dict] | None = None,
        train_cfg: dict | None = None,
        test_cfg: dict | None = None,
        data_preprocessor: dict | nn.Module | None = None,
        init_cfg: dict | None = None,
    ) -> None:
        super().__init__(backbone, neck=neck, data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.decode_head = self.build_part(decode_head, "decode_head")
        self.num_classes = self.decode_head.num_classes
        if auxiliary_head is None:
            self.auxiliary_head = None
        elif isinstance(auxiliary_head, (list, tuple)):
            self.auxiliary_head = nn.ModuleList(self.build_part(h, f"auxiliary_head[{i}]") for i, h in enumerate(auxiliary_head))
        else:
            self.auxiliary_head = self.build_part(auxiliary_head, "auxiliary_head")
        heads = [self.decode_head] + (list(self.auxiliary_head) if isinstance(self.auxiliary_head, nn.ModuleList)
                                      else [self.auxiliary_head] if self.auxiliary_head is not None else [])
        for head in heads[1:]:
            if head.num_classes != self.num_classes:
                raise ConfigError(
                    f"{getattr(head, 'config_path', 'model.auxiliary_head')}: num_classes={head.num_classes} but "
                    f"the decode head has {self.num_classes}; use ${{num_classes}} for both"
                )
        self.train_cfg = dict(train_cfg or {})
        self.test_cfg = SegTestConfig.from_config(test_cfg)
        divisor = self.test_cfg.size_divisor or getattr(self.backbone, "stride", 1)
        self.size_divisor = int(divisor) if divisor else 1

    # ------------------------------------------------------------------ features and losses
    def forward(
        self,
        inputs: torch.Tensor,
        data_samples: Sequence[DataSample] | None = None,
        mode: str = "tensor",
    ):
        if mode == "tensor":
            return self.decode_head(self.extract_feat(inputs))
        if mode == "loss":
            if not data_samples:
                raise ValueError("EncoderDecoder(mode='loss') needs data_samples with gt_sem_seg")
            return self.loss(inputs, data_samples)
        if mode == "predict":
            return self.predict(inputs, data_samples)
        raise ValueError(f"EncoderDecoder: unknown mode {mode!r}; expected 'tensor', 'loss' or 'predict'")

    def loss(self, inputs: torch.Tensor, data_samples: Sequence[DataSample]) -> dict:
        """Decode head losses (prefix ``decode.``) plus auxiliary ones (``aux.`` / ``aux_{i}.``)."""
        feats = self.extract_feat(inputs)
        losses = {f"decode.{k}": v for k, v in self.decode_head.loss(feats, data_samples).items()}
        if isinstance(self.auxiliary_head, nn.ModuleList):
            for i, head in enumerate(self.auxiliary_head):
                losses.update({f"aux_{i}.{k}": v for k, v in head.loss(feats, data_samples).items()})
        elif self.auxiliary_head is not None:
            losses.update({f"aux.{k}": v for k, v in self.auxiliary_head.loss(feats, data_samples).items()})
        return losses

    # ------------------------------------------------------------------ inference
    def encode_decode(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits at the input's resolution: pad (bottom/right) to the backbone's stride, run,
        upsample bilinearly to the padded size, cut the padding off."""
        height, width = inputs.shape[-2:]
        d = self.size_divisor
        pad_h, pad_w = (-height) % d, (-width) % d
        x = nn.functional.pad(inputs, (0, pad_w, 0, pad_h)) if pad_h or pad_w else inputs
        logits = self.decode_head(self.extract_feat(x))
        logits = resize(logits, x.shape[-2:], self.decode_head.align_corners)
        return logits[..., :height, :width]

    def slide_inference(self, inputs: torch.Tensor, windows_per_batch: int | None = None) -> torch.Tensor:
        """Sliding-window logits ``(N, K, H, W)``; windows are batched ``windows_per_batch`` at a
        time (default ``test_cfg.windows_per_batch``)."""
        cfg = self.test_cfg
        _check_slide(cfg.config_path, cfg.crop_size, cfg.stride)
        per_batch = windows_per_batch or cfg.windows_per_batch
        batch, _, height, width = inputs.shape
        boxes = slide_windows(height, width, cfg.crop_size, cfg.stride)
        # One job per (image, window); all windows of an image have the same size.
        jobs = [(b, box) for box in boxes for b in range(batch)]
        total = None
        count = inputs.new_zeros((1, 1, height, width))
        for y0, y1, x0, x1 in boxes:
            count[..., y0:y1, x0:x1] += 1
        for start in range(0, len(jobs), per_batch):
            chunk = jobs[start:start + per_batch]
            crops = torch.cat([inputs[b:b + 1, :, y0:y1, x0:x1] for b, (y0, y1, x0, x1) in chunk])
            logits = self.encode_decode(crops)
            if total is None:
                # float32 sums even under bf16/fp16 autocast.
                total = logits.new_zeros((batch, logits.shape[1], height, width), dtype=torch.float32)
            for (b, (y0, y1, x0, x1)), window in zip(chunk, logits):
                total[b, :, y0:y1, x0:x1] += window
        # In place: with 150 classes at full resolution these tensors are large.
        return total.div_(count)

    def inference(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, K, H, W)`` for normalised inputs, by ``test_cfg.mode``."""
        if self.test_cfg.mode == "slide":
            return self.slide_inference(inputs)
        return self.encode_decode(inputs)

    def aug_inference(self, inputs: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
        """Logits (or mean softmax scores with ``merge: probs``) ``(N, K, *out_size)`` averaged
        over ``tta.ratios`` x (plain, mirrored); without ``tta`` one plain pass."""
        cfg = self.test_cfg
        height, width = inputs.shape[-2:]
        total, passes = None, 0
        for ratio in cfg.ratios:
            size = (max(int(height * ratio + 0.5), 1), max(int(width * ratio + 0.5), 1))
            scaled = resize(inputs, size, self.decode_head.align_corners)
            for flip in ([False, True] if cfg.flip else [False]):
                x = scaled.flip(-1) if flip else scaled
                logits = self.inference(x)
                if flip:
                    logits = logits.flip(-1)
                logits = resize(logits.float(), out_size, self.decode_head.align_corners)
                if cfg.merge == "probs":
                    logits = logits.softmax(dim=1)
                total = logits if total is None else total.add_(logits)
                passes += 1
        return total if passes == 1 else total.div_(passes)

    def predict(self, inputs: torch.Tensor, data_samples: Sequence[DataSample] | None = None) -> list[DataSample]:
        """Fill ``seg_logits`` and ``pred_sem_seg`` at each image's original size."""
        if data_samples is None:
            data_samples = [DataSample(metainfo=dict(img_shape=tuple(inputs.shape[-2:]))) for _ in range(len(inputs))]
        full_h, full_w = inputs.shape[-2:]
        valid = []
        for sample in data_samples:
            pad = sample.get("padding_size")
            if pad is not None:
                valid.append((full_h - pad[2] - pad[3], full_w - pad[0] - pad[1]))
            else:
                h, w = sample.get("img_shape", (full_h, full_w))[:2]
                valid.append((min(h, full_h), min(w, full_w)))
        out_sizes = [tuple(s.get("ori_shape", v))[:2] for s, v in zip(data_samples, valid)]
        if len(set(valid)) == 1 and len(set(out_sizes)) == 1:
            # The common case (one image, or equal sizes): one batched pass.
            h, w = valid[0]
            groups = [(list(range(len(data_samples))), self.aug_inference(inputs[:, :, :h, :w], out_sizes[0]))]
        else:
            groups = [([i], self.aug_inference(inputs[i:i + 1, :, :h, :w], out_sizes[i]))
                      for i, (h, w) in enumerate(valid)]
        for indices, logits in groups:
            for i, seg_logits in zip(indices, logits):
                sample = data_samples[i]
                sample.seg_logits = PixelData(data=seg_logits)
                sample.pred_sem_seg = PixelData(data=seg_logits.argmax(dim=0, keepdim=True))
        return list(data_samples)
