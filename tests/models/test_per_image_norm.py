"""Per-image standardisation (``data_preprocessor.per_image_norm``) against its formula computed
in numpy, one image and channel at a time, and inside the cls / seg / det preprocessors."""

import numpy as np
import pytest
import torch

from vitasks.errors import ConfigError
from vitasks.models.data_preprocessors import ClsDataPreprocessor, DetDataPreprocessor, SegDataPreprocessor
from vitasks.models.data_preprocessors.normalization import IMAGENET_MEAN, IMAGENET_STD, PerImageStandardization
from vitasks.structures import DataSample, PixelData


def reference(img: np.ndarray, eps: float, border: int) -> np.ndarray:
    """img: (C, H, W) float64 -> the documented formula, written out per channel."""
    out = np.empty_like(img)
    height, width = img.shape[1:]
    for c in range(img.shape[0]):
        x = img[c]
        z = (x - x.mean()) / (x.std(ddof=1) + eps)  # torch.std is the unbiased estimate
        if border:
            frame = np.concatenate([z[:border].ravel(), z[height - border:].ravel(),
                                    z[border:height - border, :border].ravel(),
                                    z[border:height - border, width - border:].ravel()])
            if frame.mean() > 0:
                z = -z
        out[c] = z
    return out


def test_matches_the_formula_per_image_and_channel():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 12, 10, generator=gen) * 4 - 2
    images[0, 1, 3:8, 3:7] += 5  # a bright object: channel 1 of image 0 keeps its sign
    images[1, 2] = -images[1, 2]
    images[1, 2, 3:8, 3:7] -= 5  # a dark object: channel 2 of image 1 gets flipped
    norm = PerImageStandardization(eps=0.3, border=2)
    got = norm(images).double().numpy()
    for i in range(3):
        np.testing.assert_allclose(got[i], reference(images[i].double().numpy(), 0.3, 2), rtol=1e-5, atol=1e-5)
    # The object is above the mean in both cases: the sign follows the border, not the colour.
    assert got[0, 1, 5, 5] > 1 and got[1, 2, 5, 5] > 1


def test_polarity_and_colour_do_not_matter():
    """The same shape in two colour schemes (light on dark, dark on light, other colours)
    standardises to the same tensor: what the demo recipe relies on."""
    mask = torch.zeros(16, 16)
    mask[4:12, 6:10] = 1
    light_on_dark = torch.stack([mask * 200 + 20, mask * 90 + 40, mask * 10 + 100])
    dark_on_light = torch.stack([240 - mask * 180, 200 - mask * 50, 30 + mask * 150])
    norm = PerImageStandardization(eps=1e-6, border=2)
    a, b = norm(light_on_dark[None]), norm(dark_on_light[None])
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_border_zero_only_standardises():
    images = torch.randn(2, 3, 8, 8) * 3 + 1
    got = PerImageStandardization(eps=0.5, border=0)(images).double().numpy()
    for i in range(2):
        np.testing.assert_allclose(got[i], reference(images[i].double().numpy(), 0.5, 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg, key", [({"eps": 0}, "eps"), ({"border": -1}, "border"), ({"eps": 1, "size": 3}, "unknown"),
                                      ("yes", "per_image_norm")])
def test_bad_config_names_the_key(cfg, key):
    with pytest.raises(ConfigError, match=key):
        PerImageStandardization.from_config(cfg, "ClsDataPreprocessor")


def test_cls_preprocessor_applies_it_after_mean_std():
    images = [torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8) for _ in range(3)]
    prep = ClsDataPreprocessor(per_image_norm={"eps": 0.3, "border": 3})
    out = prep({"inputs": images, "data_samples": None})["inputs"]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for img, got in zip(images, out):
        expected = reference(((img.double() - mean.double()) / std.double()).numpy(), 0.3, 3)
        np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-4, atol=1e-4)
    plain = ClsDataPreprocessor()({"inputs": images, "data_samples": None})["inputs"]
    assert not torch.allclose(plain, out)


@pytest.mark.parametrize("prep_type", [SegDataPreprocessor, DetDataPreprocessor])
def test_padded_preprocessors_use_each_images_own_pixels(prep_type):
    """Images of different sizes: the statistics come from each image, not its padding."""
    images = [torch.randint(0, 256, (3, 10, 14), dtype=torch.uint8), torch.randint(0, 256, (3, 16, 12), dtype=torch.uint8)]
    prep = prep_type(per_image_norm=True, pad_val=0.0)
    samples = None
    if prep_type is SegDataPreprocessor:
        samples = [DataSample(gt_sem_seg=PixelData(data=torch.zeros(1, *img.shape[1:], dtype=torch.long)))
                   for img in images]
    out = prep({"inputs": images, "data_samples": samples}, training=False)["inputs"]
    assert out.shape[-2:] == (16, 14)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for img, got in zip(images, out):
        h, w = img.shape[1:]
        expected = reference(((img.double() - mean.double()) / std.double()).numpy(), 0.3, 4)
        np.testing.assert_allclose(got[:, :h, :w].double().numpy(), expected, rtol=1e-4, atol=1e-4)
        assert torch.all(got[:, h:, :] == 0) and torch.all(got[:, :, w:] == 0)
