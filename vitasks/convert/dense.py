"""What the converters of whole detectors and segmentors share (detectron2 and mmdetection
ViTDet, mmsegmentation UperNet): exact key consumption, the check against the vitasks model the
weights are meant for, COCO's class order, and the config options that make a shipped config
hold the weights.

A dense converter reads the source file, renames every tensor to the vitasks model's name
(taking each source key exactly once through :class:`KeyTaker`; a key left over or missing is an
error naming the file and the keys), infers the architecture from the shapes (depth, width,
heads from the relative-position tables, window and global blocks, head layouts, class count)
and returns a :class:`DenseSource`: the state dict and the ``model`` config that holds it.
:meth:`DenseSource.to_vitasks` then builds that model on the meta device (no memory, no
initialisation) and checks that the state dict has every key of the model, no other key, and
every shape equal (the backbone's ``pos_embed`` may have another grid: it is resampled at load
time exactly as the source resamples it at run time).
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from vitasks.errors import CheckpointError

StateDict = Dict[str, torch.Tensor]

#: COCO 2017's 80 thing categories: ids (not contiguous) and names, in id order. detectron2 and
#: mmdetection number them 0..79 in this order, and so does vitasks' CocoDataset (sorted ids).
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90,
)
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
assert len(COCO_CATEGORY_IDS) == len(COCO_CLASSES) == 80

#: Keys whose shape may differ from the model's because the model resamples them on loading.
RESAMPLED_AT_LOAD = ("backbone.pos_embed",)

_ROOT = Path(__file__).resolve().parents[2]


def read_openmmlab_file(path: str, toolbox: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(state_dict, meta)`` of an OpenMMLab ``toolbox`` checkpoint (mmdetection,
    mmsegmentation), read with weights_only."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    from vitasks.engine.checkpoint import load_checkpoint_file

    obj = load_checkpoint_file(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected an {toolbox} checkpoint dict, found a {type(obj).__name__}")
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: its state_dict is a {type(sd).__name__}")
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    return dict(sd), meta


def to_tensor(value: Any, source: str, key: str) -> torch.Tensor:
    """A float32 (or integer) tensor owning its memory, from a numpy array or a tensor."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value).copy())
    elif isinstance(value, np.generic):
        value = torch.tensor(value.item())
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{source}: {key} is a {type(value).__name__}, expected an array")
    value = value.detach()
    if value.is_floating_point():
        value = value.to(torch.float32)
    return value.clone(memory_format=torch.contiguous_format)


class KeyTaker:
    """Takes every key of a source state dict exactly once.

    ``take(key)`` returns the tensor and marks the key consumed (a missing key is an error
    naming the file); ``finish()`` raises if any key was never taken. ``key_map`` records
    source key -> vitasks key(s) for what was taken.
    """

    def __init__(self, state_dict: Mapping[str, Any], source: str) -> None:
        self.sd = dict(state_dict)
        self.source = source
        self.taken: Dict[str, str] = {}
        self.out: StateDict = {}

    def has(self, key: str) -> bool:
        return key in self.sd

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self.get(key).shape)

    def get(self, key: str) -> torch.Tensor:
        """The tensor without consuming it (for shape inference)."""
        if key not in self.sd:
            raise CheckpointError(f"{self.source}: expected weight {key!r} is missing")
        value = self.sd[key]
        return value if isinstance(value, torch.Tensor) else to_tensor(value, self.source, key)

    def take(self, key: str, new_key: Optional[str] = None) -> torch.Tensor:
        if key in self.taken:
            raise CheckpointError(f"{self.source}: {key!r} would be used twice")  # a converter bug
        value = to_tensor(self.sd[key], self.source, key) if key in self.sd else self.get(key)
        self.taken[key] = new_key or ""
        if new_key is not None:
            if new_key in self.out:
                raise CheckpointError(f"{self.source}: two weights map to {new_key!r}")
            self.out[new_key] = value
        return value

    def move(self, key: str, new_key: str) -> None:
        self.take(key, new_key)

    def move_prefix(self, prefix: str, new_prefix: str, names: Iterable[str]) -> None:
        for name in names:
            self.take(prefix + name, new_prefix + name)

    def indices(self, prefix: str) -> List[int]:
        """Sorted i of the keys ``{prefix}{i}.*`` (or ``{prefix}{i}`` followed by a dot)."""
        pat = re.compile(re.escape(prefix) + r"(\d+)\.")
        return sorted({int(m.group(1)) for k in self.sd for m in [pat.match(k)] if m})

    def finish(self) -> None:
        left = sorted(k for k in self.sd if k not in self.taken)
        if left:
            raise CheckpointError(
                f"{self.source}: {len(left)} weights have no counterpart in the vitasks model (an "
                f"architecture the converter does not know?): {left[:12]}"
            )


# --------------------------------------------------------------------------------------------
# Class order


def class_permutation(source_ids: Sequence[int], target_ids: Sequence[int], source: str) -> List[int]:
    """``perm`` with ``target_row[i] = source_row[perm[i]]``: the source's class ``perm[i]`` is
    the target's class ``i`` (both given as category ids in class order)."""
    if sorted(source_ids) != sorted(target_ids):
        raise CheckpointError(
            f"{source}: the checkpoint's classes (category ids {list(source_ids)[:10]}...) are not "
            f"the dataset's ({list(target_ids)[:10]}...)"
        )
    index = {cat: i for i, cat in enumerate(source_ids)}
    return [index[cat] for cat in target_ids]


def permute_rows(t: torch.Tensor, perm: Sequence[int], group: int = 1, extra: int = 0) -> torch.Tensor:
    """Rows of ``t`` in groups of ``group`` (4 for box deltas) reordered by ``perm``; the last
    ``extra`` rows (the background logit) stay last."""
    if list(perm) == list(range(len(perm))):
        return t
    n = len(perm) * group
    head = t[:n].reshape(len(perm), group, *t.shape[1:])[list(perm)].reshape(n, *t.shape[1:])
    return torch.cat([head, t[n:n + extra]]) if extra else head.contiguous()


# --------------------------------------------------------------------------------------------
# The config text OpenMMLab checkpoints store (mmcv: meta["config"], mmengine: meta["cfg"])


def config_section(text: Any, name: str) -> str:
    """The text of ``name=dict(...)`` (balanced parentheses) in a stored config, or ""."""
    if not isinstance(text, str):
        return ""
    m = re.search(r"\b" + re.escape(name) + r"\s*=\s*dict\(", text)
    if not m:
        return ""
    depth, start = 0, m.end() - 1
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1:i]
    return text[start + 1:]


def _top_level(section: str) -> str:
    """``section`` with every nested ``(...)``/``[...]`` of dicts removed except lists of numbers."""
    out, depth = [], 0
    for ch in section:
        if ch == "(":
            depth += 1
        if depth == 0:
            out.append(ch)
        if ch == ")":
            depth -= 1
    return "".join(out)


def config_int(section: str, key: str) -> Optional[int]:
    m = re.search(r"\b" + re.escape(key) + r"\s*=\s*(-?\d+)\b(?!\.)", _top_level(section))
    return int(m.group(1)) if m else None


def config_ints(section: str, key: str) -> Optional[List[int]]:
    m = re.search(r"\b" + re.escape(key) + r"\s*=\s*[\[\(]([-\d,\s]*)[\]\)]", section)
    return [int(x) for x in re.findall(r"-?\d+", m.group(1))] if m else None


def config_ln_eps(section: str) -> Optional[float]:
    """The eps of ``norm_cfg=dict(type='LN'[, eps=...])`` in ``section``: the stated value, or
    PyTorch's LayerNorm default 1e-5 when none is stated; None without such a norm_cfg."""
    norm = config_section(section, "norm_cfg")
    if not re.search(r"type\s*=\s*['\"]LN['\"]", norm):
        return None
    m = re.search(r"\beps\s*=\s*([0-9.eE+-]+)", norm)
    return float(m.group(1)) if m else 1e-5


# --------------------------------------------------------------------------------------------
# The check against the vitasks model


def build_meta_model(model_cfg: Mapping[str, Any]) -> torch.nn.Module:
    """The vitasks model of ``model_cfg`` built on the meta device (no memory, no init cost)."""
    import vitasks.models  # noqa: F401  (registers the components)
    from vitasks.registry import MODELS

    with torch.device("meta"):
        return MODELS.build(copy.deepcopy(dict(model_cfg)))


def compare_with_model(
    state_dict: Mapping[str, torch.Tensor],
    model_cfg: Mapping[str, Any],
    resampled: Sequence[str] = RESAMPLED_AT_LOAD,
) -> Dict[str, List[str]]:
    """``missing`` (model keys not in the state dict), ``unexpected`` (the reverse) and
    ``shapes`` (``key: checkpoint (..) vs model (..)``) of ``state_dict`` against the model
    ``model_cfg`` builds; keys in ``resampled`` may differ in shape."""
    expected = {k: tuple(v.shape) for k, v in build_meta_model(model_cfg).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state_dict.items()}
    shapes = [
        f"{k}: checkpoint {have[k]} vs model {expected[k]}"
        for k in sorted(set(have) & set(expected))
        if have[k] != expected[k] and k not in resampled
    ]
    return dict(
        missing=sorted(set(expected) - set(have)), unexpected=sorted(set(have) - set(expected)), shapes=shapes
    )


def check_with_model(state_dict: Mapping[str, torch.Tensor], model_cfg: Mapping[str, Any], source: str) -> None:
    """Raise :class:`CheckpointError` unless ``state_dict`` fits ``model_cfg`` exactly."""
    report = compare_with_model(state_dict, model_cfg)
    problems = []
    if report["missing"]:
        problems.append(f"missing {report['missing'][:10]}")
    if report["unexpected"]:
        problems.append(f"not in the model {report['unexpected'][:10]}")
    if report["shapes"]:
        problems.append(f"shapes differ: {report['shapes'][:6]}")
    if problems:
        raise CheckpointError(f"{source}: the converted weights do not fit the inferred vitasks model: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# Config options


def _defaults(type_name: Any) -> Dict[str, Any]:
    """The constructor defaults of the registered component ``type_name`` ({} if unknown),
    followed up its MRO while an ``__init__`` passes ``**kwargs`` on (as config validation does)."""
    import inspect

    import vitasks.models  # noqa: F401
    from vitasks.registry import MODELS

    cls = MODELS.get(type_name) if isinstance(type_name, str) else None
    defaults: Dict[str, Any] = {}
    for owner in cls.__mro__ if cls is not None else ():
        if "__init__" not in vars(owner):
            continue
        params = inspect.signature(owner.__init__).parameters.values()
        for p in params:
            if p.default is not inspect.Parameter.empty:
                defaults.setdefault(p.name, p.default)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            break
    return defaults


def config_differences(hint: Any, config: Any, prefix: str = "model") -> List[str]:
    """``KEY=VALUE`` options (dotted keys, YAML flow values) that make ``config`` agree with
    ``hint`` wherever the hint says something (keys the hint leaves out are not compared, keys
    the config leaves out are compared with the component's default; a sub-dict whose ``type``
    differs is given whole)."""
    import yaml

    def show(v: Any) -> str:
        return yaml.safe_dump(v, default_flow_style=True, width=10_000, sort_keys=False).strip().removesuffix("...").strip()

    if isinstance(hint, Mapping) and isinstance(config, Mapping) and hint.get("type") == config.get("type", hint.get("type")):
        defaults = _defaults(hint.get("type"))
        out = []
        for key, value in hint.items():
            if key in config:
                out += config_differences(value, config[key], f"{prefix}.{key}")
            elif key not in defaults or config_differences(value, defaults[key], prefix):
                out.append(f"{prefix}.{key}={show(value)}")
        return out
    if isinstance(hint, (list, tuple)) and isinstance(config, (list, tuple)):
        same = len(hint) == len(config) and all(not config_differences(a, b, prefix) for a, b in zip(hint, config))
        return [] if same else [f"{prefix}={show(list(hint))}"]
    if isinstance(hint, float) or isinstance(config, float):
        try:
            if float(hint) == float(config) and not isinstance(hint, bool) and not isinstance(config, bool):
                return []
        except (TypeError, ValueError):
            pass
    if hint == config and type(hint) is type(config):
        return []
    if isinstance(hint, Mapping) and isinstance(config, Mapping):  # another component: replace it
        return [f"{prefix}={show({'_delete_': True, **hint})}"]
    return [f"{prefix}={show(hint)}"]


def shipped_config_options(model_hint: Mapping[str, Any], config: str) -> Optional[List[str]]:
    """The ``--cfg-options`` that make the shipped ``config`` (relative to the repository root)
    build ``model_hint``; None when the config file is not there (an installed package)."""
    path = _ROOT / config
    if not path.is_file():
        return None
    from vitasks.config import load_config

    cfg = load_config(str(path))
    return config_differences(model_hint, cfg.model)


# --------------------------------------------------------------------------------------------
# The converted checkpoint


@dataclass
class DenseSource:
    """A whole detector or segmentor read into vitasks names.

    Attributes:
        fmt: converter name (``detectron2``, ``mmdet``, ``mmseg``).
        path: the file read.
        state_dict: the weights under the vitasks model's names.
        model: the vitasks ``model`` config whose state dict these are (its modules' settings
            are the source's: what the weights need, and what changes outputs).
        config: the shipped config this model belongs to (``configs/det_coco.yaml`` ...).
        key_map: source key -> vitasks key ("" for a key consumed without a counterpart, such
            as a buffer recomputed by the model).
        dataset_meta: ``classes`` and (detection) ``cat_ids`` in the model's class order.
        published: the numbers the source reports for these weights (for the docs).
        notes: messages for the user.
    """

    fmt: str
    path: str
    state_dict: StateDict
    model: Dict[str, Any]
    config: str
    key_map: Dict[str, str] = field(default_factory=dict)
    dataset_meta: Dict[str, Any] = field(default_factory=dict)
    published: str = ""
    notes: List[str] = field(default_factory=list)

    def to_vitasks(self, opts: Any = None) -> Tuple[StateDict, Dict[str, Any]]:
        check_with_model(self.state_dict, self.model, self.path)
        from vitasks.engine.architecture import architecture_from_config

        backbone = {k: v for k, v in self.model["backbone"].items() if k != "type"}
        options = shipped_config_options(self.model, self.config)
        meta = dict(
            converted_from=self.fmt,
            source=os.path.abspath(self.path),
            task=self.model["type"],
            model_hint=copy.deepcopy(self.model),
            config_hint=backbone,
            architecture=architecture_from_config(backbone),
            config=self.config,
            cfg_options=options,
            dataset_meta=dict(self.dataset_meta),
            published=self.published,
            notes=list(self.notes),
        )
        return dict(self.state_dict), meta

    def describe(self, meta: Mapping[str, Any]) -> str:
        b = meta["model_hint"]["backbone"]
        lines = [
            f"converted {meta['converted_from']} checkpoint {meta['source']}",
            f"  model: {meta['task']} on VisionTransformer embed_dim={b['embed_dim']} depth={b['depth']} "
            f"num_heads={b['num_heads']} norm_eps={b.get('norm_eps')}; {len(self.state_dict)} weights, "
            f"every source key used once, every model key present",
            f"  config: {meta['config']}",
        ]
        if meta.get("cfg_options"):
            lines.append("  with --cfg-options " + " ".join(f"'{o}'" for o in meta["cfg_options"]))
        elif meta.get("cfg_options") is not None:
            lines.append("  (the config holds these weights as it is)")
        options = meta.get("cfg_options") or []
        test = f"python tools/test.py {meta['config']} {meta.get('output') or 'CONVERTED.pth'}"
        if options:
            test += " --cfg-options " + " ".join(f"'{o}'" for o in options)
        lines.append(f"  test: {test}")
        if meta.get("published"):
            lines.append(f"  published: {meta['published']}")
        lines += [f"  note: {n}" for n in meta.get("notes", [])]
        return "\n".join(lines)
