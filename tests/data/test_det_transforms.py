"""Detection transforms: large-scale jitter keeps boxes and masks on their objects; resize, crop,
flip and filter rules; packing; the detection data preprocessor."""

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

import vitasks.data  # noqa: F401  (registers transforms)
from vitasks.data.det_transforms import (
    DetRandomCrop,
    DetRandomFlip,
    DetRandomResize,
    DetResize,
    FilterDetAnnotations,
    InstanceMasks,
    LoadDetAnnotations,
    PackDetInputs,
    masks_to_boxes,
    normalize_segmentation,
)
from vitasks.errors import ConfigError
from vitasks.models.data_preprocessors.det import DetDataPreprocessor
from vitasks.registry import TRANSFORMS


def rasterise(segmentation, height, width):
    """pycocotools' own decoding: the reference bitmap of a COCO segmentation."""
    if isinstance(segmentation, dict):  # compressed RLE
        return mask_utils.decode(segmentation).astype(bool)
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))).astype(bool)


def scene(height=90, width=120):
    """Three objects (two polygons, one RLE ring) and one crowd region; the image carries each
    object's mask as an extra channel (255 inside), so every transform moves the reference masks
    exactly as it moves pixels."""
    ring = np.zeros((height, width), np.uint8)
    ring[50:80, 70:110] = 1
    ring[58:72, 80:100] = 0
    ring_rle = mask_utils.encode(np.asfortranarray(ring))
    ring_rle["counts"] = ring_rle["counts"].decode("ascii")
    segmentations = [
        [[10.0, 10.0, 50.0, 12.0, 45.0, 40.0, 12.0, 35.0]],
        [[60.0, 5.0, 110.0, 5.0, 85.0, 40.0]],
        ring_rle,
        [[5.0, 60.0, 30.0, 60.0, 30.0, 85.0, 5.0, 85.0]],  # crowd
    ]
    masks = [rasterise(s, height, width) for s in segmentations]
    instances = []
    for i, (seg, mask) in enumerate(zip(segmentations, masks)):
        if isinstance(seg, dict):  # as COCO: an RLE's extent, a polygon's extent
            box = masks_to_boxes(mask[None])[0].tolist()
        else:
            xs, ys = np.asarray(seg[0][0::2]), np.asarray(seg[0][1::2])
            box = [xs.min(), ys.min(), xs.max(), ys.max()]
        instances.append({"bbox": box, "bbox_label": i % 2, "ignore_flag": int(i == 3),
                          "mask": normalize_segmentation(seg, height, width)})
    img = np.concatenate([np.full((height, width, 3), 100, np.uint8)] +
                         [m[..., None].astype(np.uint8) * 255 for m in masks], axis=2)
    results = {"img": img, "img_shape": (height, width), "ori_shape": (height, width), "height": height,
               "width": width, "instances": instances, "img_id": 1}
    return LoadDetAnnotations()(results)


def grow(mask, pixels=1):
    """The mask dilated by ``pixels`` in every direction."""
    kernel = np.ones((2 * pixels + 1, 2 * pixels + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def lsj(size, seed, recompute_bbox=True, detectron2=False):
    d2 = dict(backend="pil", size_rule="detectron2") if detectron2 else {}
    pipeline = [DetRandomResize(scale=[size, size], ratio_range=[0.1, 2.0], **d2),
                DetRandomCrop(crop_size=[size, size], recompute_bbox=recompute_bbox,
                              offset="detectron2" if detectron2 else "independent"),
                FilterDetAnnotations(min_size=1.0), DetRandomFlip(prob=0.5)]
    results = scene()
    results["rng"] = np.random.default_rng(seed)
    for t in pipeline:
        results = t(results)
        if results is None:
            return None
    return results


@pytest.mark.parametrize("size", [128, 64])
def test_large_scale_jitter_keeps_boxes_and_masks_on_their_objects(size):
    checked = flipped = 0
    ious = []
    for seed in range(40):
        results = lsj(size, seed)
        if results is None:
            continue
        img = results["img"]
        assert img.shape[0] <= size and img.shape[1] <= size
        bitmaps = results["gt_masks"].to_bitmaps()
        assert bitmaps.shape[1:] == img.shape[:2] == tuple(results["img_shape"])
        # Which scene object each kept one is: the channel its mask lies on.
        for box, mask in zip(results["gt_bboxes"], bitmaps):
            if mask.sum() < 12:
                continue
            channel = int(np.argmax([img[..., 3 + k][mask].mean() for k in range(4)]))
            reference = img[..., 3 + channel] >= 128  # the object's pixels, moved as the image was
            # Same pixels up to the outline: each lies within the other grown by a pixel (by a
            # source pixel when upscaled: the reference is the source raster, scaled).
            r = int(np.ceil(max(1.0, *results["scale_factor"])))
            assert not (mask & ~grow(reference, r)).any(), (seed, channel)
            assert not (reference & ~grow(mask, r)).any(), (seed, channel)
            if min(box[2] - box[0], box[3] - box[1]) >= 8:
                ious.append((mask & reference).sum() / (mask | reference).sum())
            # The mask's bounding box is the transformed (and clipped) box, to a pixel.
            np.testing.assert_allclose(masks_to_boxes(mask[None])[0], box, atol=1.01)
            checked += 1
        flipped += results["flip"]
    assert checked > 40 and 0 < flipped
    assert np.mean(ious) > 0.85


def test_without_recompute_cut_objects_keep_the_clipped_box():
    contained = 0
    for seed in range(20):
        results = lsj(64, seed, recompute_bbox=False)
        if results is None:
            continue
        for box, mask in zip(results["gt_bboxes"], results["gt_masks"].to_bitmaps()):
            if mask.any():  # the mask's extent lies within the clipped box, to a pixel
                extent = masks_to_boxes(mask[None])[0]
                assert (extent[:2] >= box[:2] - 1.01).all() and (extent[2:] <= box[2:] + 1.01).all()
                contained += 1
    assert contained > 10


def test_crowd_regions_move_with_the_image():
    results = scene()
    results["rng"] = np.random.default_rng(0)
    results = DetRandomFlip(prob=1.0)(DetResize(scale=[60, 60])(results))
    crowd = results["gt_ignore_flags"]
    assert crowd.tolist() == [False, False, False, True]
    mask = results["gt_masks"][crowd].to_bitmaps()[0]
    reference = results["img"][..., 6] >= 128
    assert (mask & reference).sum() / (mask | reference).sum() > 0.8


def test_flip_is_exact_for_rle_and_boxes():
    results = scene()
    masks_before = results["gt_masks"].to_bitmaps()
    boxes_before = results["gt_bboxes"].copy()
    results["rng"] = np.random.default_rng(0)
    flipped = DetRandomFlip(prob=1.0)(results)
    assert flipped["flip"] and flipped["flip_direction"] == "horizontal"
    masks_after = flipped["gt_masks"].to_bitmaps()
    np.testing.assert_array_equal(masks_after[2], masks_before[2][:, ::-1])  # RLE: exact
    for before, after in zip(masks_before, masks_after):  # polygons: rasterised again, to a pixel
        assert (before[:, ::-1] ^ after).sum() <= 0.15 * before.sum()
    width = results["img"].shape[1]
    np.testing.assert_allclose(flipped["gt_bboxes"][:, [0, 2]], width - boxes_before[:, [2, 0]])
    np.testing.assert_array_equal(flipped["img"][..., 3 + 2] >= 128, masks_before[2][:, ::-1])
    vertical = DetRandomFlip(prob=1.0, direction="vertical")(scene() | {"rng": np.random.default_rng(0)})
    np.testing.assert_array_equal(vertical["gt_masks"].to_bitmaps()[2], masks_before[2][::-1])


def test_resize_keeps_ratio_to_the_longest_side():
    results = scene(height=480, width=640)
    out = DetResize(scale=[1024, 1024])(results)
    assert out["img"].shape[:2] == (768, 1024) and out["img_shape"] == (768, 1024)
    assert out["scale_factor"] == (1.6, 1.6)
    np.testing.assert_allclose(out["gt_bboxes"], scene(480, 640)["gt_bboxes"] * 1.6, rtol=1e-6)
    small = DetResize(scale=[128, 128])(scene(height=30, width=40))
    assert small["img"].shape[:2] == (96, 128)
    exact = DetResize(scale=[50, 20], keep_ratio=False)(scene(height=30, width=40))
    assert exact["img"].shape[:2] == (20, 50) and exact["gt_masks"].to_bitmaps().shape[1:] == (20, 50)


def test_random_resize_draws_from_the_sample_generator():
    sizes = []
    for seed in (0, 0, 1):
        results = scene()
        results["rng"] = np.random.default_rng(seed)
        sizes.append(DetRandomResize(scale=[128, 128], ratio_range=[0.1, 2.0])(results)["img"].shape[:2])
    assert sizes[0] == sizes[1] != sizes[2]
    ratio = np.random.default_rng(0).uniform(0.1, 2.0)
    side = int(128 * ratio)  # fits a square of side 128 * r, keeping 90x120's ratio
    assert sizes[0] == (int(90 * side / 120 + 0.5), int(120 * side / 120 + 0.5))


def test_crop_clips_boxes_drops_vanished_objects_and_refuses_empty_crops():
    results = scene()
    results["rng"] = np.random.default_rng(0)
    crop = DetRandomCrop(crop_size=[40, 60])
    out = crop(results)
    assert out["img"].shape[:2] == (40, 60)
    boxes = out["gt_bboxes"]
    assert (boxes[:, [0, 2]] <= 60).all() and (boxes[:, [1, 3]] <= 40).all() and (boxes >= 0).all()
    assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
    assert len(out["gt_masks"]) == len(boxes) == len(out["gt_labels"]) == len(out["gt_ignore_flags"])
    # A crop holding no object (only background) returns None unless negative crops are allowed.
    empty = {"img": np.zeros((100, 100, 3), np.uint8), "gt_bboxes": np.array([[0, 0, 5, 5]], np.float32),
             "gt_labels": np.array([0]), "gt_ignore_flags": np.array([False]),
             "rng": np.random.default_rng(3)}
    rng_state = np.random.default_rng(3)
    y0, x0 = rng_state.integers(0, 91), rng_state.integers(0, 91)
    assert y0 >= 5 or x0 >= 5  # the drawn crop misses the object
    assert DetRandomCrop(crop_size=[10, 10])(dict(empty)) is None
    negative = DetRandomCrop(crop_size=[10, 10], allow_negative_crop=True)
    kept = negative(dict(empty, rng=np.random.default_rng(3)))
    assert kept is not None and len(kept["gt_bboxes"]) == 0
    # Only a crowd region left: nothing to learn either.
    crowd = dict(empty, gt_bboxes=np.array([[0, 0, 100, 100]], np.float32), gt_ignore_flags=np.array([True]),
                 rng=np.random.default_rng(3))
    assert DetRandomCrop(crop_size=[10, 10])(crowd) is None


def test_recompute_bbox_gives_the_cropped_masks_extent():
    results = scene()
    results["rng"] = np.random.default_rng(5)
    before = results["gt_bboxes"].copy()
    out = DetRandomCrop(crop_size=[50, 50], recompute_bbox=True, allow_negative_crop=True)(results)
    bitmaps = out["gt_masks"].to_bitmaps()
    assert bitmaps.any(axis=(1, 2)).all()  # objects with no pixel left are gone
    for box, mask in zip(out["gt_bboxes"], bitmaps):
        extent = masks_to_boxes(mask[None])[0]
        inside = not ((box == 0) | (box == 50)).any()
        # a cut object gets its mask's extent; one inside the crop keeps its own (tight) box
        np.testing.assert_allclose(extent, box, atol=0 if not inside else 1.01)
    assert len(before) > len(out["gt_bboxes"])


def test_filter_small_boxes():
    results = {"gt_bboxes": np.array([[0, 0, 5, 5], [0, 0, 0.001, 5]], np.float32),
               "gt_labels": np.array([1, 2]),
               "gt_ignore_flags": np.array([False, False])}
    out = FilterDetAnnotations(min_size=0.01)(results)
    assert out["gt_labels"].tolist() == [1]
    assert FilterDetAnnotations(min_size=10, keep_empty=False)(out) is None


def test_pack_det_inputs():
    results = scene()
    results["rng"] = np.random.default_rng(0)
    results = DetRandomFlip(prob=1.0)(DetResize(scale=[60, 60])(results))
    results["img"] = np.ascontiguousarray(results["img"][..., :3])
    packed = PackDetInputs()(results)
    inputs, sample = packed["inputs"], packed["data_samples"]
    assert inputs.dtype == torch.uint8 and inputs.shape == (3, 45, 60)
    gt = sample.gt_instances
    assert gt.bboxes.dtype == torch.float32 and gt.labels.dtype == torch.int64 and gt.masks.dtype == torch.bool
    assert len(gt) == 3 and len(sample.ignored_instances) == 1
    assert gt.masks.shape == (3, 45, 60)
    np.testing.assert_array_equal(gt.masks.numpy(), results["gt_masks"].to_bitmaps()[:3])
    meta = sample.metainfo
    assert meta["img_id"] == 1 and meta["flip"] is True and meta["ori_shape"] == (90, 120)
    assert meta["img_shape"] == (45, 60) and meta["scale_factor"] == (0.5, 0.5)
    compact = PackDetInputs(mask_format="compact")(results)["data_samples"].gt_instances.masks
    assert isinstance(compact, InstanceMasks) and len(compact) == 3
    # Built from the registry by name.
    assert isinstance(TRANSFORMS.build(dict(type="PackDetInputs")), PackDetInputs)


def test_pipeline_is_reproducible_per_sample_seed():
    a, b, c = lsj(128, 7), lsj(128, 7), lsj(128, 8)
    np.testing.assert_array_equal(a["img"], b["img"])
    np.testing.assert_array_equal(a["gt_bboxes"], b["gt_bboxes"])
    assert a["img"].shape != c["img"].shape or not np.array_equal(a["img"], c["img"])


def test_bad_transform_arguments():
    with pytest.raises(ConfigError, match="crop_size"):
        DetRandomCrop(crop_size=[0, 10])
    with pytest.raises(ConfigError, match="ratio_range"):
        DetRandomResize(ratio_range=[2.0, 0.1])
    with pytest.raises(ConfigError, match="direction"):
        DetRandomFlip(direction="diagonal")
    with pytest.raises(ConfigError, match="mask_format"):
        PackDetInputs(mask_format="polygons")


def test_data_preprocessor_pads_and_records_shapes():
    pre = DetDataPreprocessor(size=[64, 64], size_divisor=32, pad_mask=True)
    samples = []
    images = [torch.randint(0, 255, (3, 40, 50), dtype=torch.uint8),
              torch.randint(0, 255, (3, 70, 20), dtype=torch.uint8)]
    for img in images:
        results = {"img": img.permute(1, 2, 0).numpy(), "img_shape": tuple(img.shape[1:]),
                   "gt_bboxes": np.array([[1, 1, 5, 5]], np.float32), "gt_labels": np.array([0]),
                   "gt_ignore_flags": np.array([False]),
                   "gt_masks": InstanceMasks([[np.array([1, 1, 5, 1, 5, 5, 1, 5], float)]],
                                             tuple(img.shape[1:]))}
        samples.append(PackDetInputs()(results)["data_samples"])
    out = pre({"inputs": images, "data_samples": samples}, training=True)
    batch = out["inputs"]
    assert batch.shape == (2, 3, 96, 64)  # max(70, 64) -> 96 (divisor 32), max(50, 64) -> 64
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    torch.testing.assert_close(batch[0, :, :40, :50], (images[0].float() - mean) / std)
    assert batch[0, :, 40:].abs().max() == 0 and batch[0, :, :, 50:].abs().max() == 0
    for sample, img in zip(out["data_samples"], images):
        assert sample.metainfo["batch_input_shape"] == (96, 64) and sample.metainfo["pad_shape"] == (96, 64)
        assert sample.metainfo["img_shape"] == tuple(img.shape[1:])
        assert sample.gt_instances.masks.shape == (1, 96, 64)
    plain = DetDataPreprocessor()({"inputs": images, "data_samples": None})["inputs"]
    assert plain.shape == (2, 3, 70, 50)
    with pytest.raises(ConfigError):
        DetDataPreprocessor(size=[64])


def test_masks_drawn_in_windows_equal_whole_canvas_drawing():
    """Rasterising each mask in the window of its extent gives what pycocotools (polygons) and
    OpenCV (RLE) give drawing on the whole canvas, for random maps, crops and flips."""
    rng = np.random.default_rng(0)
    height, width = 50, 70
    for trial in range(30):
        n = int(rng.integers(3, 9))
        centre, radius = rng.uniform(0, 70, 2), rng.uniform(2, 30)
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        poly = np.stack([centre[0] + radius * np.cos(angles),
                         centre[1] + radius * np.sin(angles)], 1).reshape(-1)
        rle = mask_utils.encode(np.asfortranarray((rng.random((height, width)) < 0.3).astype(np.uint8)))
        masks = InstanceMasks([[poly], rle], (height, width))
        sx, sy = rng.uniform(0.2, 2.5, 2)
        shape = (int(height * sy), int(width * sx))
        masks = masks.rescale(sx, sy, shape)
        dx, dy = -rng.uniform(0, shape[1] / 2), -rng.uniform(0, shape[0] / 2)
        crop = (int(rng.integers(5, 60)), int(rng.integers(5, 60)))
        masks = masks.translate(float(int(dx)), float(int(dy)), crop)
        if trial % 2:
            masks = masks.flip("horizontal" if trial % 4 == 1 else "vertical")
        a_x, b_x, a_y, b_y = masks.affine
        got = masks.to_bitmaps()
        # polygon: the whole canvas through pycocotools
        moved = poly.copy()
        moved[0::2], moved[1::2] = poly[0::2] * a_x + b_x, poly[1::2] * a_y + b_y
        whole = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([moved.tolist()], *crop)))
        whole = whole.astype(bool)
        np.testing.assert_array_equal(got[0], whole, err_msg=f"polygon, trial {trial}")
        # RLE: the whole canvas warped by OpenCV, pixel centres mapped
        matrix = np.array([[a_x, 0, 0.5 * a_x + b_x - 0.5], [0, a_y, 0.5 * a_y + b_y - 0.5]])
        warped = cv2.warpAffine(mask_utils.decode(rle), matrix, (crop[1], crop[0]), flags=cv2.INTER_NEAREST)
        np.testing.assert_array_equal(got[1], warped.astype(bool), err_msg=f"rle, trial {trial}")


# --- detectron2's LSJ: PIL's resize, ResizeScale's sizes, FixedSizeCrop's offsets -------------


class FixedUniform:
    """A sample generator whose ``uniform`` answers given values."""

    def __init__(self, *values):
        self.values = list(values)

    def uniform(self, low, high):
        return self.values.pop(0)


@pytest.mark.parametrize("size", [(23, 31), (90, 120), (300, 410)])
def test_pil_backend_is_pil_bilinear(size):
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (180, 240, 3), dtype=np.uint8)
    out = DetResize(scale=[size[1], size[0]], keep_ratio=False, backend="pil")({"img": rgb.copy()})["img"]
    want = np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.BILINEAR))
    np.testing.assert_array_equal(out, want)
    # A one-pixel checkerboard shrunk to 15 px: PIL's filter spans the scale (an even grey),
    # OpenCV's bilinear samples 2x2 pixels and aliases (from near black to near white).
    board = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)[..., None].repeat(3, 2)
    pil = DetResize(scale=[15, 15], keep_ratio=False, backend="pil")({"img": board.copy()})["img"]
    cv = DetResize(scale=[15, 15], keep_ratio=False)({"img": board.copy()})["img"]
    assert pil.min() >= 120 and pil.max() <= 135
    assert cv.min() < 60 and cv.max() > 195
    # More channels than PIL has modes for (the test scene's masks): each resized alike.
    many = scene()["img"]
    out = DetResize(scale=[50, 40], keep_ratio=False, backend="pil")({"img": many.copy()})["img"]
    want = np.asarray(Image.fromarray(np.ascontiguousarray(many[..., :3])).resize((50, 40), Image.BILINEAR))
    np.testing.assert_array_equal(out[..., :3], want)


def test_detectron2_resize_scale_sizes_by_hand():
    # 480 x 640 in the box 1024 x 0.5: factor min(512 / 480, 512 / 640) = 0.8 -> 384 x 512.
    results = {"img": np.zeros((480, 640, 3), np.uint8), "rng": FixedUniform(0.5)}
    t = DetRandomResize(scale=[1024, 1024], ratio_range=[0.1, 2.0], backend="pil", size_rule="detectron2")
    assert t(results)["img"].shape[:2] == (384, 512)
    # 5 x 10 in a box of 10 x 0.5: factor 0.5 -> 2.5 x 5, rounded half to even: 2 (mmcv's rule: 3).
    results = {"img": np.zeros((5, 10, 3), np.uint8), "rng": FixedUniform(0.5)}
    small = DetRandomResize(scale=[10, 10], backend="pil", size_rule="detectron2")
    assert small(results)["img"].shape[:2] == (2, 5)
    mmcv = DetRandomResize(scale=[10, 10])({"img": np.zeros((5, 10, 3), np.uint8), "rng": FixedUniform(0.5)})
    assert mmcv["img"].shape[:2] == (3, 5)
    # Not truncated: box 1000 x 0.3337 = 333.7; 1000 x 500 -> factor 0.3337 -> 334 x 167 (mmcv: 333).
    results = {"img": np.zeros((500, 1000, 3), np.uint8), "rng": FixedUniform(0.3337)}
    assert DetRandomResize(scale=[1000, 1000], size_rule="detectron2")(results)["img"].shape[:2] == (167, 334)
    with pytest.raises(ConfigError, match="size_rule"):
        DetRandomResize(size_rule="d2")
    with pytest.raises(ConfigError, match="backend"):
        DetResize(backend="skimage")


def test_detectron2_crop_offset_by_hand():
    img = np.arange(100 * 90, dtype=np.int64).reshape(100, 90, 1).astype(np.uint8)
    results = {"img": img, "rng": FixedUniform(0.25)}
    out = DetRandomCrop(crop_size=[60, 60], offset="detectron2")(results)
    # Margins 40 and 30; u = 0.25: offsets round(10) = 10 and round(7.5) = 8 (half to even).
    np.testing.assert_array_equal(out["img"], img[10:70, 8:68])
    with pytest.raises(ConfigError, match="offset"):
        DetRandomCrop(offset="random")


def test_detectron2_lsj_pipeline():
    for seed in range(12):
        results = lsj(128, seed, detectron2=True)
        if results is None:
            continue
        img, boxes = results["img"], results["gt_bboxes"]
        assert img.shape[0] <= 128 and img.shape[1] <= 128 and img.dtype == np.uint8
        assert results["gt_masks"].to_bitmaps().shape[1:] == img.shape[:2]
        assert (boxes[:, [0, 2]] <= img.shape[1]).all() and (boxes[:, [1, 3]] <= img.shape[0]).all()
    a, b = lsj(128, 3, detectron2=True), lsj(128, 3, detectron2=True)
    np.testing.assert_array_equal(a["img"], b["img"])
