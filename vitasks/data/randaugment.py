"""RandAugment as timm defines it, configured by timm's strings (``rand-m9-mstd0.5-inc1``).

timm's definition (``timm.data.auto_augment``), kept here number for number:

- the config string is ``rand`` followed by ``-``-separated sections, each a key and a value:
  ``m`` magnitude (int, default 10), ``n`` ops per image (default 2), ``p`` probability of each
  chosen op (default 0.5), ``mstd`` std of the magnitude noise (``> 100`` means uniform in
  ``[0, m]``), ``mmax`` upper clip of the noisy magnitude (default 10), ``inc`` the "increasing"
  op variants, ``t`` a named op set (``weights``, ``3a``, ``3aw``; weighted sets are drawn without
  replacement); a section without a digit is ignored, as in timm;
- per image: ``n`` ops are drawn with replacement from the op list (15 ops); each fires with
  probability ``p``; its magnitude is ``m`` plus normal noise of std ``mstd``, clipped to
  ``[0, mmax]``; the magnitude maps to the op's argument on a scale where 10 is the maximum
  (``_LEVEL_DENOM``): rotate ``30 m/10`` degrees, shear ``0.3 m/10``, translate ``0.45 m/10`` of
  the side, enhance factors ``1.8 m/10 + 0.1`` (increasing: ``1 +- 0.9 m/10``, at least 0.1),
  posterize ``int(4 m/10)`` bits (increasing: ``4 - int(4 m/10)``), solarize threshold
  ``int(256 m/10)`` (increasing: ``256 -`` that), solarize-add ``int(110 m/10)``; signed
  arguments are negated with probability 1/2;
- geometric ops fill with ``img_mean`` and resample with ``interpolation``; timm's defaults in a
  training pipeline (``create_transform``) are the dataset mean in 0-255 (ImageNet:
  ``(124, 116, 104)``), ``translate_const = int(img_size * 0.45)`` and the pipeline's
  interpolation (DeiT: bicubic); without an interpolation timm picks bilinear or bicubic at
  random per op (``interpolation: random`` here).

The ops are PIL's (``ImageOps``, ``ImageEnhance``, affine ``Image.transform``), as timm's, so
results match timm's pixel for pixel. One deviation: timm reads ``inc0`` as increasing (it tests
``bool("0")``); here ``inc0`` means the plain ops, as its documentation says.

Random draws come from the sample's generator (:func:`~vitasks.data.seeding.sample_rng`). A video
clip (``results["imgs"]``, ``(F, H, W, 3)``) gets one draw for the whole clip, applied to every
frame alike (VideoMAE's and SlowFast's video RandAugment).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from vitasks.checks import one_of, options, positive_int
from vitasks.data.seeding import sample_rng
from vitasks.data.transforms import BaseTransform
from vitasks.errors import ConfigError
from vitasks.registry import TRANSFORMS

__all__ = [
    "RandAugment",
    "VideoRandAugment",
    "RandAugmentSpec",
    "OpDraw",
    "parse_rand_config",
    "level_to_args",
    "apply_op",
    "RAND_TRANSFORMS",
    "RAND_INCREASING_TRANSFORMS",
]

LEVEL_DENOM = 10.0  # magnitude 10 is an op's full strength

# The op lists of timm's RandAugment (Cutout is left out: it is RandomErasing there too).
RAND_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel",
)
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
# Named sets (``t<name>``): a tuple is drawn uniformly with replacement, a dict by weight without.
_NAMED_SETS: Dict[str, Union[Tuple[str, ...], Dict[str, float]]] = {
    "3a": ("SolarizeIncreasing", "Desaturate", "GaussianBlur"),
    "3aw": {
        "SolarizeIncreasing": 6, "Desaturate": 6, "GaussianBlur": 6, "Rotate": 3, "ShearX": 2,
        "ShearY": 2, "PosterizeIncreasing": 1, "AutoContrast": 1, "ColorIncreasing": 1,
        "SharpnessIncreasing": 1, "ContrastIncreasing": 1, "BrightnessIncreasing": 1,
        "Equalize": 1, "Invert": 1,
    },
    "weights": {
        "Rotate": 3, "ShearX": 2, "ShearY": 2, "TranslateXRel": 1, "TranslateYRel": 1,
        "ColorIncreasing": 0.25, "SharpnessIncreasing": 0.25, "AutoContrast": 0.25,
        "SolarizeIncreasing": 0.05, "SolarizeAdd": 0.05, "ContrastIncreasing": 0.05,
        "BrightnessIncreasing": 0.05, "Equalize": 0.05, "PosterizeIncreasing": 0.05, "Invert": 0.05,
    },
}

_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "hamming": Image.Resampling.HAMMING,
}
_RANDOM_FILTERS = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)  # timm's random choice

# Ops that move pixels (take a fill colour and an interpolation) and ops with a signed argument.
_GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"}
_SIGNED = _GEOMETRIC | {
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"
}
_NO_ARGS = {"AutoContrast", "Equalize", "Invert"}


def _signed(value: float, negate: bool) -> float:
    return -value if negate else value


def level_to_args(name: str, magnitude: float, hparams: Dict[str, Any], negate: bool = False) -> tuple:
    """The op's arguments at ``magnitude`` (already noised and clipped), timm's mapping; ``negate``
    flips the sign of signed arguments."""
    level = magnitude / LEVEL_DENOM
    if name in _NO_ARGS:
        return ()
    if name == "Rotate":
        return (_signed(level * 30.0, negate),)
    if name in ("ShearX", "ShearY"):
        return (_signed(level * 0.3, negate),)
    if name in ("TranslateXRel", "TranslateYRel"):
        return (_signed(level * float(hparams.get("translate_pct", 0.45)), negate),)
    if name in ("TranslateX", "TranslateY"):
        return (_signed(level * float(hparams["translate_const"]), negate),)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return (level * 1.8 + 0.1,)
    if name.endswith("Increasing") and name[: -len("Increasing")] in ("Color", "Contrast", "Brightness", "Sharpness"):
        return (max(0.1, 1.0 + _signed(level * 0.9, negate)),)
    if name == "Posterize":
        return (int(level * 4),)
    if name == "PosterizeIncreasing":
        return (4 - int(level * 4),)
    if name == "PosterizeOriginal":
        return (int(level * 4) + 4,)
    if name == "Solarize":
        return (min(256, int(level * 256)),)
    if name == "SolarizeIncreasing":
        return (256 - min(256, int(level * 256)),)
    if name == "SolarizeAdd":
        return (min(128, int(level * 110)),)
    if name == "Desaturate":
        return (max(0.5, min(1.0, 0.5 + 0.5 * level)),)
    if name == "GaussianBlur":
        return (max(0.1, min(2.0, 0.1 + 1.9 * level)),)
    raise ValueError(f"RandAugment: unknown op {name!r}")  # names come from the op lists above


def _affine(img: Image.Image, matrix: tuple, resample: int, fill: tuple) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)


def apply_op(img: Image.Image, name: str, args: tuple, resample: int = Image.Resampling.BICUBIC,
             fill: Tuple[int, ...] = (128, 128, 128)) -> Image.Image:
    """One op on a PIL image with its arguments (from :func:`level_to_args`)."""
    base = name[: -len("Increasing")] if name.endswith("Increasing") else name
    if base == "AutoContrast":
        return ImageOps.autocontrast(img)
    if base == "Equalize":
        return ImageOps.equalize(img)
    if base == "Invert":
        return ImageOps.invert(img)
    if base == "Rotate":
        return img.rotate(args[0], resample=resample, fillcolor=fill)
    if base in ("Posterize", "PosterizeOriginal"):
        bits = args[0]
        if bits >= 8:
            return img
        if bits <= 0:
            # Keeping 0 bits masks every value to 0: a black image, what older Pillow (and so
            # timm) computed. Pillow 13 raises for bits < 1, and magnitude 10 of the increasing
            # variant (below 2.5 of the plain one) asks for 0 bits.
            return Image.new(img.mode, img.size)  # all zeros
        return ImageOps.posterize(img, bits)
    if base == "Solarize":
        return ImageOps.solarize(img, args[0])
    if base == "SolarizeAdd":
        add = args[0]
        table = [min(255, i + add) if i < 128 else i for i in range(256)]
        return img.point(table * len(img.getbands()))
    if base in ("Color", "Contrast", "Brightness", "Sharpness"):
        return getattr(ImageEnhance, base)(img).enhance(args[0])
    if base == "Desaturate":
        return ImageEnhance.Color(img).enhance(min(1.0, max(0.0, 1.0 - args[0])))
    if base == "GaussianBlur":
        return img.filter(ImageFilter.GaussianBlur(radius=args[0]))
    if base == "ShearX":
        return _affine(img, (1, args[0], 0, 0, 1, 0), resample, fill)
    if base == "ShearY":
        return _affine(img, (1, 0, 0, args[0], 1, 0), resample, fill)
    if base == "TranslateXRel":
        return _affine(img, (1, 0, args[0] * img.size[0], 0, 1, 0), resample, fill)
    if base == "TranslateYRel":
        return _affine(img, (1, 0, 0, 0, 1, args[0] * img.size[1]), resample, fill)
    if base == "TranslateX":
        return _affine(img, (1, 0, args[0], 0, 1, 0), resample, fill)
    if base == "TranslateY":
        return _affine(img, (1, 0, 0, 0, 1, args[0]), resample, fill)
    raise ValueError(f"RandAugment: unknown op {name!r}")  # names come from the op lists above


@dataclass
class RandAugmentSpec:
    """What a config string says (timm's defaults where it is silent)."""

    magnitude: float = 10.0
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0
    magnitude_max: Optional[float] = None
    increasing: bool = False
    transforms: Optional[str] = None  # a named set (``t`` section)
    ops: Tuple[str, ...] = field(default=RAND_TRANSFORMS)
    weights: Optional[Tuple[float, ...]] = None


def parse_rand_config(config_str: str) -> RandAugmentSpec:
    """Parse ``rand-m9-n2-mstd0.5-inc1`` as timm does (see the module's docstring)."""
    where = f"RandAugment.config_str {config_str!r}"
    if not isinstance(config_str, str) or config_str.split("-")[0] != "rand":
        raise ConfigError(f"RandAugment.config_str must be a string starting with 'rand' like 'rand-m9-mstd0.5-inc1', "
                          f"got {config_str!r}")
    sections = config_str.split("-")
    spec = RandAugmentSpec()
    for section in sections[1:]:
        if section.startswith("t"):
            spec.transforms = section[1:]
            continue
        parts = re.split(r"(\d.*)", section)
        if len(parts) < 2:
            continue  # no number: ignored, as timm does
        key, value = parts[:2]
        try:
            if key == "mstd":
                std = float(value)
                spec.magnitude_std = math.inf if std > 100 else std
            elif key == "mmax":
                spec.magnitude_max = int(value)
            elif key == "inc":
                spec.increasing = int(value) != 0
            elif key == "m":
                spec.magnitude = int(value)
            elif key == "n":
                spec.num_layers = int(value)
            elif key == "p":
                spec.prob = float(value)
            else:
                raise ConfigError(
                    f"{where}: unknown section {section!r}; expected m<int>, n<int>, p<float>, "
                    "mstd<float>, mmax<int>, inc<0|1> or t<set name>"
                )
        except ValueError as e:
            raise ConfigError(f"{where}: section {section!r} has a bad number ({e})") from e
    positive_int(spec.num_layers, f"{where}: n")
    if spec.transforms is not None and spec.transforms not in _NAMED_SETS:
        # timm falls back to the default list for an unknown name.
        spec.transforms = None
    chosen: Any = _NAMED_SETS[spec.transforms] if spec.transforms else (
        RAND_INCREASING_TRANSFORMS if spec.increasing else RAND_TRANSFORMS)
    if isinstance(chosen, dict):
        total = float(sum(chosen.values()))
        spec.ops = tuple(chosen)
        spec.weights = tuple(float(w) / total for w in chosen.values())
        if spec.num_layers > len(spec.ops):
            raise ConfigError(f"{where}: n={spec.num_layers} ops drawn without replacement from {len(spec.ops)}")
    else:
        spec.ops = tuple(chosen)
    return spec


@dataclass
class OpDraw:
    """One op as drawn for an image (or a clip): its name, arguments and resampling filter."""

    name: str
    args: tuple
    resample: int = Image.Resampling.BICUBIC


# timm's defaults in a DeiT training pipeline at 224 px.
IMAGENET_MEAN_255 = (124, 116, 104)  # round(255 x (0.485, 0.456, 0.406))
DEFAULT_HPARAMS = {"translate_const": 100, "img_mean": IMAGENET_MEAN_255, "interpolation": "bicubic"}


@TRANSFORMS.register_module()
class RandAugment(BaseTransform):
    """timm's RandAugment on ``results["img"]`` (or every frame of ``results["imgs"]`` alike).

    Args:
        config_str: timm's string, e.g. ``rand-m9-mstd0.5-inc1`` (DeiT) or
            ``rand-m7-n4-mstd0.5-inc1`` (VideoMAE).
        hparams: timm's hparams: ``img_mean`` (fill colour of geometric ops, 0-255 RGB),
            ``interpolation`` (``bicubic``, ``bilinear``, ``nearest``, ``lanczos``, ``hamming``, or
            ``random``: bilinear or bicubic per op, timm's behaviour without one),
            ``translate_const`` (pixels, absolute-translate ops only), ``translate_pct`` (0.45),
            and ``magnitude_std`` / ``magnitude_max``, which win over the string's ``mstd`` /
            ``mmax`` as in timm. Defaults: timm's for DeiT at 224 px, ``img_mean`` the ImageNet
            mean ``(124, 116, 104)``, ``interpolation: bicubic``, ``translate_const: 100``
            (``int(224 * 0.45)``). VideoMAE's pipeline gives no mean: ``img_mean: [128, 128, 128]``.
    """

    def __init__(self, config_str: str = "rand-m9-mstd0.5-inc1", hparams: Optional[Dict[str, Any]] = None) -> None:
        self.config_str = config_str
        spec = parse_rand_config(config_str)
        given = options(hparams or {}, "RandAugment.hparams", ("img_mean", "interpolation", "translate_const",
                                                               "translate_pct", "magnitude_std", "magnitude_max"))
        self.hparams = {**DEFAULT_HPARAMS, **given}
        fill = self.hparams["img_mean"]
        if isinstance(fill, (int, float)):
            fill = (fill,) * 3
        if not isinstance(fill, (list, tuple)) or len(fill) != 3:
            raise ConfigError(f"RandAugment.hparams.img_mean must be 3 values in 0-255, got {fill!r}")
        self._fill = tuple(int(round(float(v))) for v in fill)
        interp = one_of(self.hparams["interpolation"], sorted(_PIL_FILTERS) + ["random"],
                        "RandAugment.hparams.interpolation")
        self._filters = _RANDOM_FILTERS if interp == "random" else (_PIL_FILTERS[interp],)
        if "magnitude_std" in given:
            spec.magnitude_std = float(given["magnitude_std"])
        if "magnitude_max" in given:
            spec.magnitude_max = given["magnitude_max"]
        self._spec = spec

    @property
    def spec(self) -> RandAugmentSpec:
        return self._spec

    def draw(self, rng: np.random.Generator) -> List[OpDraw]:
        """The ops for one image or clip: which ops, whether each fires, its magnitude (noised and
        clipped), sign and interpolation, in timm's order of draws."""
        spec = self._spec
        if spec.weights is None:
            chosen = rng.integers(0, len(spec.ops), size=spec.num_layers)
        else:
            chosen = rng.choice(len(spec.ops), size=spec.num_layers, replace=False, p=spec.weights)
        upper = spec.magnitude_max or LEVEL_DENOM
        ops = []
        for index in chosen:
            name = spec.ops[int(index)]
            if spec.prob < 1.0 and rng.random() > spec.prob:
                continue
            magnitude = float(spec.magnitude)
            if spec.magnitude_std == math.inf:
                magnitude = rng.uniform(0.0, magnitude)
            elif spec.magnitude_std > 0:
                magnitude = rng.normal(magnitude, spec.magnitude_std)
            magnitude = max(0.0, min(magnitude, upper))
            negate = bool(rng.random() > 0.5) if name in _SIGNED else False
            args = level_to_args(name, magnitude, self.hparams, negate)
            resample = self._filters[0]
            if name in _GEOMETRIC and len(self._filters) > 1:
                resample = self._filters[int(rng.integers(0, len(self._filters)))]
            ops.append(OpDraw(name, args, resample))
        return ops

    def apply(self, img: np.ndarray, ops: Sequence[OpDraw]) -> np.ndarray:
        """The drawn ops on one RGB uint8 HWC image."""
        if not ops:
            return img
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"RandAugment needs RGB uint8 HxWx3 images, got {img.dtype} {img.shape}")
        pil = Image.fromarray(np.ascontiguousarray(img))
        for op in ops:
            pil = apply_op(pil, op.name, op.args, op.resample, self._fill)
        return np.asarray(pil, dtype=np.uint8).copy()

    def transform(self, results: dict) -> dict:
        ops = self.draw(sample_rng(results))
        if results.get("img") is not None:
            results["img"] = self.apply(results["img"], ops)
        elif results.get("imgs") is not None:
            frames = results["imgs"]
            results["imgs"] = np.stack([self.apply(f, ops) for f in frames]) if len(frames) else frames
        else:
            raise ValueError(f"{type(self).__name__}: the sample has neither `img` nor `imgs`")
        return results

    def __repr__(self) -> str:
        return f"{type(self).__name__}(config_str={self.config_str!r}, hparams={self.hparams!r})"


@TRANSFORMS.register_module()
class VideoRandAugment(RandAugment):
    """:class:`RandAugment` on a clip (``results["imgs"]``): one draw per clip, every frame alike
    (VideoMAE's ``rand-m7-n4-mstd0.5-inc1``). The plain ``RandAugment`` does the same on a clip;
    this name only states it and requires ``imgs``."""

    def transform(self, results: dict) -> dict:
        if results.get("imgs") is None:
            raise ValueError("VideoRandAugment: the sample has no `imgs` (decode the frames first)")
        return super().transform(results)
