"""RoIAlign against (1) values worked out by hand from the published definition on a 4x4 ramp and
(2) a brute-force loop over RoIs, bins and samples written from that definition."""

import importlib

import pytest
import torch

from ops_references import brute_roi_align
from vitasks.models.ops import roi_align

# CI's second leg runs these too: on torchvision's kernels there (.ci/run).
pytestmark = pytest.mark.torch_leg

# The package exports the function ``roi_align``, which hides the module of the same name.
roi_align_module = importlib.import_module("vitasks.models.ops.roi_align")


def ramp() -> torch.Tensor:
    """The 4x4 image f(y, x) = 4y + x + 1 (values 1..16): bilinear interpolation reproduces it
    exactly inside the image, so each bin is the mean of 4y + x + 1 over its samples."""
    return (torch.arange(16, dtype=torch.float32) + 1).reshape(1, 1, 4, 4)


def roi(*box) -> torch.Tensor:
    return torch.tensor([[0.0, *box]])


# Each case: RoI, output size, spatial scale, sampling ratio, aligned, expected bins, and why.
HAND_WORKED = [
    # Aligned RoI (0,0)-(4,4) -> (-0.5..3.5); 2x2 bins of 2 cells, 2x2 samples per bin at
    # y, x in {0, 1} and {2, 3}: bin (0, 0) = mean of f at (0,0), (0,1), (1,0), (1,1) = 3.5.
    ((0, 0, 4, 4), 2, 1.0, 2, True, [[3.5, 5.5], [11.5, 13.5]]),
    # The same RoI given in image pixels at stride 2 (spatial_scale 0.5).
    ((0, 0, 8, 8), 2, 0.5, 2, True, [[3.5, 5.5], [11.5, 13.5]]),
    # Adaptive sampling: ceil(4 / 2) = 2 samples per bin side, the same samples.
    ((0, 0, 4, 4), 2, 1.0, 0, True, [[3.5, 5.5], [11.5, 13.5]]),
    # Aligned RoI (0,0)-(6,6) -> (-0.5..5.5), one bin. Adaptive: ceil(6 / 1) = 6 samples per side
    # at 0..5. Per axis: 0, 1, 2, 3 read rows 0-3; 4 (<= 4 = height) is clamped onto row 3;
    # 5 (> height) is outside and contributes 0 but counts. Sum over the 5 x 5 valid samples of
    # 4y + x + 1 with y, x in {0, 1, 2, 3, 3}: 4*9*5 + 9*5 + 25 = 250; mean over 36 = 6.9444.
    ((0, 0, 6, 6), 1, 1.0, 0, True, [[250 / 36]]),
    # Same RoI, 2 samples per side at -0.5 + 1.5 + 3i = 1, 4 (4 clamps to row 3):
    # mean of f over y, x in {1, 3} = 4*2 + 2 + 1 = 11.
    ((0, 0, 6, 6), 1, 1.0, 2, True, [[11.0]]),
    # Same RoI, 1 sample at -0.5 + 3 = 2.5: f(2.5, 2.5) = 10 + 2.5 + 1 = 13.5.
    ((0, 0, 6, 6), 1, 1.0, 1, True, [[13.5]]),
    # Not aligned: a 0.5-cell RoI at (1, 1) is widened to 1 cell; one sample at 1.5: 8.5.
    ((1, 1, 1.5, 1.5), 1, 1.0, 1, False, [[8.5]]),
    # Aligned keeps the 0.5-cell RoI: start 0.5, sample at 0.75: 3 + 0.75 + 1 = 4.75.
    ((1, 1, 1.5, 1.5), 1, 1.0, 1, True, [[4.75]]),
    # A sample exactly one cell outside (y = x = -1) is still clamped onto cell (0, 0): f = 1 ...
    ((-1.5, -1.5, -0.5, -0.5), 1, 1.0, 1, False, [[1.0]]),
    # ... and one just beyond that (-1.01) contributes 0.
    ((-1.51, -1.51, -0.51, -0.51), 1, 1.0, 1, False, [[0.0]]),
]


@pytest.mark.parametrize("box,size,scale,ratio,aligned,expected", HAND_WORKED)
def test_roi_align_hand_worked_cases(box, size, scale, ratio, aligned, expected):
    out = roi_align(ramp(), roi(*box), size, scale, ratio, aligned)
    torch.testing.assert_close(out[0, 0], torch.tensor(expected, dtype=torch.float32))
    # The brute-force reference agrees with the hand-worked values too.
    brute = brute_roi_align(ramp(), roi(*box), (size, size), scale, ratio, aligned)
    torch.testing.assert_close(brute[0, 0], torch.tensor(expected, dtype=torch.float64))


def random_rois(n: int, num_images: int, height: int, width: int, seed: int) -> torch.Tensor:
    """RoIs in image pixels (stride 2) of all kinds: inside, partly and fully outside the image,
    tiny, large, zero-size and inverted."""
    g = torch.Generator().manual_seed(seed)
    top_left = torch.rand(n, 2, generator=g) * torch.tensor([2 * width + 8, 2 * height + 8]) - 6
    size = torch.rand(n, 2, generator=g) * torch.tensor([2 * width, 2 * height]) * 0.7
    boxes = torch.cat((top_left, top_left + size), dim=1)
    boxes[::9, 2:] = boxes[::9, :2]  # zero size
    boxes[4::11, 2:] = boxes[4::11, :2] - 3  # inverted
    batch = torch.randint(0, num_images, (n, 1), generator=g).float()
    return torch.cat((batch, boxes), dim=1)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 3])
def test_roi_align_equals_brute_force(aligned, sampling_ratio):
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 3, 9, 11, generator=g)
    rois = random_rois(30, 2, 9, 11, seed=2)
    out = roi_align(features, rois, (3, 2), 0.5, sampling_ratio, aligned)
    assert out.shape == (30, 3, 3, 2) and out.dtype == torch.float32
    expected = brute_roi_align(features, rois, (3, 2), 0.5, sampling_ratio, aligned)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_roi_align_memory_steps_do_not_change_the_result_or_gradient(monkeypatch):
    features = torch.randn(2, 4, 12, 10)
    rois = random_rois(25, 2, 12, 10, seed=3)
    projection = torch.randn(25, 4, 4, 4)

    def output_and_gradient():
        leaf = features.clone().requires_grad_(True)
        out = roi_align(leaf, rois, 4, 0.5, 0, True)
        (out * projection).sum().backward()
        return out.detach(), leaf.grad

    whole, whole_grad = output_and_gradient()
    # 50: below one RoI's output row, steps of one RoI and one output row; 2000: a few RoIs.
    for budget in (50, 2000):
        monkeypatch.setattr(roi_align_module, "GATHER_BUDGET", budget)
        out, grad = output_and_gradient()
        torch.testing.assert_close(out, whole)
        torch.testing.assert_close(grad, whole_grad)


def test_roi_align_box_list_input_and_empty_rois():
    features = torch.randn(2, 3, 8, 8)
    per_image = [torch.tensor([[0.0, 0.0, 5.0, 5.0], [1.0, 2.0, 7.0, 4.0]]), torch.tensor([[2.0, 2.0, 6.0, 8.0]])]
    rois = torch.tensor([[0, 0.0, 0.0, 5.0, 5.0], [0, 1.0, 2.0, 7.0, 4.0], [1, 2.0, 2.0, 6.0, 8.0]])
    torch.testing.assert_close(roi_align(features, per_image, 2, 1.0, 2, True), roi_align(features, rois, 2, 1.0, 2, True))
    assert roi_align(features, torch.zeros(0, 5), 7, 1.0, 0, True).shape == (0, 3, 7, 7)
    assert roi_align(features, [torch.zeros(0, 4), torch.zeros(0, 4)], (7, 5)).shape == (0, 3, 7, 5)
    with pytest.raises(ValueError, match=r"\(K, 5\)"):
        roi_align(features, torch.zeros(3, 4), 7)


def test_roi_align_gradient_matches_finite_differences():
    # RoIAlign is linear in the features, so the analytic gradient must equal the numerical one.
    features = torch.randn(2, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    rois = random_rois(6, 2, 6, 5, seed=4).double()
    assert torch.autograd.gradcheck(lambda f: roi_align(f, rois, 2, 0.5, 0, True), (features,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda f: roi_align(f, rois, (2, 3), 0.5, 2, False), (features,), fast_mode=True)


def test_roi_align_half_precision_and_autocast():
    features = torch.randn(1, 4, 10, 10)
    rois = torch.tensor([[0, 1.0, 1.0, 15.0, 12.0], [0, 3.0, 0.0, 9.0, 19.0]])
    reference = roi_align(features, rois, 3, 0.5, 0, True)
    out = roi_align(features.bfloat16(), rois.bfloat16(), 3, 0.5, 0, True)
    assert out.dtype == torch.bfloat16
    # Within bfloat16 rounding of the inputs and the output.
    torch.testing.assert_close(out.float(), reference, rtol=0.02, atol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = roi_align(features, rois, 3, 0.5, 0, True)
    # Under autocast the float32 input stays float32: the matmuls inside are not lowered.
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference)
