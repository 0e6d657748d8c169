import os

# Passive OpenMP threads: on a 2-core machine shared with anything else, spinning threads make
# torch 5-100x slower. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

# Two cores on CI: keep torch from oversubscribing them when pytest runs test files in one process.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


TINY_CLASSES = ["red", "green", "blue"]


@pytest.fixture
def tiny_cls_config(tmp_path):
    """A factory writing a tiny classifier config (3 classes, 16 px, ViT of width 16) to
    ``tmp_path/tiny.yaml``. Its dataset folder does not exist: inference only reads the pipeline."""

    def write(img_size: int = 16, class_names: bool = True):
        cfg = {
            "default_scope": "vitasks",
            "num_classes": 3,
            "img_size": img_size,
            "model": {
                "type": "ImageClassifier",
                "backbone": {"type": "VisionTransformer", "img_size": "${img_size}", "patch_size": 4,
                             "embed_dim": 16, "depth": 2, "num_heads": 2},
                "head": {"type": "LinearClsHead", "num_classes": "${num_classes}", "in_channels": 16},
            },
            "test_dataloader": {
                "batch_size": 4,
                "dataset": {
                    "type": "ImageNetFolder",
                    "data_root": str(tmp_path / "no_such_dataset"),
                    "split": "val",
                    "pipeline": [
                        {"type": "LoadImage"},
                        {"type": "ResizeCenterCrop", "size": "${img_size}", "crop_ratio": 1.0},
                        {"type": "PackInputs"},
                    ],
                },
            },
        }
        if class_names:
            cfg["class_names"] = TINY_CLASSES
        path = tmp_path / "tiny.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return write
