"""albumentations is imported only when a pipeline builds an Albu transform: importing
vitasks.data (every tool start, every torchrun worker) does not pay its second of import time."""

import os
import subprocess
import sys

CODE = r"""
import sys
import numpy as np
import vitasks.data
import vitasks.apis
assert "albumentations" not in sys.modules, "importing vitasks.data imported albumentations"

from vitasks.errors import ConfigError
from vitasks.registry import TRANSFORMS

# A misspelt name is still answered with albumentations' nearest names.
try:
    TRANSFORMS.build(dict(type="Albu", transforms=[dict(type="HorizontalFlipp")]))
except ConfigError as e:
    assert "albumentations has no transform 'HorizontalFlipp'" in str(e), e
    assert "did you mean HorizontalFlip" in str(e), e
else:
    raise AssertionError("a misspelt albumentations name was accepted")
assert "albumentations" in sys.modules

albu = TRANSFORMS.build(dict(type="Albu", transforms=[dict(type="HorizontalFlip", p=1.0)]))
img = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
mask = np.arange(4 * 5, dtype=np.uint8).reshape(4, 5)
out = albu({"img": img.copy(), "gt_seg_map": mask.copy()})
assert (out["img"] == img[:, ::-1]).all() and (out["gt_seg_map"] == mask[:, ::-1]).all()
import albumentations
assert isinstance(albu._compose, albumentations.Compose)
print("ok")
"""


def test_importing_vitasks_data_does_not_import_albumentations_until_an_albu_is_built():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")
