"""Safe checkpoint loading.

Every checkpoint vitasks reads goes through :func:`load_checkpoint_file`: ``.safetensors`` files
through safetensors, everything else through ``torch.load(weights_only=True)``. A pickle that
would import or call anything outside an explicit allowlist is refused with a
:class:`~vitasks.errors.CheckpointError`; ``weights_only`` is never switched off.

mmengine (0.10.x) calls ``torch.load`` without ``weights_only``; since torch 2.6 that means
``weights_only=True`` without an allowlist, and its own checkpoints cannot be read back
("Unsupported global ... HistoryBuffer"). The allowlist below is what an mmengine checkpoint
holds besides tensors, found by experiment (``torch.serialization.get_unsafe_globals_in_checkpoint``
on checkpoints written by the Runner):

- ``mmengine.logging.HistoryBuffer`` (the message hub's logged scalars), whose pickled state names
  its statistics methods through ``getattr(HistoryBuffer, "min")``: ``builtins.getattr`` is mapped
  to :func:`_history_buffer_method`, which only resolves those names on that class;
- numpy arrays and scalars inside it and in ``meta`` (``ndarray``, ``_reconstruct``, ``scalar``,
  ``dtype`` and the concrete dtype classes that ``dtype(...)`` returns, which BUILD checks), under
  both the numpy 2 (``numpy._core``) and numpy 1 (``numpy.core``) module paths.

Importing this module also registers :func:`load_checkpoint_file` as mmengine's loader for local
paths, so mmengine's own ``load_checkpoint`` (``init_cfg=dict(type="Pretrained")``, the Runner's
resume) reads through it too.

Recorded architectures: a checkpoint whose ``meta`` records the backbone it came from
(``meta["architecture"]``, written by the converters; see :mod:`vitasks.engine.architecture`)
is returned with its state dict as a :class:`RecordedStateDict`, which carries that record to
:func:`load_model_weights` whoever loads it (``load_from`` through the Runner, ``init_model``,
``tools/test.py``). There the record is compared with the model's built backbone, and every
setting that changes outputs and differs (``norm_eps: checkpoint 1e-12, config 1e-06``) is named
in one warning per load.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import torch
from mmengine.logging import HistoryBuffer, print_log
from mmengine.runner.checkpoint import CheckpointLoader

from vitasks.engine.architecture import (
    architecture_mismatches,
    backbone_architecture,
    checkpoint_architecture,
    format_mismatches,
)
from vitasks.errors import CheckpointError

__all__ = [
    "RecordedStateDict",
    "load_checkpoint_file",
    "load_state_dict_file",
    "get_state_dict",
    "load_model_weights",
    "check_architecture",
    "is_head_key",
    "SAFE_GLOBALS",
]

# The names under which HistoryBuffer pickles its statistics methods (mmengine's defaults).
_HISTORY_BUFFER_METHODS = ("min", "max", "current", "mean")


def _history_buffer_method(obj: Any, name: str):
    """Stand-in for ``builtins.getattr`` while unpickling: only ``HistoryBuffer.<statistic>``."""
    if obj is HistoryBuffer and name in _HISTORY_BUFFER_METHODS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f"getattr({obj!r}, {name!r}) is not allowed: only HistoryBuffer statistics methods "
        f"{_HISTORY_BUFFER_METHODS} may be looked up"
    )


def _numpy_globals() -> list:
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    entries: list = [np.ndarray, np.dtype]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        entries.append((multiarray._reconstruct, f"{mod}._reconstruct"))
        entries.append((multiarray.scalar, f"{mod}.scalar"))
    # BUILD on a dtype checks the type of the instance, e.g. numpy.dtypes.Float64DType.
    for code in "?bhilqBHILQefdgFDGUS":
        entries.append(type(np.dtype(code)))
    return entries


SAFE_GLOBALS: list = [
    HistoryBuffer,
    (_history_buffer_method, "builtins.getattr"),
    *_numpy_globals(),
]


# Phrases of torch's weights-only unpickler (and ours) when a pickle asks for code it may not run.
_CODE_MARKERS = (
    "Unsupported global",
    "is blocked",
    "Trying to call reduce",
    "Can only build",
    "Can only create new object",
    "is not allowed",
    "must be imported to load",
)


def _is_safetensors(path: str) -> bool:
    return str(path).endswith(".safetensors")


class RecordedStateDict(OrderedDict):
    """A state dict that carries the backbone architecture its checkpoint records
    (``architecture``, see :mod:`vitasks.engine.architecture`), so that
    :func:`load_model_weights` can check it whichever caller passes the weights on.

    It pickles (``torch.save``), copies and deep-copies as a plain ``OrderedDict``: a checkpoint
    saved again holds nothing that ``torch.load(weights_only=True)`` would refuse.
    """

    def __init__(self, *args, architecture: Optional[dict] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.architecture = architecture

    def __reduce__(self):
        return (OrderedDict, (), None, None, iter(self.items()))


def _with_architecture(checkpoint: Any) -> Any:
    """``checkpoint`` with its ``state_dict`` as a :class:`RecordedStateDict` when its ``meta``
    records an architecture (as it is otherwise)."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), Mapping):
        return checkpoint
    architecture = checkpoint_architecture(checkpoint.get("meta"))
    if architecture is not None:
        checkpoint["state_dict"] = RecordedStateDict(checkpoint["state_dict"], architecture=architecture)
    return checkpoint


def _load_safetensors(path: str) -> Any:
    """The tensors of a ``.safetensors`` file; a file vitasks wrote (its meta as JSON metadata
    under ``vitasks_meta``) comes back as ``{"state_dict": ..., "meta": ...}``, as it was saved."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read safetensors file {path!r}: {e}") from e
    if "vitasks_meta" not in metadata:
        return tensors
    try:
        meta = json.loads(metadata["vitasks_meta"])
    except ValueError as e:
        raise CheckpointError(f"{path!r}: its vitasks_meta metadata is not valid JSON ({e})") from e
    return _with_architecture({"state_dict": tensors, "meta": meta if isinstance(meta, dict) else {}})


def load_checkpoint_file(path: str, map_location: Any = "cpu") -> Any:
    """Read a checkpoint file safely and return what it holds (usually a dict).

    A checkpoint whose ``meta`` records its backbone's architecture has its ``state_dict`` as a
    :class:`RecordedStateDict`; a ``.safetensors`` file written by vitasks (with
    ``vitasks_meta`` metadata) is returned as ``{"state_dict": ..., "meta": ...}``.

    Args:
        path: a ``.safetensors`` file or anything ``torch.save`` wrote.
        map_location: as for :func:`torch.load` (ignored for safetensors, which load on CPU).

    Raises:
        CheckpointError: the file is missing, unreadable, or a pickle that would run code.
    """
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path!r} does not exist")
    if _is_safetensors(path):
        return _load_safetensors(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if not any(marker in text for marker in _CODE_MARKERS):
            detail = re.search(r"WeightsUnpickler error: \s*(.+?)\s*(?:\n|$)", text)
            raise CheckpointError(
                f"cannot read checkpoint file {path!r}: not a valid torch checkpoint "
                f"({detail.group(1) if detail else text.splitlines()[0]})"
            ) from e
        found = re.search(r"GLOBAL (\S+)", text) or re.search(r"function (\S+)", text)
        what = f" (it refers to {found.group(1)})" if found else ""
        raise CheckpointError(
            f"refusing to load {path!r}: it is a pickle that would run code{what}. Only tensors, "
            "plain containers and mmengine's checkpoint records are loaded (torch.load with "
            "weights_only=True); convert the file to .safetensors, or re-save its state dict "
            "with torch.save from a trusted environment."
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint file {path!r}: {e}") from e
    return _with_architecture(checkpoint)


def get_state_dict(checkpoint: Mapping, source: str = "checkpoint") -> dict:
    """The model weights inside a loaded checkpoint.

    Accepts an mmengine/vitasks checkpoint (``state_dict`` key), the ``model`` (or ``module``)
    key used by many research repositories, or a bare state dict.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f"{source} holds a {type(checkpoint).__name__}, expected a dict of tensors "
            "(or a dict with a 'state_dict' or 'model' entry)"
        )
    for key in ("state_dict", "model", "module"):
        if isinstance(checkpoint.get(key), Mapping):
            return _copy_state_dict(checkpoint[key])
    return _copy_state_dict(checkpoint)


def _copy_state_dict(state_dict: Mapping) -> dict:
    # A shallow copy that keeps the recorded architecture, if any.
    if isinstance(state_dict, RecordedStateDict):
        return RecordedStateDict(state_dict, architecture=state_dict.architecture)
    return dict(state_dict)


def load_state_dict_file(path: str) -> dict:
    """Load the weights of an outside checkpoint file as a flat ``{name: tensor}`` dict.

    ``.safetensors`` files load through safetensors, anything else through
    ``torch.load(weights_only=True)`` (with only the allowlist of this module), so a file can
    never run code. A ``state_dict``, ``model`` or ``module`` entry holding a dict is unwrapped
    (mmengine, MAE/DeiT style); a bare state dict is returned as it is.

    Raises:
        CheckpointError: missing file, a pickle that would run code (naming the file), or
            contents that are not a dict.
    """
    return get_state_dict(load_checkpoint_file(path), source=f"checkpoint file {path!r}")


def _mmengine_local_loader(filename: str, map_location: Any = None) -> Any:
    return load_checkpoint_file(filename, map_location=map_location)


# mmengine looks loaders up by prefix; '' is the local-path scheme (replacing its bare torch.load).
CheckpointLoader.register_scheme(prefixes="", loader=_mmengine_local_loader, force=True)


def is_head_key(key: str) -> bool:
    """Whether a state-dict key belongs to a task head (``head``, ``decode_head``, ``rpn_head``...).

    The task models name their heads as the OpenMMLab toolboxes do: a top-level module called
    ``head``/``heads`` or ending in ``_head``.
    """
    if key.startswith("tasks.") and key.count(".") >= 2:  # a multi-task model's tasks.<name>.<key>
        key = key.split(".", 2)[2]
    top = key.split(".", 1)[0]
    return top in ("head", "heads") or top.endswith("_head") or top.endswith("_heads")


def _match_task_layout(model: torch.nn.Module, state_dict: dict) -> dict:
    """A single-task checkpoint into a multi-task model (``head.*`` -> ``tasks.<name>.head.*``,
    the model's ``adapt_state_dict``) and a multi-task checkpoint into a single-task model (the
    task that fits, without its ``tasks.<name>.`` prefix)."""
    if hasattr(model, "adapt_state_dict"):
        return model.adapt_state_dict(state_dict)
    if any(k.startswith("tasks.") for k in state_dict):
        from vitasks.models.tasks.multitask import single_task_state_dict

        return single_task_state_dict(state_dict, list(model.state_dict().keys()))
    return state_dict


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape (.+?) from checkpoint, "
    r"the shape in current model is (.+?)\.(?:\n|$)"
)


def load_model_weights(
    model: torch.nn.Module,
    state_dict: Mapping,
    source: str,
    skip_head_mismatch: bool = True,
    logger: str = "current",
    architecture: Optional[Mapping] = None,
) -> dict:
    """Load ``state_dict`` into ``model`` non-strictly, with the vitasks rules for shapes.

    - the backbone architecture the checkpoint records (``architecture``; by default the one a
      :class:`RecordedStateDict` carries) is compared with the model's built ``backbone``: the
      settings that differ are named, with both values, in one warning;
    - a ``module.`` prefix (a checkpoint saved from a DDP-wrapped model) is stripped;
    - missing and unexpected keys are logged;
    - with ``skip_head_mismatch``, task-head weights whose shapes differ from the model's (a new
      class count) are skipped and logged: the new head keeps its own initialisation;
    - any other shape difference raises :class:`CheckpointError` naming the first key and both
      shapes. The model's own load hooks run first, so a backbone that resamples its position
      embedding for another grid is not a mismatch.

    Returns:
        ``dict(missing=[...], unexpected=[...], skipped=[...], architecture=[...])``; the last
        lists ``(key, checkpoint value, model value)`` per differing backbone setting.
    """
    if architecture is None:
        architecture = getattr(state_dict, "architecture", None)
    mismatches = check_architecture(model, architecture, source, logger=logger)
    state_dict = {re.sub(r"^module\.", "", k): v for k, v in state_dict.items()}
    state_dict = _match_task_layout(model, state_dict)
    own = model.state_dict()
    skipped = []
    if skip_head_mismatch:
        for key, value in list(state_dict.items()):
            if (
                key in own
                and is_head_key(key)
                and hasattr(value, "shape")
                and tuple(value.shape) != tuple(own[key].shape)
            ):
                skipped.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}")
                del state_dict[key]
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:
        match = _SIZE_MISMATCH.search(str(e))
        if match is None:
            raise CheckpointError(f"cannot load the weights of {source}: {e}") from e
        key, ckpt_shape, model_shape = match.groups()
        raise CheckpointError(
            f"{source} does not fit the model: {key!r} has shape "
            f"{_shape(ckpt_shape)} in the checkpoint but {_shape(model_shape)} in the model "
            "(only task-head weights of another shape are skipped; check the backbone settings "
            "such as embed_dim, depth, patch_size)"
        ) from e
    skipped_keys = {s.split(":", 1)[0] for s in skipped}
    missing = [k for k in result.missing_keys if k not in skipped_keys]
    unexpected = list(result.unexpected_keys)
    if skipped:
        print_log(
            f"Skipped task-head weights of {source} whose shapes differ (the head keeps its "
            "initialisation): " + "; ".join(skipped),
            logger=logger,
            level=30,
        )
    if missing:
        print_log(f"Weights missing in {source}: {', '.join(missing)}", logger=logger, level=30)
    if unexpected:
        print_log(f"Unused weights in {source}: {', '.join(unexpected)}", logger=logger, level=30)
    return dict(missing=missing, unexpected=unexpected, skipped=sorted(skipped_keys), architecture=mismatches)


def check_architecture(
    model: torch.nn.Module, architecture: Optional[Mapping], source: str, logger: str = "current"
) -> list:
    """Compare a checkpoint's recorded backbone ``architecture`` with ``model.backbone`` as
    built; warn once, naming every setting that differs and both values. Returns the
    ``(key, checkpoint value, model value)`` list (empty when nothing to compare)."""
    if not isinstance(architecture, Mapping):
        return []
    built = backbone_architecture(getattr(model, "backbone", None))
    if built is None:
        return []
    mismatches = architecture_mismatches(architecture, built)
    if mismatches:
        print_log(
            f"{source} records a backbone that differs from this model's (model.backbone) in "
            f"settings that change the outputs: {format_mismatches(mismatches)}. The outputs will "
            "differ from the checkpoint's source model; set these in model.backbone to match it.",
            logger=logger,
            level=30,
        )
    return mismatches


def _shape(text: str) -> str:
    # torch prints "torch.Size([3, 16])"; show "(3, 16)".
    m = re.fullmatch(r"torch\.Size\(\[(.*)\]\)", text.strip())
    return f"({m.group(1)})" if m else text
