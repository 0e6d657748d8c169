"""checks.ListOf: a list of what an annotation accepts, each entry's message naming key[i]."""

import pytest

from vitasks.checks import InRange, ListOf, OrNone, PositiveInt, checked
from vitasks.errors import ConfigError


class _Part:
    config_key = "model.part"

    @checked
    def __init__(self, sizes: ListOf(PositiveInt) = (1,), ratios: OrNone(ListOf(InRange(0, low_open=True))) = None,
                 extra: ListOf(PositiveInt, allow_empty=True) = ()) -> None:
        self.sizes, self.ratios, self.extra = sizes, ratios, extra


def test_list_of_normalises_to_a_tuple():
    part = _Part(sizes=[2, 3], ratios=[0.5, 2], extra=[])
    assert part.sizes == (2, 3) and part.ratios == (0.5, 2) and part.extra == ()
    assert _Part().ratios is None


@pytest.mark.parametrize("kwargs,message", [
    (dict(sizes=[2, 0]), r"model.part.sizes\[1\] must be a positive integer, got 0"),
    (dict(sizes=[2, True]), r"model.part.sizes\[1\] must be a positive integer, got True"),
    (dict(sizes=[]), r"model.part.sizes must not be empty"),
    (dict(sizes=3), r"model.part.sizes must be a list, got 3"),
    (dict(sizes="12"), r"model.part.sizes must be a list, got '12'"),
    (dict(ratios=[1, -1]), r"model.part.ratios\[1\] must be a number in \(0, inf\), got -1"),
])
def test_list_of_names_the_entry(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        _Part(**kwargs)
