"""mmsegmentation UperNet checkpoints -> vitasks (work in progress)."""

from typing import Any

from vitasks.errors import CheckpointError


def read(path: str, opts: Any = None):
    raise CheckpointError("mmseg: not implemented yet")
