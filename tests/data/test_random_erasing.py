"""RandomErasing against timm's definition: rectangle draws worked by hand from injected random
values, fills, splits, clips (one draw per clip), the preprocessors' hook after normalisation,
reproducibility, and (CI's torch leg) real timm with the same seeds."""

import math
import random

import pytest
import torch

from vitasks.errors import ConfigError
from vitasks.models.data_preprocessors import ClsDataPreprocessor, RandomErasing, VideoDataPreprocessor
from vitasks.registry import MODELS


class ScriptedRandom:
    """``random.Random``'s methods that RandomErasing uses, answering scripted values and
    recording each call's arguments."""

    def __init__(self, values):
        self.values = list(values)
        self.calls = []

    def _next(self, name, *args):
        self.calls.append((name, args))
        return self.values.pop(0)

    def random(self):
        return self._next("random")

    def uniform(self, a, b):
        return self._next("uniform", a, b)

    def randint(self, a, b):
        return self._next("randint", a, b)


def test_one_box_by_hand():
    er = RandomErasing(probability=0.25, mode="const")
    # 20x20: area fraction 0.1 -> 40 px, aspect 2.5 -> h = round(sqrt(100)) = 10,
    # w = round(sqrt(16)) = 4; top in 0..10, left in 0..16.
    rng = ScriptedRandom([0.2, 0.1, math.log(2.5), 3, 5])
    assert er.draw_boxes(rng, 20, 20) == [(3, 5, 10, 4)]
    assert rng.calls == [
        ("random", ()),
        ("uniform", (0.02, 1 / 3)),
        ("uniform", (math.log(0.3), math.log(1 / 0.3))),
        ("randint", (0, 10)),
        ("randint", (0, 16)),
    ]


def test_probability_retries_and_count_by_hand():
    er = RandomErasing(probability=0.25)
    rng = ScriptedRandom([0.3])  # 0.3 > 0.25: no erasing, one draw only
    assert er.draw_boxes(rng, 20, 20) == [] and not rng.values
    # A box as tall as the image (h = 20 is not < 20) is drawn again; 10 failures give nothing.
    too_tall = [0.25, math.log(4.0)]  # 100 px, aspect 4: h = 20, w = 5
    rng = ScriptedRandom([0.0] + too_tall * 10)
    assert er.draw_boxes(rng, 20, 20) == [] and not rng.values
    rng = ScriptedRandom([0.0] + too_tall + [0.1, 0.0, 2, 7])  # second try: 40 px, aspect 1
    assert er.draw_boxes(rng, 20, 20) == [(2, 7, 6, 6)]  # round(sqrt(40)) = 6
    # max_count 3: count drawn in 1..3; each box gets area / count.
    er = RandomErasing(probability=1.0, max_count=3)
    rng = ScriptedRandom([0.5, 2, 0.2, 0.0, 1, 1, 0.2, 0.0, 4, 4])
    assert er.draw_boxes(rng, 20, 20) == [(1, 1, 6, 6), (4, 4, 6, 6)]  # 400 x 0.2 / 2 = 40 px
    assert rng.calls[1] == ("randint", (1, 3))


class Fixed(RandomErasing):
    """Rectangles given per call, in sample order."""

    def __init__(self, boxes, **kwargs):
        super().__init__(**kwargs)
        self.queue = list(boxes)

    def draw_boxes(self, rng, height, width, attempts=10):
        return self.queue.pop(0)


def test_fills_and_splits():
    x = torch.full((4, 3, 8, 8), 5.0)
    boxes = [[(1, 2, 3, 4)], [], [(0, 0, 2, 2)], [(5, 5, 2, 3)]]
    out = Fixed(boxes, mode="const")(x.clone(), rng=random.Random(0))
    assert (out[0, :, 1:4, 2:6] == 0).all() and out[0].sum() == 5.0 * (192 - 36)
    assert (out[1] == 5).all()
    torch.manual_seed(3)
    out = Fixed(boxes, mode="pixel")(x.clone(), rng=random.Random(0))
    torch.manual_seed(3)
    first = torch.empty(3, 3, 4).normal_()
    assert torch.equal(out[0, :, 1:4, 2:6], first)
    torch.manual_seed(3)
    out = Fixed(boxes, mode="rand")(x.clone(), rng=random.Random(0))
    torch.manual_seed(3)
    colour = torch.empty(3, 1, 1).normal_()
    assert torch.equal(out[0, :, 1:4, 2:6], colour.expand(3, 3, 4))
    # num_splits 2: the first N // 2 samples stay clean (no draws), the others get theirs.
    out = Fixed(boxes[2:], mode="const", num_splits=2)(x.clone(), rng=random.Random(0))
    assert (out[:2] == 5).all() and (out[2, :, :2, :2] == 0).all() and (out[3, :, 5:7, 5:8] == 0).all()


def test_clip_same_box_every_frame():
    er = RandomErasing(probability=1.0, mode="pixel")
    clips = torch.full((2, 3, 4, 16, 16), 9.0)
    out = er(clips.clone(), rng=random.Random(11))
    expected_boxes = [RandomErasing(probability=1.0).draw_boxes(r, 16, 16, 100)
                      for r in [random.Random(11)] for _ in range(2)]
    for n in range(2):
        changed = out[n] != 9.0  # (3, T, H, W)
        for t in range(1, 4):
            assert torch.equal(changed[:, t], changed[:, 0])  # the same rectangle on every frame
        assert not torch.equal(out[n, :, 0], out[n, :, 1])  # pixel noise drawn per frame
        top, left, h, w = expected_boxes[n][0]
        assert changed[:, :, top:top + h, left:left + w].all() and changed.sum() == 3 * 4 * h * w


def test_options_checked_and_built():
    er = MODELS.build(dict(type="RandomErasing", prob=0.25, mode="pixel"))
    assert er.probability == 0.25 and er.mode == "pixel"
    for bad in (dict(probability=2), dict(mode="noise"), dict(min_area=0.5, max_area=0.2), dict(min_count=0), dict(min_count=3, max_count=2)):
        with pytest.raises(ConfigError, match="RandomErasing"):
            RandomErasing(**bad)
    with pytest.raises(ConfigError, match="random_erasing"):
        ClsDataPreprocessor(random_erasing="pixel")
    with pytest.raises(ConfigError, match="random_erasing"):
        ClsDataPreprocessor(random_erasing={"probabilty": 0.2})


def _cls_batch(n=4, size=16):
    return {"inputs": [torch.full((3, size, size), 200, dtype=torch.uint8) for _ in range(n)], "data_samples": None}


def test_cls_preprocessor_erases_after_normalisation_in_training_only():
    pre = ClsDataPreprocessor(random_erasing={"type": "RandomErasing", "probability": 1.0, "mode": "const"})
    plain = ClsDataPreprocessor()
    torch.manual_seed(0)
    out = pre(_cls_batch(), training=True)["inputs"]
    reference = plain(_cls_batch(), training=True)["inputs"]
    erased = out != reference
    assert erased.any() and (out[erased] == 0).all()  # 0 in normalised units (the mean colour)
    for n in range(4):
        assert erased[n].any()  # probability 1: every sample
    assert torch.equal(pre(_cls_batch(), training=False)["inputs"], reference)
    # The same seed erases the same boxes; another seed others.
    torch.manual_seed(0)
    assert torch.equal(pre(_cls_batch(), training=True)["inputs"], out)
    torch.manual_seed(1)
    assert not torch.equal(pre(_cls_batch(), training=True)["inputs"], out)


def test_video_preprocessor_one_draw_per_clip():
    pre = VideoDataPreprocessor(random_erasing={"probability": 1.0, "mode": "const"})
    clips = [torch.full((3, 4, 16, 16), 200, dtype=torch.uint8) for _ in range(3)]
    torch.manual_seed(0)
    out = pre({"inputs": clips, "data_samples": None}, training=True)["inputs"]  # (3, 3, T, H, W)
    assert out.shape == (3, 3, 4, 16, 16)
    for n in range(3):
        zero = out[n] == 0
        assert zero.any()
        for t in range(4):
            assert torch.equal(zero[:, t], zero[:, 0])
    assert not (pre({"inputs": clips, "data_samples": None}, training=False)["inputs"] == 0).any()


@pytest.mark.torch_leg
@pytest.mark.parametrize("mode", ["const", "rand", "pixel"])
@pytest.mark.parametrize("max_count", [None, 3])
def test_matches_timm(mode, max_count):
    re_mod = pytest.importorskip("timm.data.random_erasing")
    x = torch.randn(6, 3, 24, 20)
    for seed in range(5):
        random.seed(seed)
        torch.manual_seed(100 + seed)
        want = re_mod.RandomErasing(0.6, mode=mode, max_count=max_count, num_splits=2, device="cpu")(x.clone())
        torch.manual_seed(100 + seed)
        got = RandomErasing(0.6, mode=mode, max_count=max_count, num_splits=2)(x.clone(), rng=random.Random(seed))
        assert torch.equal(got, want)


def test_pipeline_entry_says_where_it_goes():
    from vitasks.registry import TRANSFORMS

    with pytest.raises(ConfigError, match="data_preprocessor.random_erasing"):
        TRANSFORMS.build(dict(type="RandomErasing", probability=0.25))


def test_cls_preprocessor_erases_before_mixing():
    from vitasks.structures import DataSample

    pre = ClsDataPreprocessor(num_classes=3, random_erasing={"probability": 1.0},
                              batch_augments={"augments": [{"type": "Mixup", "alpha": 0.8}]})
    seen = {}

    def recorder(inputs, targets):
        seen["inputs"] = inputs.clone()
        return inputs, targets

    pre.batch_augments = recorder
    batch = _cls_batch()
    batch["data_samples"] = [DataSample(gt_label=torch.tensor([i % 3])) for i in range(4)]
    pre(batch, training=True)
    assert all((seen["inputs"][n] == 0).any() for n in range(4))  # each image erased, then mixed
