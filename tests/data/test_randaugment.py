"""RandAugment against timm's definition: the config strings, the magnitude-to-argument formulas
worked by hand, the ops on small images, the order and use of the random draws, one draw per
video clip, and (CI's torch leg) real timm op by op."""

import math
import random

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from vitasks.data.randaugment import (
    RAND_INCREASING_TRANSFORMS,
    RAND_TRANSFORMS,
    OpDraw,
    RandAugment,
    VideoRandAugment,
    apply_op,
    level_to_args,
    parse_rand_config,
)
from vitasks.errors import ConfigError
from vitasks.registry import TRANSFORMS

NEAREST = Image.Resampling.NEAREST
BICUBIC = Image.Resampling.BICUBIC


def _img(h=5, w=6, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- config strings -------------------------------------------------------------------------


def test_parse_deit_string():
    spec = parse_rand_config("rand-m9-mstd0.5-inc1")
    assert (spec.magnitude, spec.num_layers, spec.prob, spec.magnitude_std) == (9, 2, 0.5, 0.5)
    assert spec.magnitude_max is None and spec.increasing and spec.weights is None
    assert spec.ops == RAND_INCREASING_TRANSFORMS and len(spec.ops) == 15


def test_parse_videomae_and_other_sections():
    spec = parse_rand_config("rand-m7-n4-mstd0.5-inc1")
    assert (spec.magnitude, spec.num_layers, spec.magnitude_std, spec.increasing) == (7, 4, 0.5, True)
    plain = parse_rand_config("rand-m9-n3-mstd0.5")
    assert plain.ops == RAND_TRANSFORMS and plain.num_layers == 3 and not plain.increasing
    assert parse_rand_config("rand-m9-inc0").ops == RAND_TRANSFORMS
    assert math.isinf(parse_rand_config("rand-mstd101").magnitude_std)  # > 100: uniform
    assert parse_rand_config("rand").magnitude == 10  # timm's defaults: m10, n2
    assert parse_rand_config("rand-mmax20-p0.7").magnitude_max == 20
    assert parse_rand_config("rand-mmax20-p0.7").prob == 0.7
    assert parse_rand_config("rand-m9-foo").magnitude == 9  # a section without a number is ignored
    weighted = parse_rand_config("rand-m9-tweights")
    assert weighted.weights is not None and abs(sum(weighted.weights) - 1) < 1e-12
    # Rotate: 3 of a total of 3+2+2+1+1 + 3 x 0.25 + 7 x 0.05 = 10.1 in timm's table.
    assert weighted.weights[weighted.ops.index("Rotate")] == pytest.approx(3 / 10.1)


@pytest.mark.parametrize("bad", ["rund-m9", "rand-q3", "rand-mx9", 5])
def test_parse_errors_name_the_string(bad):
    with pytest.raises(ConfigError, match="config_str"):
        parse_rand_config(bad)


def test_registered_and_hparams_checked():
    t = TRANSFORMS.build(dict(type="RandAugment", config_str="rand-m9-mstd0.5-inc1"))
    assert t.hparams["img_mean"] == (124, 116, 104) and t.hparams["interpolation"] == "bicubic"
    assert t.hparams["translate_const"] == int(224 * 0.45)
    with pytest.raises(ConfigError, match="hparams"):
        RandAugment(hparams={"fill": 0})
    with pytest.raises(ConfigError, match="interpolation"):
        RandAugment(hparams={"interpolation": "cubicle"})
    # hparams win over the string, as timm's setdefault does.
    assert RandAugment("rand-m9-mstd0.5", hparams={"magnitude_std": 0.2}).spec.magnitude_std == 0.2


# --- magnitude -> argument, written from timm's formulas ---------------------------------------


@pytest.mark.parametrize(
    "name, magnitude, negate, expected",
    [
        ("ShearX", 9, False, 0.3 * 9 / 10),
        ("ShearY", 9, True, -0.3 * 9 / 10),
        ("Rotate", 9, False, 30 * 9 / 10),
        ("Rotate", 7, True, -30 * 7 / 10),
        ("TranslateXRel", 9, False, 0.45 * 9 / 10),
        ("TranslateYRel", 5, True, -0.45 * 5 / 10),
        ("Color", 9, False, 1.8 * 9 / 10 + 0.1),
        ("Contrast", 0, False, 0.1),
        ("BrightnessIncreasing", 9, False, 1 + 0.9 * 9 / 10),
        ("SharpnessIncreasing", 9, True, 1 - 0.9 * 9 / 10),
        ("ColorIncreasing", 10, True, 0.1),  # 1 - 0.9 = 0.1: the floor
        ("Posterize", 9, False, 3),  # int(4 * 0.9)
        ("PosterizeIncreasing", 9, False, 1),  # 4 - 3
        ("Solarize", 9, False, 230),  # int(256 * 0.9)
        ("SolarizeIncreasing", 9, False, 26),
        ("SolarizeIncreasing", 0, False, 256),
        ("SolarizeAdd", 9, False, 99),  # int(110 * 0.9)
    ],
)
def test_level_to_args(name, magnitude, negate, expected):
    (arg,) = level_to_args(name, magnitude, {"translate_const": 100}, negate)
    assert arg == pytest.approx(expected, abs=1e-12)


def test_no_argument_ops():
    for name in ("AutoContrast", "Equalize", "Invert"):
        assert level_to_args(name, 9, {}) == ()


# --- the ops on small images, worked by hand ---------------------------------------------------


def test_shear_x_nearest_by_hand():
    img = _img()
    height, width = img.shape[:2]
    for factor in (0.27, -0.27):
        out = np.asarray(apply_op(Image.fromarray(img), "ShearX", (factor,), NEAREST, (1, 2, 3)))
        for y in range(height):
            for x in range(width):
                # PIL's affine maps the output pixel centre to x + factor * y in the input.
                src = x + 0.5 + factor * (y + 0.5)
                want = img[y, math.floor(src)] if 0 <= src < width else (1, 2, 3)
                assert tuple(out[y, x]) == tuple(want)


def test_shear_y_translate_rotate_by_hand():
    img = _img(6, 6)
    out = np.asarray(apply_op(Image.fromarray(img), "ShearY", (0.3,), NEAREST, (7, 7, 7)))
    for y in range(6):
        for x in range(6):
            src = y + 0.5 + 0.3 * (x + 0.5)
            want = img[math.floor(src), x] if 0 <= src < 6 else (7, 7, 7)
            assert tuple(out[y, x]) == tuple(want)
    # Translate by 2/6 of the width: content moves left by 2 pixels, the fill enters right.
    out = np.asarray(apply_op(Image.fromarray(img), "TranslateXRel", (2 / 6,), NEAREST, (9, 9, 9)))
    assert (out[:, :4] == img[:, 2:]).all() and (out[:, 4:] == 9).all()
    out = np.asarray(apply_op(Image.fromarray(img), "TranslateYRel", (-2 / 6,), NEAREST, (9, 9, 9)))
    assert (out[2:] == img[:4]).all() and (out[:2] == 9).all()
    # Rotate +90 degrees is counter-clockwise.
    out = np.asarray(apply_op(Image.fromarray(img), "Rotate", (90.0,), NEAREST, (0, 0, 0)))
    assert (out == np.rot90(img)).all()


def test_pixel_ops_by_hand():
    img = _img(4, 4)
    pil = Image.fromarray(img)
    assert (np.asarray(apply_op(pil, "Invert", ())) == 255 - img).all()
    assert (np.asarray(apply_op(pil, "PosterizeIncreasing", (3,))) == img & 0b11100000).all()
    assert (np.asarray(apply_op(pil, "Posterize", (8,))) == img).all()  # >= 8 bits: unchanged
    # 0 bits keeps nothing (img & 0): black. Pillow 13's posterize refuses bits < 1.
    assert (np.asarray(apply_op(pil, "PosterizeIncreasing", (0,))) == 0).all()
    assert (np.asarray(apply_op(pil, "Posterize", (0,))) == 0).all()
    solar = np.where(img >= 230, 255 - img, img)
    assert (np.asarray(apply_op(pil, "SolarizeIncreasing", (230,))) == solar).all()
    added = np.where(img < 128, np.minimum(255, img.astype(int) + 99), img)
    assert (np.asarray(apply_op(pil, "SolarizeAdd", (99,))) == added).all()
    # Brightness: a blend with black, img * factor (exact for even values and factor 0.5).
    even = (img // 2) * 2
    out = np.asarray(apply_op(Image.fromarray(even), "BrightnessIncreasing", (0.5,)))
    assert (out == even // 2).all()
    # A grey image has no colour to change.
    grey = np.repeat(img[:, :, :1], 3, axis=2)
    assert (np.asarray(apply_op(Image.fromarray(grey), "ColorIncreasing", (1.81,))) == grey).all()
    # Autocontrast stretches each channel: 10 -> 0, 20 -> 50, 61 -> 255 (scale 5).
    stretch = np.array([[[10, 10, 10], [20, 20, 20], [61, 61, 61]]], np.uint8)
    out = np.asarray(apply_op(Image.fromarray(stretch), "AutoContrast", ()))
    assert out[0, :, 0].tolist() == [0, 50, 255]


def test_every_op_runs_at_the_magnitude_extremes():
    # Magnitudes 0 and 10 of every op of both sets, through level_to_args as the draws make them
    # (the increasing posterize at 10 and the plain one at 0 ask for 0 bits).
    img = _img(8, 8)
    ra = RandAugment("rand-m9-mstd0.5-inc1")
    for name in sorted(set(RAND_TRANSFORMS) | set(RAND_INCREASING_TRANSFORMS)):
        for magnitude in (0.0, 10.0):
            args = level_to_args(name, magnitude, ra.hparams, False)
            out = ra.apply(img, [OpDraw(name, args, BICUBIC)])
            assert out.shape == img.shape and out.dtype == np.uint8, name
    bits = level_to_args("PosterizeIncreasing", 10.0, ra.hparams, False)
    assert bits == (0,)
    assert (ra.apply(img, [OpDraw("PosterizeIncreasing", bits, BICUBIC)]) == 0).all()


def test_enhance_ops_are_pils():
    img = _img(8, 8)
    pil = Image.fromarray(img)
    for name, enhancer in [("Contrast", ImageEnhance.Contrast), ("Sharpness", ImageEnhance.Sharpness),
                           ("Color", ImageEnhance.Color), ("Brightness", ImageEnhance.Brightness)]:
        assert (np.asarray(apply_op(pil, name, (1.72,))) == np.asarray(enhancer(pil).enhance(1.72))).all()
    assert (np.asarray(apply_op(pil, "Equalize", ())) == np.asarray(ImageOps.equalize(pil))).all()


# --- draws ------------------------------------------------------------------------------------


class ScriptedRng:
    """A generator whose draws are given in order (checks the order of use, too)."""

    def __init__(self, integers, random_values, normals=()):
        self._ints, self._rand, self._norm = list(integers), list(random_values), list(normals)

    def integers(self, low, high, size=None):
        if size is None:
            return self._ints.pop(0)
        return np.array([self._ints.pop(0) for _ in range(size)])

    def random(self):
        return self._rand.pop(0)

    def normal(self, mean, std):
        return mean + std * self._norm.pop(0)


def test_draws_follow_timm():
    ra = RandAugment("rand-m9-mstd0.5-inc1")
    ops = RAND_INCREASING_TRANSFORMS
    # Two ops: ShearX then Invert. ShearX fires (0.3 <= p), noise +3 std -> 10.5 clipped to 10,
    # sign draw 0.9 > 0.5 -> negative. Invert is skipped (0.7 > 0.5): no more draws for it.
    rng = ScriptedRng([ops.index("ShearX"), ops.index("Invert")], [0.3, 0.9, 0.7], [3.0])
    drawn = ra.draw(rng)
    assert len(drawn) == 1 and drawn[0].name == "ShearX"
    assert drawn[0].args == pytest.approx((-0.3,)) and drawn[0].resample == BICUBIC
    assert not rng._rand and not rng._ints and not rng._norm
    # Noise below zero clips to magnitude 0: SolarizeIncreasing's threshold is then 256 (no-op).
    rng = ScriptedRng([ops.index("SolarizeIncreasing")] * 2, [0.1, 0.2], [-30.0, 0.0])
    drawn = ra.draw(rng)
    assert [d.args for d in drawn] == [(256,), (256 - int(256 * 0.9),)]
    # interpolation: random draws bilinear or bicubic for geometric ops only.
    rnd = RandAugment("rand-m9-n1", hparams={"interpolation": "random"})
    rng = ScriptedRng([RAND_TRANSFORMS.index("Rotate"), 0], [0.0, 0.0])
    assert rnd.draw(rng)[0].resample == Image.Resampling.BILINEAR


def test_uniform_magnitude_and_seeded_draws():
    ra = RandAugment("rand-m9-n4-mstd101-p1.0")
    mags = []
    for seed in range(20):
        for op in ra.draw(np.random.default_rng(seed)):
            if op.name == "Rotate":
                mags.append(abs(op.args[0]) / 3.0)
    assert mags and all(0 <= m <= 9 for m in mags)
    # Same generator state, same ops.
    a, b = ra.draw(np.random.default_rng(3)), ra.draw(np.random.default_rng(3))
    assert a == b


def test_transform_uses_sample_rng():
    ra = RandAugment("rand-m9-n3-mstd0.5-inc1-p1.0")
    img = _img(16, 16)
    out1 = ra({"img": img.copy(), "rng": np.random.default_rng(5)})["img"]
    out2 = ra({"img": img.copy(), "rng": np.random.default_rng(5)})["img"]
    expected = ra.apply(img, ra.draw(np.random.default_rng(5)))
    assert (out1 == out2).all() and (out1 == expected).all() and out1.dtype == np.uint8


def test_video_one_draw_per_clip():
    ra = VideoRandAugment("rand-m7-n4-mstd0.5-inc1")
    frames = np.stack([_img(12, 12, seed=s) for s in range(3)] + [_img(12, 12, seed=0)])
    changed = 0
    for seed in range(6):
        out = ra({"imgs": frames.copy(), "rng": np.random.default_rng(seed)})["imgs"]
        ops = ra.draw(np.random.default_rng(seed))
        for f in range(len(frames)):
            assert (out[f] == ra.apply(frames[f], ops)).all()
        assert (out[0] == out[3]).all()  # equal frames stay equal
        changed += int((out != frames).any())
    assert changed > 0
    with pytest.raises(ValueError, match="imgs"):
        ra({"img": frames[0], "rng": np.random.default_rng(0)})
    # The plain name works on clips too.
    plain = RandAugment("rand-m7-n4-mstd0.5-inc1")
    a = plain({"imgs": frames.copy(), "rng": np.random.default_rng(1)})["imgs"]
    b = ra({"imgs": frames.copy(), "rng": np.random.default_rng(1)})["imgs"]
    assert (a == b).all()


# --- real timm ---------------------------------------------------------------------------------


@pytest.mark.torch_leg
@pytest.mark.parametrize("name", sorted(set(RAND_TRANSFORMS) | set(RAND_INCREASING_TRANSFORMS)))
@pytest.mark.parametrize("negate", [False, True])
def test_ops_match_timm(name, negate, monkeypatch):
    aa = pytest.importorskip("timm.data.auto_augment")
    hparams = {"translate_const": 100, "img_mean": (124, 116, 104), "interpolation": BICUBIC}
    img = _img(20, 24, seed=7)
    for magnitude in (3, 9):
        timm_op = aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)
        # timm negates when random.random() > 0.5.
        monkeypatch.setattr(random, "random", lambda: 0.9 if negate else 0.1)
        want = np.asarray(timm_op(Image.fromarray(img)))
        monkeypatch.undo()
        ours = RandAugment("rand", hparams={"img_mean": (124, 116, 104), "interpolation": "bicubic"})
        args = level_to_args(name, float(magnitude), ours.hparams, negate)
        got = ours.apply(img, [OpDraw(name, args, BICUBIC)])
        assert (got == want).all(), name


@pytest.mark.torch_leg
@pytest.mark.parametrize("config_str", ["rand-m9-mstd0.5-inc1", "rand-m7-n4-mstd0.5-inc1",
                                        "rand-m9-mstd0.5", "rand-m10-n3-mstd101-mmax12-p0.8",
                                        "rand-m9-tweights", "rand-m9-t3a"])
def test_parse_matches_timm(config_str):
    aa = pytest.importorskip("timm.data.auto_augment")
    timm_ra = aa.rand_augment_transform(config_str, {"img_mean": (124, 116, 104)})
    spec = parse_rand_config(config_str)
    assert tuple(op.name for op in timm_ra.ops) == spec.ops
    assert timm_ra.num_layers == spec.num_layers
    first = timm_ra.ops[0]
    assert (first.magnitude, first.prob) == (spec.magnitude, spec.prob)
    assert first.magnitude_std == spec.magnitude_std
    assert first.magnitude_max == spec.magnitude_max
    if timm_ra.choice_weights is None:
        assert spec.weights is None
    else:
        assert np.allclose(timm_ra.choice_weights, spec.weights)
