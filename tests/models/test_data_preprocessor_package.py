"""The data preprocessors live in one package, one module per task, under their registered names."""

import importlib

import pytest

from vitasks.registry import MODELS


@pytest.mark.parametrize(
    "name, module",
    [
        ("ClsDataPreprocessor", "vitasks.models.data_preprocessors.cls"),
        ("SegDataPreprocessor", "vitasks.models.data_preprocessors.seg"),
        ("Mixup", "vitasks.models.data_preprocessors.batch_augments"),
        ("CutMix", "vitasks.models.data_preprocessors.batch_augments"),
    ],
)
def test_registered_names_resolve_into_the_package(name, module):
    import vitasks.models  # noqa: F401  (registers)

    cls = MODELS.get(name)
    assert cls is not None and cls.__module__ == module
    # The package re-exports each class, so `from vitasks.models.data_preprocessors import X` works.
    package = importlib.import_module("vitasks.models.data_preprocessors")
    assert getattr(package, name) is cls


def test_the_old_segmentation_module_is_gone():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("vitasks.models.seg_data_preprocessor")
