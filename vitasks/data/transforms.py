"""Data transforms: load an image, augment it with albumentations, pack it for the model.

A transform is a callable ``results: dict -> dict`` (or ``None`` to drop the sample), the
protocol of mmengine's ``Compose``. Conventions: ``results["img"]`` is an RGB uint8 HWC numpy
array; ``results["gt_seg_map"]`` (segmentation) an HW integer array.
"""

import difflib
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vitasks.data.seeding import sample_rng, seed_from
from vitasks.checks import InRange, PositiveInt, checked, one_of, options
from vitasks.errors import ConfigError, DataError
from vitasks.registry import TRANSFORMS
from vitasks.structures import DataSample, PixelData


class BaseTransform:
    """A transform: ``__call__(results) -> results`` (``None`` drops the sample). A pipeline entry
    has no config key of its own (the same list serves every loader): errors name the transform's
    type and argument (``SegRandomCrop.crop_size``)."""

    config_key = "BaseTransform"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.config_key = cls.__name__

    def transform(self, results: dict) -> Optional[dict]:
        raise NotImplementedError

    def __call__(self, results: dict) -> Optional[dict]:
        return self.transform(results)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def chw_tensor(img: np.ndarray) -> torch.Tensor:
    """An HWC (or HW) image array as the CHW tensor the model's preprocessor takes (its
    dtype kept: uint8 stays uint8)."""
    if img.ndim == 2:
        img = img[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def read_image(path: str) -> np.ndarray:
    """Read an image file as RGB uint8 HWC; any unreadable, truncated or non-image file raises
    DataError naming it.

    PIL is used because it reports truncated JPEG/PNG files, which OpenCV decodes silently
    into partly grey images.
    """
    return read_with_pil(path, "image", lambda im: np.asarray(im if im.mode == "RGB" else im.convert("RGB"),
                                                              dtype=np.uint8).copy())


def read_with_pil(path: str, what: str, decode: Callable[[Image.Image], np.ndarray],
                  missing: str = "") -> np.ndarray:
    """``decode(image)`` of the file ``path`` opened with PIL and decoded whole (so a truncated
    file fails here); a missing or unreadable file is a DataError naming it as a ``what``
    (``missing`` when it is not there: ``<what> file`` by default)."""
    try:
        with Image.open(path) as im:
            im.load()
            return decode(im)
    except FileNotFoundError as e:
        raise DataError(f"{missing or what + ' file'} not found: {path}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        # PIL raises OSError ("image file is truncated", "broken data stream") and
        # SyntaxError for some corrupt PNG chunks.
        raise DataError(f"cannot read {what} {path}: {e}") from e


@TRANSFORMS.register_module()
class LoadImage(BaseTransform):
    """Read ``results["img_path"]`` into ``results["img"]`` (RGB uint8 HWC) and set
    ``ori_shape`` and ``img_shape`` (H, W).

    A bad file raises DataError naming it (datasets with ``skip_bad_samples: true`` turn this
    into a warning and another sample).
    """

    def transform(self, results: dict) -> dict:
        if "img_path" not in results:
            raise DataError("LoadImage: the sample has no `img_path`")
        img = read_image(results["img_path"])
        results["img"] = img
        results["ori_shape"] = img.shape[:2]
        results["img_shape"] = img.shape[:2]
        return results


# Names users may write for OpenCV flags in YAML, instead of the integer constants.
_INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "bilinear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}
_BORDERS = {
    "constant": cv2.BORDER_CONSTANT,
    "replicate": cv2.BORDER_REPLICATE,
    "reflect": cv2.BORDER_REFLECT,
    "reflect_101": cv2.BORDER_REFLECT_101,
    "wrap": cv2.BORDER_WRAP,
}
_FLAG_KEYS = {"interpolation": _INTERPOLATIONS, "mask_interpolation": _INTERPOLATIONS, "border_mode": _BORDERS}


def _albumentations() -> Any:
    """The albumentations module, imported on first use: it takes about a second to import, and
    most processes (tools, torchrun workers, tests) that import :mod:`vitasks.data` never build
    an :class:`Albu` transform."""
    import albumentations

    return albumentations


def _albu_classes() -> List[str]:
    """Names of albumentations' transforms and composers (for "did you mean")."""
    A = _albumentations()
    bases = (A.BasicTransform, A.BaseCompose)
    return sorted(
        n for n in dir(A)
        if not n.startswith("_") and isinstance(getattr(A, n), type) and issubclass(getattr(A, n), bases)
    )


def build_albu_list(transforms: Sequence[Dict[str, Any]], where: str) -> List[Any]:
    """Build a list of albumentations transforms (``where`` names the list)."""
    if not isinstance(transforms, (list, tuple)):
        raise ConfigError(f"{where} must be a list of dicts, got {transforms!r}")
    return [build_albu(t, f"{where}[{i}]") for i, t in enumerate(transforms)]


def build_albu(cfg: Dict[str, Any], where: str = "Albu.transforms") -> Any:
    """Build one albumentations transform from ``{type: Name, **kwargs}``; nested ``transforms``
    lists (``OneOf``, ``SomeOf``, ...) are built recursively. Errors name the entry."""
    args = options(cfg, where, what="a dict with a `type`", required=("type",))
    name = args.pop("type")
    A = _albumentations()
    cls = getattr(A, name, None) if isinstance(name, str) else None
    if not isinstance(cls, type):
        close = difflib.get_close_matches(str(name), _albu_classes(), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"{where}: albumentations has no transform {name!r}{hint}")
    for key, table in _FLAG_KEYS.items():
        value = args.get(key)
        if isinstance(value, str):
            args[key] = table[one_of(value.lower(), sorted(table), f"{where}.{name}.{key}")]
    if "transforms" in args:
        args["transforms"] = build_albu_list(args["transforms"], f"{where}.{name}.transforms")
    # Lists from YAML where albumentations expects tuples (size, scale, ratio).
    args = {k: tuple(v) if isinstance(v, list) and k != "transforms" else v for k, v in args.items()}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            transform = cls(**args)
    except Exception as e:  # pydantic ValidationError, TypeError, ValueError
        raise ConfigError(f"{where}: cannot build albumentations.{name}({args}): {e}") from e
    for w in caught:
        # albumentations warns (and ignores) unknown arguments: a typo must not pass silently.
        text = str(w.message)
        if "are not valid for transform" in text:
            raise ConfigError(f"{where}: albumentations.{name}: {text}")
        warnings.warn(text, w.category)
    return transform


def as_uint8(img: np.ndarray) -> np.ndarray:
    """Back to the uint8 convention after albumentations (a transform may give floats), contiguous."""
    if img.dtype != np.uint8:
        img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img)


def _reseed(transform: Any, rng: np.random.Generator) -> None:
    """Give an albumentations transform and each transform inside it a seed of its own from
    ``rng``. (``Compose.set_random_seed`` gives all of them the same seed, which would tie their
    draws together: every p=0.5 transform would fire on the same samples.)"""
    transform.set_random_seed(seed_from(rng))
    if isinstance(transform, _albumentations().BaseCompose):  # (some single transforms have a `transforms` list too)
        for child in transform.transforms:
            _reseed(child, rng)


@TRANSFORMS.register_module()
class Albu(BaseTransform):
    """Albumentations adaptor: ``A.Compose`` of the listed transforms, applied to ``img`` and,
    when present, ``gt_seg_map`` as the mask (so segmentation shares the same pipeline).

    Args:
        transforms: ``[{type: RandomResizedCrop, size: [224, 224]}, {type: HorizontalFlip}, ...]``;
            ``interpolation``/``mask_interpolation``/``border_mode`` may be names such as
            ``bicubic`` or ``constant``.
    """

    def __init__(self, transforms: Sequence[Dict[str, Any]]) -> None:
        self._compose = _albumentations().Compose(build_albu_list(transforms, f"{self.config_key}.transforms"))
        self.transforms = [dict(t) if isinstance(t, dict) else t for t in transforms]

    def transform(self, results: dict) -> dict:
        _reseed(self._compose, sample_rng(results))
        kwargs = {"image": results["img"]}
        has_mask = results.get("gt_seg_map") is not None
        if has_mask:
            kwargs["mask"] = results["gt_seg_map"]
        out = self._compose(**kwargs)
        img = as_uint8(out["image"])
        results["img"] = img
        results["img_shape"] = img.shape[:2]
        if has_mask:
            results["gt_seg_map"] = np.ascontiguousarray(out["mask"])
        return results


@TRANSFORMS.register_module()
class ResizeCenterCrop(Albu):
    """Evaluation resize: shorter side to ``round(size / crop_ratio)``, then a centre crop of
    ``size`` (ImageNet: 256 then 224, ratio 0.875). Written as a transform so that the resize
    follows ``${img_size}``.

    Args:
        size: Output side.
        crop_ratio: Crop side / resized shorter side.
        interpolation: Resize interpolation name (DeiT evaluates with bicubic).
    """

    @checked
    def __init__(self, size: PositiveInt, crop_ratio: InRange(0, 1, low_open=True) = 0.875,
                 interpolation: str = "bicubic") -> None:
        self.size = int(size)
        self.crop_ratio = float(crop_ratio)
        self.interpolation = interpolation
        super().__init__(
            [
                dict(type="SmallestMaxSize", max_size=round(self.size / self.crop_ratio),
                     interpolation=interpolation),
                dict(type="CenterCrop", height=self.size, width=self.size),
            ]
        )


@TRANSFORMS.register_module()
class PackInputs(BaseTransform):
    """Pack ``results`` into ``{"inputs": uint8 CHW tensor, "data_samples": DataSample}``.

    The sample gets ``gt_label`` (LongTensor (1,)) when ``results`` has one and ``gt_sem_seg``
    (PixelData, data (1, H, W) int64) when it has ``gt_seg_map``; metainfo from ``meta_keys``
    present in ``results``.

    Args:
        meta_keys: Keys copied into the sample's metainfo.
    """

    def __init__(
        self,
        meta_keys: Sequence[str] = ("img_path", "ori_shape", "img_shape", "seg_map_path", "reduce_zero_label"),
    ) -> None:
        self.meta_keys = tuple(meta_keys)

    def transform(self, results: dict) -> dict:
        inputs = chw_tensor(results["img"])
        sample = DataSample()
        if results.get("gt_label") is not None:
            sample.gt_label = torch.as_tensor(results["gt_label"], dtype=torch.long).reshape(-1)
        if results.get("gt_seg_map") is not None:
            seg = torch.from_numpy(np.asarray(results["gt_seg_map"]).astype(np.int64))
            sample.gt_sem_seg = PixelData(data=seg[None])
        sample.set_metainfo({k: results[k] for k in self.meta_keys if k in results})
        return {"inputs": inputs, "data_samples": sample}


@TRANSFORMS.register_module(name="RandomErasing")
class _RandomErasingInPipeline(BaseTransform):
    """Placeholder: timm's RandomErasing acts on normalised images, which only the model's data
    preprocessor has; a pipeline entry says where it goes."""

    def __init__(self, **kwargs: Any) -> None:
        raise ConfigError(
            "RandomErasing acts after normalisation, in the model's data preprocessor: set "
            "model.data_preprocessor.random_erasing: {type: RandomErasing, probability: 0.25, "
            "mode: pixel} instead of a pipeline entry"
        )
