"""The reference the demos must reach: a plain BatchNorm CNN (classification), a plain FCN
(segmentation) or a plain 3D CNN (video), trained from scratch in a plain PyTorch loop on the data a demo reads, with the
demo's budget (the same image size, number of passes over the data, optimiser family and
label-preserving augmentations), then scored with the demo's metric.

``tools/cnn_baseline.py {cls,seg,video} DATA_DIR`` runs it. Nothing here goes through the registry,
mmengine or the demo configs: it is an independent yardstick written the way a user would write
one, so that "the ViT demo learns what a CNN learns from the same images" can be checked.

Classification reads the ImageNet folder layout (``train/<class>/*``, ``val/<class>/*``) and
reports ``accuracy/top1`` (percent); segmentation reads the ADE20K layout (label 0 ignored,
labels 1..K are classes 0..K-1) and reports ``aAcc``, ``mIoU`` and ``mAcc`` (percent, mmseg's
definitions: a class absent from both prediction and ground truth does not count); video reads
the Kinetics list layout (``train.txt`` / ``val.txt`` lines ``relative/path.mp4 LABEL``) and
reports ``acc/top1`` (percent; softmax averaged over 3 clips spread over each video).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitasks.errors import DataError

__all__ = [
    "BaselineConfig",
    "count_classes",
    "CLS_DEFAULTS",
    "SEG_DEFAULTS",
    "VIDEO_DEFAULTS",
    "PlainCNN",
    "PlainFCN",
    "PlainCNN3D",
    "load_imagenet_folders",
    "load_ade_split",
    "load_video_list",
    "augment_clips",
    "train_clip_starts",
    "test_clip_starts",
    "clip_indices",
    "random_affine_grid",
    "segmentation_scores",
    "train_cls_baseline",
    "train_seg_baseline",
    "train_video_baseline",
]

_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@dataclass
class BaselineConfig:
    """One baseline run: what a demo's budget means for the plain network."""

    img_size: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    width: int
    seed: int = 0
    scale: Tuple[float, float] = (0.85, 1.15)
    translate: float = 0.1
    rotate: float = 15.0
    clip_len: int = 8  # video: consecutive frames per clip
    test_clips: int = 3  # video: clips spread over each validation video, softmax averaged


#: The classification demo's budget: 64 px, 60 epochs, batch 32, AdamW.
CLS_DEFAULTS = BaselineConfig(img_size=64, epochs=60, batch_size=32, lr=2e-3, weight_decay=0.05, width=16)
#: The segmentation demo's budget: 96 px, 1200 iterations of batch 8 on 300 images = 32 epochs.
SEG_DEFAULTS = BaselineConfig(img_size=96, epochs=32, batch_size=8, lr=2e-3, weight_decay=0.01, width=16,
                              scale=(0.75, 1.5), rotate=10.0)
#: The video demo's budget: 8-frame clips at 48 px, 30 epochs of batch 16, AdamW lr 1e-3 wd 0.05.
VIDEO_DEFAULTS = BaselineConfig(img_size=48, epochs=30, batch_size=16, lr=1e-3, weight_decay=0.05, width=16,
                                scale=(0.8, 1.25), rotate=10.0)


def _conv_bn(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class PlainCNN(nn.Module):
    """Eight 3x3 conv-BN-ReLU layers in four stages (width w, 2w, 4w, 8w; max-pool between
    stages), global average pooling and a linear classifier."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        layers: List[nn.Module] = []
        cin = 3
        for stage in range(4):
            cout = width * 2**stage
            if stage:
                layers.append(nn.MaxPool2d(2))
            layers += [_conv_bn(cin, cout), _conv_bn(cout, cout)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class PlainFCN(nn.Module):
    """Six 3x3 conv-BN-ReLU layers (width w, w/2 stride 2, 2w, 2w/2 stride 2, then two dilated
    4w layers at stride 4), a 1x1 classifier and bilinear upsampling to the input size."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(3, width),
            _conv_bn(width, width, stride=2),
            _conv_bn(width, 2 * width),
            _conv_bn(2 * width, 2 * width, stride=2),
            _conv_bn(2 * width, 4 * width, dilation=2),
            _conv_bn(4 * width, 4 * width, dilation=4),
        )
        self.classifier = nn.Conv2d(4 * width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.features(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _conv_bn_3d(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class PlainCNN3D(nn.Module):
    """The C3D idea at CPU size: eight 3x3x3 conv-BN-ReLU layers in four stages (width w, 2w,
    4w, 6w), a spatial 1x2x2 max-pool before each new width (2x2x2 before the third stage, the
    one temporal pool), global average pooling over time and space and a linear classifier.
    Input ``(N, 3, T, H, W)``."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        layers: List[nn.Module] = []
        cin = 3
        for stage, mult in enumerate((1, 2, 4, 6)):
            cout = width * mult
            if stage:
                layers.append(nn.MaxPool3d((2, 2, 2) if stage == 2 else (1, 2, 2)))
            layers += [_conv_bn_3d(cin, cout), _conv_bn_3d(cout, cout)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3, 4)))


def _read_rgb(path: str) -> np.ndarray:
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"cnn_baseline: cannot read image {path!r}")
    return img[:, :, ::-1]


def _resize_center_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    top, left = (nh - size) // 2, (nw - size) // 2
    return img[top:top + size, left:left + size]


def _to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # uint8 N, 3, H, W


def load_imagenet_folders(data_root: str, split: str, size: int) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """``(images uint8 (N, 3, size, size), labels (N,), class names)`` of ``data_root/split``;
    classes are the sorted sub-folders, images resized (shorter side) and centre-cropped."""
    root = os.path.join(data_root, split)
    if not os.path.isdir(root):
        raise DataError(f"cnn_baseline: {root!r} is not a folder; expected the ImageNet layout {split}/<class>/*")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted(os.listdir(os.path.join(root, name))):
            if file.lower().endswith(_IMAGE_EXTS):
                images.append(_resize_center_crop(_read_rgb(os.path.join(root, name, file)), size))
                labels.append(label)
    if not images:
        raise DataError(f"cnn_baseline: no images under {root!r}")
    return _to_tensor(images), torch.tensor(labels), classes


def load_ade_split(data_root: str, split: str, size: int) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Images (uint8 (3, size, size), resized) and label maps (int64 at the annotation's own size,
    ADE values minus one: 0 "other" becomes -1, ignored) of ``images/<split>`` and
    ``annotations/<split>``."""
    img_dir, ann_dir = os.path.join(data_root, "images", split), os.path.join(data_root, "annotations", split)
    if not os.path.isdir(img_dir) or not os.path.isdir(ann_dir):
        raise DataError(f"cnn_baseline: expected the ADE20K layout images/{split} and annotations/{split} "
                        f"under {data_root!r}")
    images, labels = [], []
    for file in sorted(os.listdir(img_dir)):
        if not file.lower().endswith(_IMAGE_EXTS):
            continue
        stem = os.path.splitext(file)[0]
        ann = cv2.imread(os.path.join(ann_dir, stem + ".png"), cv2.IMREAD_UNCHANGED)
        if ann is None:
            raise DataError(f"cnn_baseline: no annotation {stem}.png in {ann_dir!r} for image {file}")
        img = cv2.resize(_read_rgb(os.path.join(img_dir, file)), (size, size), interpolation=cv2.INTER_AREA)
        images.append(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1))
        labels.append(torch.from_numpy(ann.astype(np.int64)) - 1)
    if not images:
        raise DataError(f"cnn_baseline: no images in {img_dir!r}")
    return images, labels


def load_video_list(data_root: str, split: str, size: int) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Every frame of the videos listed in ``data_root/<split>.txt`` (lines ``relative/path.mp4
    LABEL``), decoded once: uint8 ``(T, 3, size, size)`` per video (shorter side resized, centre
    crop), and the labels."""
    from vitasks.data.video_io import probe_video, read_video_frames

    list_file = os.path.join(data_root, f"{split}.txt")
    if not os.path.isfile(list_file):
        raise DataError(f"cnn_baseline: no {list_file!r}; expected the Kinetics list layout train.txt / val.txt "
                        "with lines 'relative/path.mp4 LABEL'")
    clips, labels = [], []
    with open(list_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.strip().rsplit(None, 1)
            if len(parts) != 2 or not parts[1].isdigit():
                raise DataError(f"cnn_baseline: {list_file}, line {lineno}: expected 'relative/path.mp4 LABEL' "
                                f"(a label 0 or more), got {line.strip()!r}")
            path = os.path.join(data_root, parts[0])
            frames = read_video_frames(path, range(probe_video(path).num_frames))
            clips.append(_to_tensor([_resize_center_crop(frame, size) for frame in frames]))
            labels.append(int(parts[1]))
    if not clips:
        raise DataError(f"cnn_baseline: {list_file!r} lists no videos")
    return clips, torch.tensor(labels)


def train_clip_starts(totals: torch.Tensor, clip_len: int, generator: torch.Generator) -> torch.Tensor:
    """One random start per video of ``totals`` frames, uniform over ``0..total - clip_len``
    (0 when the video is shorter than a clip)."""
    choices = (totals - clip_len + 1).clamp(min=1)
    return (torch.rand(len(totals), generator=generator) * choices).long().clamp(max=choices - 1)


def test_clip_starts(total: int, clip_len: int, num_clips: int) -> List[int]:
    """The demo's test clips (``SampleFrames`` with ``test_mode``): starts evenly spread from the
    first to the last possible one (the middle one for a single clip)."""
    last = max(total - clip_len, 0)
    if num_clips == 1:
        return [last // 2]
    return [int(v) for v in np.round(np.arange(num_clips) * (last / (num_clips - 1)))]


def clip_indices(start: int, total: int, clip_len: int) -> torch.Tensor:
    """``clip_len`` consecutive frame indices from ``start``; past the end, the last frame repeats."""
    return (start + torch.arange(clip_len)).clamp(max=total - 1)


def random_affine_grid(n: int, size: int, cfg: BaselineConfig, generator: torch.Generator) -> torch.Tensor:
    """Sampling grids for ``grid_sample``: a random scale, shift and rotation per image (no flips:
    a mirrored glyph can be another class)."""
    u = torch.rand(n, 4, generator=generator)
    lo, hi = math.log(cfg.scale[0]), math.log(cfg.scale[1])
    scale = torch.exp(lo + (hi - lo) * u[:, 0])
    angle = torch.deg2rad((2 * u[:, 1] - 1) * cfg.rotate)
    shift = (2 * u[:, 2:] - 1) * cfg.translate * 2  # normalised coordinates span 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    return F.affine_grid(theta, [n, 3, size, size], align_corners=False)


def _normalise(images_uint8: torch.Tensor) -> torch.Tensor:
    return (images_uint8.float() / 255.0 - _MEAN) / _STD


def augment_clips(clips: torch.Tensor, cfg: BaselineConfig, generator: torch.Generator) -> torch.Tensor:
    """``clips`` ``(N, T, 3, S, S)`` float, each warped by one random scale, shift and rotation
    (:func:`random_affine_grid`) that is the same for all its frames: the motion keeps its
    direction (no flips, no temporal reversal)."""
    n, t, c, h, w = clips.shape
    grid = random_affine_grid(n, h, cfg, generator).repeat_interleave(t, dim=0)
    out = F.grid_sample(clips.reshape(n * t, c, h, w), grid, mode="bilinear", padding_mode="reflection",
                        align_corners=False)
    return out.reshape(n, t, c, h, w)


def _schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, total_steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _optimizer(model: nn.Module, cfg: BaselineConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


def _fit(model: nn.Module, num_train: int, batch_loss, cfg: BaselineConfig, log, log_every: int) -> None:
    """The plain loop both baselines share: AdamW with warm-up and cosine decay, a fresh shuffle per
    epoch, ``batch_loss(indices, generator)`` per step (its augmentation draws come from the
    generator, after the shuffle), the mean loss logged every ``log_every`` epochs."""
    optimizer = _optimizer(model, cfg)
    steps_per_epoch = math.ceil(num_train / cfg.batch_size)
    scheduler = _schedule(optimizer, cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(num_train, generator=gen)
        total = 0.0
        for i in range(steps_per_epoch):
            loss = batch_loss(order[i * cfg.batch_size:(i + 1) * cfg.batch_size], gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item()
        if (epoch + 1) % log_every == 0 or epoch + 1 == cfg.epochs:
            log(f"epoch {epoch + 1}/{cfg.epochs} loss {total / steps_per_epoch:.4f}")


def train_cls_baseline(data_root: str, cfg: BaselineConfig = CLS_DEFAULTS, log=print) -> Dict[str, float]:
    """Train :class:`PlainCNN` on ``data_root/train`` and return ``{"accuracy/top1": %, "seconds": s}``
    on ``data_root/val``."""
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    x_train, y_train, classes = load_imagenet_folders(data_root, "train", cfg.img_size)
    x_val, y_val, val_classes = load_imagenet_folders(data_root, "val", cfg.img_size)
    if val_classes != classes:
        raise DataError(f"cnn_baseline: val/ classes {val_classes} differ from train/ classes {classes}")
    model = PlainCNN(len(classes), cfg.width)

    def batch_loss(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = _normalise(x_train[idx])
        x = F.grid_sample(x, random_affine_grid(len(idx), cfg.img_size, cfg, gen), mode="bilinear",
                          padding_mode="reflection", align_corners=False)
        return F.cross_entropy(model(x), y_train[idx], label_smoothing=0.1)

    _fit(model, len(x_train), batch_loss, cfg, log, log_every=10)
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(_normalise(x_val[i:i + 128])).argmax(1) for i in range(0, len(x_val), 128)])
    top1 = 100.0 * (pred == y_val).float().mean().item()
    return {"accuracy/top1": round(top1, 2), "seconds": round(time.perf_counter() - start, 1)}


def segmentation_scores(confusion: np.ndarray) -> Dict[str, float]:
    """``aAcc``, ``mIoU`` and ``mAcc`` (percent, two decimals) from a K x K confusion matrix
    (rows ground truth, columns prediction); classes that occur in neither are left out."""
    confusion = confusion.astype(np.float64)
    inter = np.diag(confusion)
    gt, pred = confusion.sum(1), confusion.sum(0)
    union = gt + pred - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
        acc = inter / gt
    return {"aAcc": round(100 * inter.sum() / max(1.0, confusion.sum()), 2),
            "mIoU": round(100 * float(np.nanmean(iou)), 2), "mAcc": round(100 * float(np.nanmean(acc)), 2)}


def train_seg_baseline(data_root: str, num_classes: int, cfg: BaselineConfig = SEG_DEFAULTS,
                       log=print) -> Dict[str, float]:
    """Train :class:`PlainFCN` on ``images/training`` and return ``aAcc``, ``mIoU``, ``mAcc`` and
    ``seconds`` on ``images/validation``; ``num_classes`` K: ADE labels 1..K."""
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    train_images, train_labels = load_ade_split(data_root, "training", cfg.img_size)
    val_images, val_labels = load_ade_split(data_root, "validation", cfg.img_size)
    # Training targets at the network's input size (nearest), -1 (ignored) outside 0..K-1.
    targets = []
    for label in train_labels:
        small = cv2.resize(label.numpy().astype(np.int32), (cfg.img_size, cfg.img_size), interpolation=cv2.INTER_NEAREST)
        small = np.where((small >= 0) & (small < num_classes), small, -1)
        targets.append(torch.from_numpy(small.astype(np.int64)))
    x_train, y_train = torch.stack(train_images), torch.stack(targets)
    model = PlainFCN(num_classes, cfg.width)

    def batch_loss(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        grid = random_affine_grid(len(idx), cfg.img_size, cfg, gen)
        x = F.grid_sample(_normalise(x_train[idx]), grid, mode="bilinear", padding_mode="reflection",
                          align_corners=False)
        # Labels warped with the same grid (nearest); what falls outside the image is ignored.
        y = F.grid_sample(y_train[idx, None].float(), grid, mode="nearest", padding_mode="zeros",
                          align_corners=False)
        inside = F.grid_sample(torch.ones_like(y), grid, mode="nearest", padding_mode="zeros",
                               align_corners=False)
        y = torch.where(inside > 0.5, y, torch.full_like(y, -1)).long()[:, 0]
        return F.cross_entropy(model(x), y, ignore_index=-1)

    _fit(model, len(x_train), batch_loss, cfg, log, log_every=8)
    model.eval()
    confusion = np.zeros((num_classes, num_classes), np.int64)
    with torch.no_grad():
        for image, label in zip(val_images, val_labels):
            logits = model(_normalise(image[None]))
            logits = F.interpolate(logits, size=label.shape, mode="bilinear", align_corners=False)
            pred = logits.argmax(1)[0].numpy().ravel()
            gt = label.numpy().ravel()
            keep = (gt >= 0) & (gt < num_classes)
            confusion += np.bincount(gt[keep] * num_classes + pred[keep],
                                     minlength=num_classes**2).reshape(num_classes, num_classes)
    scores = segmentation_scores(confusion)
    scores["seconds"] = round(time.perf_counter() - start, 1)
    return scores


def count_classes(data_root: str, default: int) -> int:
    """K of an ADE-layout set: the lines of ``classes.txt`` when there is one, else ``default``."""
    path = os.path.join(data_root, "classes.txt")
    if not os.path.isfile(path):
        return default
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def train_video_baseline(data_root: str, num_classes: Optional[int] = None, cfg: BaselineConfig = VIDEO_DEFAULTS,
                         log=print) -> Dict[str, float]:
    """Train :class:`PlainCNN3D` on the clips of ``train.txt`` and return ``{"acc/top1": %,
    "seconds": s}`` on ``val.txt`` (``cfg.test_clips`` clips per video, centre crop, softmax
    averaged). ``num_classes``: the lines of ``classes.txt`` when not given, else the largest
    label + 1."""
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    train_clips, y_train = load_video_list(data_root, "train", cfg.img_size)
    val_clips, y_val = load_video_list(data_root, "val", cfg.img_size)
    largest = int(max(y_train.max(), y_val.max()))
    if num_classes is None:
        num_classes = count_classes(data_root, default=largest + 1)
    if largest >= num_classes:
        raise DataError(f"cnn_baseline: label {largest} in {data_root!r}'s lists is out of range for "
                        f"{num_classes} classes (--num-classes or classes.txt)")
    totals = torch.tensor([len(c) for c in train_clips])
    model = PlainCNN3D(num_classes, cfg.width)

    def batch_loss(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        starts = train_clip_starts(totals[idx], cfg.clip_len, gen)
        x = torch.stack([train_clips[i][clip_indices(int(s), len(train_clips[i]), cfg.clip_len)]
                         for i, s in zip(idx.tolist(), starts.tolist())])
        x = augment_clips(_normalise(x), cfg, gen)
        return F.cross_entropy(model(x.transpose(1, 2)), y_train[idx], label_smoothing=0.1)

    _fit(model, len(train_clips), batch_loss, cfg, log, log_every=10)
    model.eval()
    views = [clip[clip_indices(s, len(clip), cfg.clip_len)] for clip in val_clips
             for s in test_clip_starts(len(clip), cfg.clip_len, cfg.test_clips)]
    with torch.no_grad():
        probs = torch.cat([model(_normalise(torch.stack(views[i:i + 64])).transpose(1, 2)).softmax(1)
                           for i in range(0, len(views), 64)])
    pred = probs.view(len(val_clips), cfg.test_clips, -1).mean(1).argmax(1)
    top1 = 100.0 * (pred == y_val).float().mean().item()
    return {"acc/top1": round(top1, 2), "seconds": round(time.perf_counter() - start, 1)}
