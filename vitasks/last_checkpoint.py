"""mmengine's ``last_checkpoint`` file: the one name of it and the one reader of it.

``tools/train.py`` (its ``CheckpointHook``, :class:`~vitasks.engine.hooks.AtomicCheckpointHook`)
writes the path of the newest checkpoint into ``<work_dir>/last_checkpoint`` after each save; the
Runner writes it too when a stopped run saves an interrupt checkpoint. Everything that wants "the
checkpoint this training run left" (the Runner's ``--resume``, ``tools/seeds.py``, the
token-tradeoff and multi-task benchmarks) reads it with :func:`read_last_checkpoint`, so a work
dir that was moved or copied resumes from its own newest checkpoint.

This module imports only :mod:`vitasks.errors` (no torch, no mmengine), so light orchestrators
such as :mod:`vitasks.benchmarks.seeds` use it without loading the Runner; it is outside
``vitasks/engine`` because importing any module there imports the whole engine package.
:mod:`vitasks.engine.runner` re-exports both names.

``--resume`` also falls back to the work dir's earlier checkpoints when the one named (or the file
itself) cannot be read (:meth:`vitasks.engine.runner.VitasksRunner.load_or_resume`).
"""

from __future__ import annotations

import os.path as osp
from typing import Optional

from vitasks.errors import CheckpointError

__all__ = ["LAST_CHECKPOINT", "read_last_checkpoint"]

# mmengine's CheckpointHook writes the path of the newest checkpoint into this file.
LAST_CHECKPOINT = "last_checkpoint"

_WRITTEN_BY = "it is written by tools/train.py (its CheckpointHook) each time training saves a checkpoint"


def read_last_checkpoint(work_dir: str, required: bool = True) -> Optional[str]:
    """The checkpoint path that ``work_dir``'s ``last_checkpoint`` file names.

    The path is returned as written (surrounding whitespace and the newline stripped) when it
    names a file. When it does not, but ``work_dir/<its basename>`` does, that is returned: a
    relative path written by a trainer run from another current directory, or a work dir that
    was moved. Otherwise the path is returned as written (whether it exists is the caller's
    question: a resume may fall back to an earlier checkpoint).

    A missing file gives ``None`` when not ``required``, else a
    :class:`~vitasks.errors.CheckpointError` naming the file; an empty or unreadable file is
    always a ``CheckpointError``.
    """
    marker = osp.join(work_dir, LAST_CHECKPOINT)
    try:
        with open(marker, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        if not required:
            return None
        raise CheckpointError(
            f"{marker} does not exist: {_WRITTEN_BY}; train into {work_dir} first, or name the "
            "checkpoint explicitly"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read {marker} ({err}); {_WRITTEN_BY}") from err
    path = text.strip()
    if not path:
        raise CheckpointError(
            f"{marker} is empty: expected the path of the newest checkpoint ({_WRITTEN_BY})"
        )
    if not osp.isfile(path):
        moved = osp.join(work_dir, osp.basename(path))
        if osp.isfile(moved):
            return moved
    return path
