"""Label values <-> class ids (reduce_zero_label) and where the setting comes from."""

import numpy as np
import pytest

from vitasks.data.seg_labels import (
    configured_reduce_zero_label,
    encode_label_map,
    reduce_zero,
    sample_reduce_zero_label,
)
from vitasks.structures import DataSample


def test_reduce_zero_then_encode_gives_the_label_values_back():
    values = np.array([[0, 1, 2], [150, 255, 7]], dtype=np.uint8)
    ids = reduce_zero(values, ignore_index=255)
    # By hand: 0 -> ignored, v -> v - 1, 255 stays ignored.
    np.testing.assert_array_equal(ids, [[255, 0, 1], [149, 255, 6]])
    classes = ids != 255
    np.testing.assert_array_equal(encode_label_map(ids, reduce_zero_label=True)[classes], values[classes])
    np.testing.assert_array_equal(encode_label_map(ids, reduce_zero_label=False), ids)


def test_encode_uses_16_bits_only_when_needed():
    assert encode_label_map(np.array([[254]]), True).dtype == np.uint8
    wide = encode_label_map(np.array([[255]]), True)
    assert wide.dtype == np.uint16 and wide[0, 0] == 256


@pytest.mark.parametrize("own, default, expected", [
    (True, False, True), (False, True, False), (None, True, True), (None, None, False),
])
def test_the_sample_flag_wins_then_the_default(own, default, expected):
    meta = {} if own is None else {"reduce_zero_label": own}
    assert sample_reduce_zero_label(dict(meta), default) is expected
    assert sample_reduce_zero_label(DataSample(metainfo=meta), default) is expected


def test_configured_value_from_the_test_dataset():
    def cfg(**dataset):
        return {"test_dataloader": {"dataset": {"pipeline": [], **dataset}}}

    assert configured_reduce_zero_label(cfg(type="ADE20KDataset")) is True  # the class default
    assert configured_reduce_zero_label(cfg(type="ADE20KDataset", reduce_zero_label=False)) is False
    assert configured_reduce_zero_label(cfg(type="SegFolderDataset")) is False
    assert configured_reduce_zero_label(cfg(type="NoSuchDataset")) is None
    wrapped = {"val_dataloader": {"dataset": {"type": "RepeatDataset", "dataset": cfg(type="ADE20KDataset")[
        "test_dataloader"]["dataset"]}}}
    assert configured_reduce_zero_label(wrapped) is True
