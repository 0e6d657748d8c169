"""LoadImage, Albu (image + mask), ResizeCenterCrop and PackInputs keep the data conventions."""

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import vitasks.data  # noqa: F401
from vitasks.data.transforms import Albu, LoadImage, PackInputs, ResizeCenterCrop
from vitasks.errors import ConfigError, DataError
from vitasks.registry import TRANSFORMS


def test_load_image_is_rgb_uint8_hwc(tmp_path):
    img = np.zeros((5, 7, 3), np.uint8)
    img[0, 0] = (255, 0, 0)  # red in RGB order
    path = str(tmp_path / "a.png")
    Image.fromarray(img).save(path)
    out = TRANSFORMS.build(dict(type="LoadImage"))({"img_path": path})
    assert out["img"].dtype == np.uint8 and out["img"].shape == (5, 7, 3)
    np.testing.assert_array_equal(out["img"], img)
    assert out["ori_shape"] == (5, 7) and out["img_shape"] == (5, 7)
    gray = str(tmp_path / "g.png")
    Image.fromarray(np.full((3, 4), 77, np.uint8)).save(gray)
    out = LoadImage()({"img_path": gray})
    assert out["img"].shape == (3, 4, 3) and (out["img"] == 77).all()


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.png"):
        LoadImage()({"img_path": str(tmp_path / "missing.png")})
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="bad.jpg"):
        LoadImage()({"img_path": str(bad)})


def test_albu_keeps_uint8_and_transforms_mask_alike():
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 5, (24, 30)).astype(np.uint8)
    img = np.stack([seg * 40, seg * 10, np.full_like(seg, 3)], axis=-1).astype(np.uint8)
    albu = TRANSFORMS.build(dict(type="Albu", transforms=[
        dict(type="RandomResizedCrop", size=[16, 16], scale=[0.3, 1.0], interpolation="nearest"),
        dict(type="HorizontalFlip", p=1.0),
    ]))
    out = albu({"img": img.copy(), "gt_seg_map": seg.copy(), "img_shape": (24, 30)})
    assert out["img"].dtype == np.uint8 and out["img"].shape == (16, 16, 3)
    assert out["img_shape"] == (16, 16)
    assert out["gt_seg_map"].shape == (16, 16)
    # Same geometry on both: the image's first channel still encodes the mask.
    np.testing.assert_array_equal(out["img"][..., 0], out["gt_seg_map"] * 40)


def test_albu_flip_matches_numpy():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    out = Albu([dict(type="HorizontalFlip", p=1.0)])({"img": img.copy()})
    np.testing.assert_array_equal(out["img"], img[:, ::-1])
    assert "gt_seg_map" not in out


def test_albu_config_errors():
    with pytest.raises(ConfigError, match="RandomResizedCorp.*did you mean RandomResizedCrop"):
        Albu([dict(type="RandomResizedCorp", size=[8, 8])])
    with pytest.raises(ConfigError, match=r"transforms\[1\].*HorizontalFlip.*pp"):
        Albu([dict(type="HorizontalFlip"), dict(type="HorizontalFlip", pp=0.5)])
    with pytest.raises(ConfigError, match="RandomResizedCrop"):
        Albu([dict(type="RandomResizedCrop", size=[8])])
    with pytest.raises(ConfigError, match="interpolation.*'bicubicc'"):
        Albu([dict(type="Resize", height=4, width=4, interpolation="bicubicc")])
    with pytest.raises(ConfigError, match="type"):
        Albu([dict(p=1.0)])
    # Nested composers are built recursively, with errors naming the path.
    Albu([dict(type="OneOf", transforms=[dict(type="HorizontalFlip"), dict(type="VerticalFlip")])])
    with pytest.raises(ConfigError, match=r"OneOf\.transforms\[0\]"):
        Albu([dict(type="OneOf", transforms=[dict(type="HorizontallFlip")])])


def test_resize_center_crop_matches_independent_computation():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (20, 40, 3)).astype(np.uint8)  # H=20, W=40
    out = ResizeCenterCrop(size=32, crop_ratio=0.5, interpolation="nearest")({"img": img.copy()})
    # Shorter side 20 -> 64 (= 32 / 0.5): 64 x 128, then the central 32 x 32.
    resized = cv2.resize(img, (128, 64), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(out["img"], resized[16:48, 48:80])
    assert out["img"].dtype == np.uint8
    # ImageNet's default: 224 / 0.875 = 256.
    assert ResizeCenterCrop(224).transforms[0]["max_size"] == 256


def test_pack_inputs_conventions():
    img = np.random.default_rng(2).integers(0, 256, (4, 5, 3)).astype(np.uint8)
    seg = np.arange(20, dtype=np.uint8).reshape(4, 5)
    results = {"img": img, "gt_label": 3, "gt_seg_map": seg, "img_path": "x.png",
               "ori_shape": (8, 10), "img_shape": (4, 5), "other": 1}
    packed = PackInputs()(results)
    inputs, sample = packed["inputs"], packed["data_samples"]
    assert inputs.dtype == torch.uint8 and inputs.shape == (3, 4, 5)
    torch.testing.assert_close(inputs, torch.from_numpy(img).permute(2, 0, 1))
    assert sample.gt_label.dtype == torch.long and sample.gt_label.tolist() == [3]
    assert sample.gt_sem_seg.data.shape == (1, 4, 5) and sample.gt_sem_seg.data.dtype == torch.long
    torch.testing.assert_close(sample.gt_sem_seg.data[0], torch.from_numpy(seg).long())
    assert sample.img_path == "x.png" and sample.ori_shape == (8, 10) and sample.img_shape == (4, 5)
    assert "other" not in sample
    plain = PackInputs(meta_keys=("img_path",))({"img": img, "img_path": "y.png"})
    assert "gt_label" not in plain["data_samples"] and plain["data_samples"].img_path == "y.png"


@pytest.mark.parametrize("height, width, ratio, expected", [
    # 512 * 0.19707 = 100.9 -> 100 and 2048 * 0.19707 = 403.6 -> 403: factor min(403/100, 100/100) = 1,
    # so the 100 x 100 image stays 100 x 100 (the untruncated scale would give 101 x 101).
    (100, 100, 0.19707, (100, 100)),
    # 2048 * 0.49 = 1003.52 -> 1003 and 512 * 0.49 = 250.88 -> 250: factor min(1003/1000, 250/100)
    # = 1.003: H = int(100.3 + 0.5) = 100, W = int(1003 + 0.5) = 1003 (untruncated: 1004).
    (100, 1000, 0.49, (100, 1003)),
    # 2048 * 0.5 = 1024, 512 * 0.5 = 256: factor min(1024/640, 256/480) = 0.5333:
    # H = int(256 + 0.5) = 256, W = int(341.33 + 0.5) = 341.
    (480, 640, 0.5, (256, 341)),
])
def test_seg_random_resize_truncates_the_scale_like_mmcv(height, width, ratio, expected):
    resize = TRANSFORMS.build(dict(type="SegRandomResize", scale=[2048, 512], ratio_range=[ratio, ratio]))
    results = {"img": np.zeros((height, width, 3), np.uint8), "gt_seg_map": np.zeros((height, width), np.uint8),
               "seg_fields": ["gt_seg_map"], "rng": np.random.default_rng(0)}
    out = resize(results)
    assert out["img"].shape[:2] == expected and out["gt_seg_map"].shape == expected
    assert tuple(out["img_shape"]) == expected
