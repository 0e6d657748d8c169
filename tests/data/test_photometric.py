"""PhotoMetricDistortion against mmsegmentation's definition: hand-worked uint8 steps, an
independent reference on a BGR image through OpenCV's BGR HSV (as mmseg runs it), the order of the
random draws, and the registered name in the pipeline."""

import cv2
import numpy as np
import pytest

from vitasks.data.seg_transforms import PhotoMetricDistortion
from vitasks.errors import ConfigError
from vitasks.registry import TRANSFORMS


def _params(brightness=None, contrast=None, saturation=None, hue=None, contrast_first=True):
    return dict(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
                contrast_first=contrast_first)


def test_brightness_and_contrast_by_hand():
    pmd = PhotoMetricDistortion()
    img = np.array([[[100, 101, 20], [250, 0, 255]]], np.uint8)
    # Brightness +10.9: 100 -> 110.9 -> 110 (truncated), 250 -> 260.9 -> 255 (clipped).
    out = pmd.apply(img, _params(brightness=10.9))
    assert out.tolist() == [[[110, 111, 30], [255, 10, 255]]]
    out = pmd.apply(img, _params(brightness=-32.0))
    assert out.tolist() == [[[68, 69, 0], [218, 0, 223]]]
    # Contrast 1.5: 101 -> 151.5 -> 151; 250 -> 375 -> 255.
    out = pmd.apply(img, _params(contrast=1.5))
    assert out.tolist() == [[[150, 151, 30], [255, 0, 255]]]
    # Nothing fires: unchanged.
    assert (pmd.apply(img, _params()) == img).all()


def test_hue_wraps_at_180_by_hand():
    pmd = PhotoMetricDistortion()
    # A saturated colour of OpenCV hue 170 (340 degrees; uint8 hue counts 2-degree steps).
    hsv = np.array([[[170, 255, 255]]], np.uint8)
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    out = pmd.apply(rgb, _params(hue=17))
    assert cv2.cvtColor(out, cv2.COLOR_RGB2HSV)[0, 0, 0] == (170 + 17) % 180 == 7
    # Saturation 0.5 halves S (255 -> 127, truncated) and keeps H and V.
    out = pmd.apply(rgb, _params(saturation=0.5))
    assert cv2.cvtColor(out, cv2.COLOR_RGB2HSV)[0, 0].tolist()[1:] == [127, 255]


def mmseg_reference(bgr, p):
    """mmseg's steps written out on a BGR uint8 image (its loader's order)."""

    def convert(x, alpha=1, beta=0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    if p["brightness"] is not None:
        bgr = convert(bgr, beta=p["brightness"])
    if p["contrast_first"] and p["contrast"] is not None:
        bgr = convert(bgr, alpha=p["contrast"])
    if p["saturation"] is not None:
        hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
        hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=p["saturation"])
        bgr = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if p["hue"] is not None:
        hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + p["hue"]) % 180
        bgr = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if not p["contrast_first"] and p["contrast"] is not None:
        bgr = convert(bgr, alpha=p["contrast"])
    return bgr


def test_matches_mmseg_reference_on_bgr():
    pmd = PhotoMetricDistortion()
    rgb = np.random.default_rng(0).integers(0, 256, (16, 12, 3), dtype=np.uint8)
    rgb[0, :4] = [[0, 0, 0], [255, 255, 255], [128, 128, 128], [255, 0, 0]]  # greys, a pure red
    seen_modes = set()
    for seed in range(40):
        params = pmd.draw(np.random.default_rng(seed))
        seen_modes.add(params["contrast_first"])
        got = pmd.apply(rgb, params)
        want = mmseg_reference(np.ascontiguousarray(rgb[:, :, ::-1]), params)[:, :, ::-1]
        assert (got == want).all(), params
    assert seen_modes == {True, False}
    # All four steps at once in both orders.
    for first in (True, False):
        params = _params(brightness=-20.3, contrast=1.37, saturation=0.61, hue=-18, contrast_first=first)
        want = mmseg_reference(np.ascontiguousarray(rgb[:, :, ::-1]), params)[:, :, ::-1]
        assert (pmd.apply(rgb, params) == want).all()


class ScriptedRng:
    def __init__(self, integers, uniforms):
        self.ints, self.unis, self.calls = list(integers), list(uniforms), []

    def integers(self, low, high=None):
        self.calls.append(("integers", low, high))
        return self.ints.pop(0)

    def uniform(self, low, high):
        self.calls.append(("uniform", low, high))
        return self.unis.pop(0)


def test_draw_order_is_mmsegs():
    pmd = PhotoMetricDistortion()
    # brightness fires, mode 1 (contrast first) fires, saturation no, hue fires (-18).
    rng = ScriptedRng([1, 1, 1, 0, 1, -18], [5.0, 1.2])
    p = pmd.draw(rng)
    assert p == _params(brightness=5.0, contrast=1.2, hue=-18, contrast_first=True)
    assert rng.calls == [
        ("integers", 2, None), ("uniform", -32, 32), ("integers", 2, None), ("integers", 2, None),
        ("uniform", 0.5, 1.5), ("integers", 2, None), ("integers", 2, None), ("integers", -18, 18),
    ]
    # mode 0: contrast is drawn after hue.
    rng = ScriptedRng([0, 0, 1, 0, 1], [0.7, 1.4])
    p = pmd.draw(rng)
    assert p == _params(saturation=0.7, contrast=1.4, contrast_first=False)
    # Hue shifts are -18..17 (numpy's randint leaves 18 out), each step fires about half the time.
    draws = [pmd.draw(np.random.default_rng(s)) for s in range(400)]
    hues = [d["hue"] for d in draws if d["hue"] is not None]
    assert min(hues) == -18 and max(hues) == 17
    assert 150 < sum(d["brightness"] is not None for d in draws) < 250


def test_registered_checked_and_seeded():
    t = TRANSFORMS.build(dict(type="PhotoMetricDistortion"))
    img = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    a = t({"img": img.copy(), "rng": np.random.default_rng(4)})["img"]
    b = t.apply(img, t.draw(np.random.default_rng(4)))
    assert (a == b).all()
    with pytest.raises(ConfigError, match="contrast_range"):
        PhotoMetricDistortion(contrast_range=(1.5, 0.5))
    with pytest.raises(ValueError, match="uint8"):
        t.apply(img.astype(np.float32), _params())
