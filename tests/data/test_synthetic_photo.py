"""The "photo" style of the detection and video generators (shapes over crops of a photograph):
deterministic files, objects annotated where they are drawn, clips moving in their class
direction, backgrounds that are really photo crops; every kind takes every style."""

import json
import os

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from test_synthetic import digest
from vitasks import cli
from vitasks.data import synthetic
from vitasks.data.synthetic import drawing
from vitasks.data.synthetic.det import draw_det_sample, make_det_dataset

SIZE = 64
KERNEL = np.ones((3, 3), np.uint8)


def decode(ann, size=SIZE):
    seg = ann["segmentation"]
    rle = mask_utils.merge(mask_utils.frPyObjects(seg, size, size)) if isinstance(seg, list) else seg
    return mask_utils.decode(rle).astype(bool)


def test_det_photo_objects_are_drawn_where_annotated_over_the_photo_crop():
    """The image is the photo crop (the sample's first draw, :func:`drawing.photo_background`)
    wherever no object is annotated (only pixel noise), and is painted over, light or dark, inside
    every annotated mask; each box is its mask's extent."""
    seen, changed_inside = 0, []
    for i in range(16):
        img, objects = draw_det_sample(np.random.default_rng([7, i]), SIZE, 4, style="photo")
        crop = drawing.photo_background(np.random.default_rng([7, i]), (SIZE, SIZE))
        assert crop.std() > 10  # a textured photograph, not a flat colour
        diff = np.abs(img.astype(np.float64) - crop).mean(axis=-1)
        union = np.zeros((SIZE, SIZE), bool)
        for label, ann in objects:
            assert 0 <= label < 4
            mask = decode(ann)
            assert ann["area"] == mask.sum() > 0
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], [x, y, x + w, y + h], atol=1.5)
            inner = cv2.erode(mask.astype(np.uint8), KERNEL).astype(bool)
            if inner.sum() > 5:
                changed_inside.append((diff[inner] > 25).mean())
                # painted in one colour with a little shading: far flatter than the photograph
                assert img[inner].std(axis=0).max() < 30
            union |= mask
            seen += 1
        outside = ~cv2.dilate(union.astype(np.uint8), KERNEL, iterations=2).astype(bool)
        assert diff[outside].mean() < 12 and (diff[outside] > 45).mean() < 0.01, i
    assert seen >= 24
    # Every object stands out from the photograph under it (light or dark, whichever is visible).
    assert np.median(changed_inside) > 0.9 and min(changed_inside) > 0.3, changed_inside


def test_det_photo_dataset_deterministic_and_backgrounds_differ(tmp_path):
    kwargs = dict(seed=2, num_train=6, num_val=2, img_size=SIZE, num_classes=3, empty_prob=0.0)
    root = make_det_dataset(str(tmp_path / "a"), style="photo", **kwargs)
    assert digest(make_det_dataset(str(tmp_path / "b"), style="photo", **kwargs)) == digest(root)
    assert digest(make_det_dataset(str(tmp_path / "c"), **kwargs)) != digest(root)
    assert json.load(open(os.path.join(root, "synthetic.json")))["style"] == "photo"
    api = COCO(os.path.join(root, "annotations", "instances_train2017.json"))
    backgrounds, textures = [], []
    for image in api.imgs.values():
        img = cv2.imread(os.path.join(root, "train2017", image["file_name"]))[:, :, ::-1].astype(np.float64)
        union = np.zeros((SIZE, SIZE), bool)
        for ann in api.imgToAnns[image["id"]]:
            union |= decode(ann)
        outside = ~cv2.dilate(union.astype(np.uint8), KERNEL, iterations=2).astype(bool)
        assert outside.mean() > 0.2
        backgrounds.append(img[outside].mean(axis=0))
        # texture beyond the pixel noise: the spread of the blurred image
        textures.append(cv2.GaussianBlur(img, (5, 5), 0)[outside].std(axis=0).max())
    assert np.median(textures) > 15, textures  # photographs, not flat colours (a crop may be a plain wall)
    # a different crop (place, scale, turn, channel order) behind every image
    spread = np.abs(np.array(backgrounds)[:, None] - np.array(backgrounds)[None]).max(axis=-1)
    assert (spread[~np.eye(len(backgrounds), dtype=bool)] > 3).all()


def test_video_photo_clips_move_in_their_class_direction_over_photographs(tmp_path):
    pytest.importorskip("av")
    from test_video import estimated_motion

    from vitasks.data.synthetic.video import DIRECTIONS, MAX_DRIFT, make_video_dataset, render_clip

    agree, total, means = 0, 0, []
    for k, (name, (dx, dy)) in enumerate(DIRECTIONS.items()):
        for i in range(3):
            frames = render_clip(np.random.default_rng([5, k, i]), (dx, dy), 32, 10, (1, 2), style="photo")
            assert frames.shape == (10, 32, 32, 3) and frames.dtype == np.uint8
            assert frames.std(axis=(1, 2, 3)).min() > 10  # photographs behind, not flat colours
            mx, my = estimated_motion(frames)
            agree += int(np.sign(mx) == dx and np.sign(my) == dy)
            total += 1
            means.append(frames[0].reshape(-1, 3).mean(axis=0))
    assert agree >= total - 2, f"{agree} of {total} clips move in their class direction"
    spread = np.abs(np.array(means)[:, None] - np.array(means)[None]).max(axis=-1)
    assert (spread[~np.eye(len(means), dtype=bool)] > 1).all()  # another crop behind every clip
    assert MAX_DRIFT < 1  # the background's drift stays slower than any class motion (>= 1 px/frame)

    kwargs = dict(seed=1, train_per_class=1, val_per_class=1, size=32, num_frames=8)
    root = make_video_dataset(str(tmp_path / "a"), style="photo", **kwargs)
    assert digest(make_video_dataset(str(tmp_path / "b"), style="photo", **kwargs)) == digest(root)
    assert digest(make_video_dataset(str(tmp_path / "c"), **kwargs)) != digest(root)
    # Rewriting its own folder replaces the lists and clips (files and folders) with the same bytes.
    with open(os.path.join(root, "train.txt"), "a") as f:
        f.write("train/left/stale.mp4 0\n")
    assert digest(make_video_dataset(root, style="photo", **kwargs)) == digest(str(tmp_path / "b"))
    assert json.load(open(os.path.join(root, "synthetic.json")))["style"] == "photo"


def test_photo_background_keeps_proportions_off_square():
    """A wide or tall photo background is the middle of the square one at the longer side (the
    same draws), so a panning scene's photograph is not stretched."""
    square = drawing.photo_background(np.random.default_rng(3), (40, 40))
    wide = drawing.photo_background(np.random.default_rng(3), (24, 40))
    tall = drawing.photo_background(np.random.default_rng(3), (40, 24))
    np.testing.assert_array_equal(wide, square[8:32])
    np.testing.assert_array_equal(tall, square[:, 8:32])


def test_paint_light_or_dark_min_contrast_keeps_shapes_visible():
    alpha = np.zeros((16, 16), np.float32)
    alpha[4:12, 4:12] = 1.0
    for level in (10.0, 245.0):  # very dark and very light backgrounds
        under = np.full((16, 16, 3), level, np.float32)
        rng = np.random.default_rng(0)
        inside = np.array([drawing.paint_light_or_dark(rng, under, alpha, drawing.VISIBLE_CONTRAST)[6:10, 6:10].mean()
                           for _ in range(100)])
        assert (np.abs(inside - level) > 0.6 * drawing.VISIBLE_CONTRAST).all()
        # without it, about half the shapes take the background's own polarity
        rng = np.random.default_rng(0)
        free = np.array([drawing.paint_light_or_dark(rng, under, alpha)[6:10, 6:10].mean() for _ in range(100)])
        assert (np.abs(free - level) < 0.6 * drawing.VISIBLE_CONTRAST).sum() > 20


@pytest.mark.parametrize("kind", sorted(synthetic.KINDS))
def test_every_kind_takes_every_style(kind, monkeypatch, capsys):
    """`make-synthetic KIND OUT --style photo` reaches the kind's generator with the style (no
    kind refuses a style any more); a style that does not exist is refused."""
    import importlib

    module_name, function_name = synthetic.KINDS[kind]
    calls = []
    monkeypatch.setattr(importlib.import_module(module_name), function_name,
                        lambda out, **kw: calls.append((out, kw)))
    for style in drawing.STYLES:
        assert cli.main(["make-synthetic", kind, "OUT", "--style", style, "--seed", "4"]) == 0
    assert calls == [("OUT", {"seed": 4, "style": style}) for style in drawing.STYLES]
    assert f"synthetic {kind} dataset (photo style)" in capsys.readouterr().out
    assert cli.main(["make-synthetic", kind, "OUT", "--style", "neon"]) == 2
    assert "invalid choice: 'neon'" in capsys.readouterr().err
    assert len(calls) == len(drawing.STYLES)
