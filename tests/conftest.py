import os
import weakref

# Passive OpenMP threads: on a 2-core machine shared with anything else, spinning threads make
# torch 5-100x slower. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.utils.data  # noqa: E402
import yaml  # noqa: E402

# Two cores on CI: keep torch from oversubscribing them when pytest runs test files in one process.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# A runner's DataLoader iterators with (persistent) worker processes outlive train()/test(); left
# to the garbage collector, they are shut down in some later test, where torch's shutdown then
# waits its full 5 s timeout per iterator. Shut them down at the end of the test that started them.
_WORKER_ITERATORS = weakref.WeakSet()
_MPIter = getattr(torch.utils.data.dataloader, "_MultiProcessingDataLoaderIter", None)
if _MPIter is not None and hasattr(_MPIter, "_shutdown_workers"):
    _mp_iter_init = _MPIter.__init__

    def _tracked_init(self, loader):
        _mp_iter_init(self, loader)
        _WORKER_ITERATORS.add(self)

    _MPIter.__init__ = _tracked_init


@pytest.fixture(autouse=True)
def _stop_dataloader_workers():
    yield
    for iterator in list(_WORKER_ITERATORS):
        iterator._shutdown_workers()
    _WORKER_ITERATORS.clear()


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
