"""Output folders of the generators: refuse to overwrite what they did not write, and mark what
they did (``synthetic.json`` with the parameters)."""

from __future__ import annotations

import json
import os
import shutil
from typing import Sequence

from vitasks.errors import DataError

MARKER = "synthetic.json"


def prepare_output(out_dir: str, subfolders: Sequence[str], writer: str) -> None:
    """Create ``out_dir``; when it holds an earlier generated dataset (it has the marker file),
    remove that dataset's ``subfolders`` (folders or files); a non-empty folder without the
    marker is refused."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not os.path.isfile(os.path.join(out_dir, MARKER)):
            raise DataError(
                f"{out_dir!r} is not empty and was not written by {writer}; choose an empty or new folder"
            )
        for sub in subfolders:
            path = os.path.join(out_dir, sub)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
    os.makedirs(out_dir, exist_ok=True)


def write_marker(out_dir: str, kind: str, classes: Sequence[str], seed: int, style: str, **params) -> None:
    """Write the generator's parameters to ``out_dir/synthetic.json``: the ``kind``, ``seed``,
    ``style``, the classes in label order (and their number), then the kind's own ``params``."""
    record = dict(kind=kind, seed=seed, style=style, num_classes=len(classes), classes=list(classes), **params)
    with open(os.path.join(out_dir, MARKER), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
