"""Reading plain pickles (detectron2's model-zoo ``.pkl`` files) without running code.

A pickle is a small program: ``GLOBAL``/``STACK_GLOBAL`` look up any importable callable and
``REDUCE`` calls it, so ``pickle.load`` on an untrusted file can run anything (a ``__reduce__``
returning ``(os.system, ("...",))`` is the classic example). detectron2's model zoo stores its
weights as ``{"model": {name: numpy array}, "__author__": ..., "matching_heuristics": ...}``,
which needs only dicts, lists, strings, numbers and numpy arrays.

:class:`RestrictedUnpickler` resolves exactly the globals such a file needs and refuses every
other one before anything is called:

- numpy's array reconstruction (``numpy.core.multiarray._reconstruct`` and its numpy 2 name
  ``numpy._core.multiarray._reconstruct``), the ``numpy.ndarray`` class it rebuilds, numpy
  scalars (``numpy.core.multiarray.scalar``), protocol 5's ``numpy.core.numeric._frombuffer``
  and ``numpy.dtype``, which refuses object dtypes
  (an object array would unpickle arbitrary Python objects inside it);
- ``collections.OrderedDict`` (a dict);
- ``_codecs.encode`` restricted to ``(str, "latin1")`` -> bytes, which protocol-2 pickles
  written by Python 3 use for raw bytes (the array buffers).

Anything else raises :class:`~vitasks.errors.CheckpointError` naming the file and the global.
After loading, the result is walked once more and must consist only of dicts, lists, tuples,
strings, bytes, numbers, booleans, None and numeric numpy arrays.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
from typing import Any, Callable, Dict, Tuple

import numpy as np

from vitasks.errors import CheckpointError

__all__ = ["RestrictedUnpickler", "load_plain_pickle", "loads_plain_pickle"]


def _numpy_multiarray():
    try:  # numpy >= 2
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    return multiarray


def _safe_dtype(*args, **kwargs) -> np.dtype:
    dtype = np.dtype(*args, **kwargs)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"object dtype {dtype!r} is not allowed (it would unpickle Python objects)")
    return dtype


def _safe_encode(text: Any, encoding: str = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode is only allowed as (str, 'latin1'), got ({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _reconstruct(subtype, shape, dtype):
    # numpy's _reconstruct builds an empty array of `subtype`; only ndarray itself is allowed.
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"array subtype {subtype!r} is not allowed")
    return _numpy_multiarray()._reconstruct(subtype, shape, _safe_dtype(dtype))


def _frombuffer(buffer, dtype, shape, order):
    # numpy's pickles at protocol 5: the array from its (in-band) buffer.
    return np.frombuffer(buffer, dtype=_safe_dtype(dtype)).reshape(shape, order=order)


def _allowed_globals() -> Dict[Tuple[str, str], Callable]:
    multiarray = _numpy_multiarray()
    allowed: Dict[Tuple[str, str], Callable] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): _safe_encode,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _safe_dtype,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = _reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = _frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` that resolves only the globals of plain numpy data (see the
    module docstring) and refuses every other one, naming ``source``."""

    def __init__(self, file, source: str) -> None:
        super().__init__(file, encoding="latin1")  # Python 2 pickles (detectron1 blobs) too
        self.source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise CheckpointError(
                f"refusing to load {self.source!r}: the pickle refers to {module}.{name}, and only "
                "dicts, lists, strings, numbers and numpy arrays are read from pickles (anything "
                "else could run code)"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(
            f"refusing to load {self.source!r}: it uses persistent ids (a torch.save file?); "
            "only plain pickles of dicts, lists, strings, numbers and numpy arrays are read here"
        )


_PLAIN = (str, bytes, int, float, bool, type(None))


def _check_plain(obj: Any, source: str, where: str = "") -> None:
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise CheckpointError(f"{source}: {where or 'the file'} is an object array, which is not read")
        return
    if isinstance(obj, np.generic):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_plain(key, source, where)
            _check_plain(value, source, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, source, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"{source}: {where or 'the file'} holds a {type(obj).__name__}; only dicts, lists, strings, "
        "numbers and numpy arrays are read from pickles"
    )


def loads_plain_pickle(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` and check the result is plain data."""
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), source).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise CheckpointError(f"cannot read {source!r} as a plain pickle: {e}") from e
    _check_plain(obj, source)
    return obj


def load_plain_pickle(path: str) -> Any:
    """Read the pickle file ``path`` (e.g. a detectron2 ``.pkl``) without running code; raises
    :class:`CheckpointError` naming the file for anything but plain data."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        data = f.read()
    return loads_plain_pickle(data, path)
