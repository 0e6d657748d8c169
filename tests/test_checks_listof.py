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


def test_options_checks_a_child_config():
    from vitasks.checks import options

    assert options({"a": 1}, "model.x", ["a", "b"], given={"b": 2}, parent="model") == {"a": 1, "b": 2}
    assert options({"b": 2}, "model.x", ["b"], given={"b": 2}, parent="model") == {"b": 2}  # the same value
    with pytest.raises(ConfigError, match=r"^model.x must be a dict with `a`, got \{'b': 1\}$"):
        options({"b": 1}, "model.x", what="a dict with `a`", required=("a",))
    with pytest.raises(ConfigError, match=r"^model.x must be a dict, got 3$"):
        options(3, "model.x")
    with pytest.raises(ConfigError, match=r"^model.x: unknown keys \['c'\] \(unknown arguments of Part\); "
                                          r"expected some of \['a'\]$"):
        options({"c": 1}, "model.x", ["a", "b"], owner="Part", given={"b": 2}, parent="model")
    with pytest.raises(ConfigError, match=r"^model.x.b is 3 but the b of model is 2; set it on model only$"):
        options({"b": 3}, "model.x", ["b"], given={"b": 2}, parent="model")


def test_divisible_both_or_neither_feature_maps_and_block_indices_without_depth():
    from vitasks.checks import block_indices, both_or_neither, divisible, feature_maps

    divisible("model.x", embed_dim=12, num_heads=4)
    with pytest.raises(ConfigError, match=r"^model.x: embed_dim \(10\) must be divisible by num_heads \(4\)$"):
        divisible("model.x", embed_dim=10, num_heads=4)
    both_or_neither("model.x", mean=None, std=None)
    both_or_neither("model.x", mean=[1], std=[2])
    with pytest.raises(ConfigError, match=r"^model.x: give both mean and std, or neither$"):
        both_or_neither("model.x", mean=[1], std=None)
    feature_maps([1, 2], 2, "model.neck", "rescales")
    feature_maps([1, 2, 3], 2, "model.roi_head", "levels", at_least=True)
    with pytest.raises(ConfigError, match=r"^model.neck: got 3 feature maps for 2 rescales;"):
        feature_maps([1, 2, 3], 2, "model.neck", "rescales")
    with pytest.raises(ConfigError, match=r"got 1 feature maps for 2 levels; the neck must give at least one"):
        feature_maps([1], 2, "model.roi_head", "levels", at_least=True, source="the neck")
    assert block_indices([-1, 3], None, "model.x") == (-1, 3)
    assert block_indices([-1, 3], 4, "model.x") == (3, 3)


def test_config_errors_and_component_class():
    from vitasks.checks import component_class, config_errors
    from vitasks.registry import MODELS
    import vitasks.models  # noqa: F401

    with pytest.raises(ConfigError, match=r"^model.head: bad size$"):
        with config_errors("model.head"):
            raise ValueError("bad size")
    with pytest.raises(ConfigError, match=r"^model.head.x must be 1$"):  # already names the key: unchanged
        with config_errors("model.head", ConfigError):
            raise ConfigError("model.head.x must be 1")
    with pytest.raises(TypeError):  # not one of the kinds asked for
        with config_errors("model.head"):
            raise TypeError("no")
    assert component_class("PatchEmbed", MODELS, "model.backbone.stem").__name__ == "PatchEmbed"
    with pytest.raises(ConfigError, match=r"^model.backbone.stem.type: 'PatchEmbedd' is not a registered stem "
                                          r"\(did you mean 'PatchEmbed'\?\); expected one of \['PatchEmbed', 'ConvStem'\]$"):
        component_class("PatchEmbedd", MODELS, "model.backbone.stem", "stem", choices=("PatchEmbed", "ConvStem"))
    with pytest.raises(ConfigError, match=r"'PatchEmbed' is not a registered token reduction"):
        component_class("PatchEmbed", MODELS, "model.x", "token reduction", base=int)


def test_block_index_and_unique_block_indices():
    from vitasks.checks import BlockIndex, BlockIndices

    class Part:
        config_key = "model.part"

        @checked
        def __init__(self, depth: int = 4, at: BlockIndex("depth") = 0,
                     blocks: BlockIndices("depth", unique=True) = ()) -> None:
            self.at, self.blocks = at, blocks

    assert Part(at=-1, blocks=[0, -1]).at == 3 and Part(blocks=[0, -1]).blocks == (0, 3)
    with pytest.raises(ConfigError, match=r"^model.part.at: 4 is not a block index of a depth-4 model \(expected an "
                                          r"integer in \[-4, 3\]\)$"):
        Part(at=4)
    with pytest.raises(ConfigError, match=r"model.part.at: 1.0 is not a block index"):
        Part(at=1.0)
    with pytest.raises(ConfigError, match=r"^model.part.blocks names a block twice \(counted from 0: \[3, 3\]\)$"):
        Part(blocks=[3, -1])


def test_list_of_single_value_and_any_entries():
    from vitasks.models.data_preprocessors.batch_augments import RandomBatchAugment

    class Part:
        config_key = "model.part"

        @checked
        def __init__(self, losses: ListOf(object, single=dict) = ({"type": "A"},)) -> None:
            self.losses = losses

    assert Part(losses={"type": "B"}).losses == ({"type": "B"},)
    assert Part(losses=[{"type": "B"}, 3]).losses == ({"type": "B"}, 3)
    with pytest.raises(ConfigError, match=r"^model.part.losses must not be empty$"):
        Part(losses=[])
    with pytest.raises(ConfigError, match=r"model.data_preprocessor.batch_augments.augments must not be empty"):
        RandomBatchAugment(augments=[])
    assert len(RandomBatchAugment(augments={"type": "Mixup"}).augments) == 1


def test_list_of_a_fixed_length():
    from vitasks.models.data_preprocessors.video import VideoDataPreprocessor

    with pytest.raises(ConfigError, match=r"^model.data_preprocessor.mean must be a list of 3 values, got \[1.0, 2.0\]$"):
        VideoDataPreprocessor(mean=(1.0, 2.0))
    with pytest.raises(ConfigError, match=r"^model.data_preprocessor.std\[1\] must be a number in \(0, inf\), got 0$"):
        VideoDataPreprocessor(std=(1.0, 0, 1.0))
