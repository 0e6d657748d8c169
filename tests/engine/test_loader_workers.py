"""A finished train/test ends the worker processes its data loaders keep (persistent_workers):
left to the garbage collector, each is joined in some later gc.collect() with torch's 5 s
shutdown timeout (the next run in the same process, a distributed run's exit)."""

import multiprocessing

import numpy as np
from PIL import Image

from vitasks.engine import launch

from test_reproducibility import DEMO


def _tiny_set(root):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in range(2):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def _worker_processes():
    return [p for p in multiprocessing.active_children() if p.is_alive()]


def test_train_and_test_end_their_persistent_loader_workers(tmp_path):
    data = _tiny_set(tmp_path / "data")
    options = [f"data_root={data}", "num_classes=2", "img_size=32", "train_cfg.max_epochs=1",
               "train_cfg.val_interval=1", "train_dataloader.batch_size=4", "val_dataloader.batch_size=4",
               "test_dataloader.batch_size=4", "default_hooks.checkpoint.interval=1", "log_level=WARNING"]
    # The demo's loaders: one persistent worker each.
    assert _worker_processes() == []
    runner = launch.train(str(DEMO), work_dir=str(tmp_path / "work"), cfg_options=options)
    loaders = [runner.train_loop.dataloader, runner.val_loop.dataloader]
    assert all(loader.num_workers == 1 and loader.persistent_workers for loader in loaders)
    assert all(loader._iterator is None for loader in loaders)
    assert _worker_processes() == []

    checkpoint = (tmp_path / "work" / "last_checkpoint").read_text().strip()
    launch.test(str(DEMO), checkpoint, work_dir=str(tmp_path / "test"), cfg_options=options)
    assert _worker_processes() == []
