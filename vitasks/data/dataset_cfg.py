"""Reading dataset sections out of a config (no dataset is built)."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["test_dataset_cfg"]


def test_dataset_cfg(cfg: Mapping) -> dict | None:
    """The dataset config a config tests on: ``test_dataloader.dataset``, else
    ``val_dataloader.dataset``; through dataset wrappers (ConcatDataset, RepeatDataset, ...),
    which keep the real one under ``dataset`` or ``datasets``. ``None`` when there is none."""
    for key in ("test_dataloader", "val_dataloader"):
        loader = cfg.get(key)
        dataset = loader.get("dataset") if isinstance(loader, Mapping) else None
        while isinstance(dataset, Mapping) and "pipeline" not in dataset:
            dataset = dataset.get("dataset") or (dataset.get("datasets") or [None])[0]
        if isinstance(dataset, Mapping):
            return dataset
    return None


# pytest collects module-level functions named test_*; this one is not a test.
test_dataset_cfg.__test__ = False
