"""vitasks/checks.py: the argument checks, the config key each error names (alone and inside a
multi-task model, at config time and at build time alike), and the config checker following
``**kwargs`` to the parent's signature."""

import copy

import pytest
import torch.nn as nn

from vitasks.checks import (
    BlockIndices,
    Flag,
    InRange,
    IntPair,
    NonNegativeInt,
    OneOf,
    OrNone,
    PositiveInt,
    building,
    check_literal_arguments,
    checked,
    config_key,
    int_pair,
)
from vitasks.config import _accepted_args, validate_config
from vitasks.errors import ConfigError
from vitasks.registry import MODELS


EMBED = 16
BACKBONE = dict(type="VisionTransformer", img_size=32, patch_size=16, embed_dim=EMBED, depth=2, num_heads=2,
                class_token=False, pool="mean")
CLS = dict(type="ImageClassifier", head=dict(type="LinearClsHead", num_classes=4, in_channels=EMBED))
DET = dict(type="MaskRCNN", neck=dict(type="SimpleFeaturePyramid", in_channels=EMBED, out_channels=8),
           rpn_head=dict(type="RPNHead", in_channels=8, anchor_sizes=[8, 16, 32, 64, 128]),
           roi_head=dict(type="StandardRoIHead", num_classes=3, in_channels=8,
                         box_head=dict(conv_channels=8, fc_channels=8, num_convs=1),
                         mask_head=dict(conv_channels=8, num_convs=1)))
READS = dict(det=[-1])


class Toy(nn.Module):
    config_key = "model.toy"

    @checked
    def __init__(self, depth: PositiveInt = 2, size: IntPair = 4, mode: OneOf("a", "b") = "a",
                 ratio: InRange(0, 1, low_open=True) = 0.5, blocks: BlockIndices("depth") = (),
                 width: OrNone(PositiveInt) = None, free=None) -> None:
        super().__init__()
        self.args = dict(depth=depth, size=size, mode=mode, ratio=ratio, blocks=blocks, width=width, free=free)


class ToyChild(Toy):
    def __init__(self, extra: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)


def test_checks_normalise_valid_values():
    toy = Toy(depth=3, size=[5, 6], mode="b", ratio=1.0, blocks=[-1, 0], width=8, free=object)
    assert toy.args["size"] == (5, 6) and toy.args["blocks"] == (2, 0)
    assert Toy().args["size"] == (4, 4)  # defaults are normalised too
    assert Toy(width=None).args["width"] is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(depth=0), "model.toy.depth must be a positive integer, got 0"),
    (dict(depth=True), "model.toy.depth must be a positive integer, got True"),
    (dict(size=[1, 2, 3]), r"model.toy.size must be a positive int or \[height, width\], got \[1, 2, 3\]"),
    (dict(size=[0, 2]), "model.toy.size must be"),
    (dict(mode="c"), r"model.toy.mode must be one of \['a', 'b'\], got 'c'"),
    (dict(ratio=0), r"model.toy.ratio must be a number in \(0, 1\], got 0"),
    (dict(ratio=float("nan")), "model.toy.ratio must be a number"),
    (dict(blocks=[2]), r"model.toy.blocks: block indices \[2\] out of range for depth 2 \(valid: -2..1\)"),
    (dict(width=0), "model.toy.width must be a positive integer"),
])
def test_each_check_names_the_key_and_what_was_expected(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Toy(**kwargs)


def test_the_key_follows_what_is_being_built():
    with building("tasks", "det", root="model"):
        assert config_key("x") == "model.tasks.det.x"
        with building("roi_head"):
            assert config_key("num_classes", default="ignored") == "model.tasks.det.roi_head.num_classes"
            with pytest.raises(ConfigError, match="^model.tasks.det.roi_head.depth must be"):
                Toy(depth=-1)
    assert config_key("x", default="model.backbone") == "model.backbone.x"
    assert int_pair(3, "k") == (3, 3)


def test_config_time_checks_are_the_build_time_checks():
    problems = check_literal_arguments(Toy, {"depth": 0, "size": 7, "blocks": [5], "mode": "z"}, "model.tasks.t")
    assert sorted(problems) == sorted([
        "model.tasks.t.depth must be a positive integer, got 0",
        "model.tasks.t.blocks: block indices [5] out of range for depth 0 (valid: 0..-1)",
        "model.tasks.t.mode must be one of ['a', 'b'], got 'z'",
    ])
    # a value the config sets by reference to another component is left to build time
    assert check_literal_arguments(Toy, {"depth": {"type": "X"}}, "m") == []


def test_accepted_arguments_follow_kwargs_to_the_parent():
    assert _accepted_args(ToyChild) == ["extra", "depth", "size", "mode", "ratio", "blocks", "width", "free"]
    cascade = MODELS.get("CascadeRoIHead")
    accepted = _accepted_args(cascade)
    assert "stage_iou_thresholds" in accepted and "num_classes" in accepted and "box_head" in accepted


def _multitask_cfg(**roi_head):
    det = copy.deepcopy(DET)
    det["roi_head"].update(roi_head)
    return dict(type="MultiTaskModel", backbone=copy.deepcopy(BACKBONE), tasks=dict(cls=copy.deepcopy(CLS), det=det),
                out_indices=dict(det=READS["det"]))


def test_a_bad_detector_head_argument_inside_a_multitask_model_names_its_real_key():
    with pytest.raises(ConfigError, match=r"^model\.tasks\.det\.roi_head\.num_classes must be a positive integer"):
        MODELS.build(_multitask_cfg(num_classes=0))
    with pytest.raises(ConfigError, match=r"model\.tasks\.det\.roi_head\.num_classes must be a positive integer"):
        validate_config({"default_scope": "vitasks", "model": _multitask_cfg(num_classes=0)})
    # a misspelt argument: the config checker names the same key
    with pytest.raises(ConfigError, match=r"model\.tasks\.det\.roi_head\.num_clases: StandardRoIHead has no argument 'num_clases'"):
        validate_config({"default_scope": "vitasks", "model": _multitask_cfg(num_clases=3)})
    # the same head alone
    single = copy.deepcopy(DET)
    single["backbone"] = dict(copy.deepcopy(BACKBONE), out_indices=[-1])
    single["roi_head"]["positive_fraction"] = 1.5
    with pytest.raises(ConfigError, match=r"^model\.roi_head\.positive_fraction must be a number in \(0, 1\]"):
        MODELS.build(single)


class Counts(nn.Module):
    config_key = "model.counts"

    @checked
    def __init__(self, count: NonNegativeInt = 0, on: Flag = False) -> None:
        super().__init__()
        self.count, self.on = count, on


@pytest.mark.parametrize("kwargs, message", [
    (dict(count=-1), r"model.counts.count must be an integer >= 0, got -1"),
    (dict(count=2.5), r"model.counts.count must be an integer >= 0, got 2.5"),  # a number is not a count
    (dict(count=True), r"model.counts.count must be an integer >= 0, got True"),
    (dict(on=1), r"model.counts.on must be true or false, got 1"),
    (dict(on="yes"), r"model.counts.on must be true or false, got 'yes'"),
])
def test_counts_and_flags(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Counts(**kwargs)
    counts = Counts(count=0, on=True)
    assert (counts.count, counts.on) == (0, True)
