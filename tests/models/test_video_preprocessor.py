"""VideoDataPreprocessor: normalisation, views folded into the batch with num_views, batch
augments on whole clips, errors."""

import pytest
import torch

import vitasks.models  # noqa: F401  (registers)
from vitasks.errors import ConfigError
from vitasks.models.data_preprocessors import VideoDataPreprocessor
from vitasks.registry import MODELS
from vitasks.structures import DataSample

MEAN, STD = (100.0, 110.0, 120.0), (50.0, 60.0, 70.0)


def clips(n, views=None, t=2, size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (3, t, size, size) if views is None else (views, 3, t, size, size)
    return [torch.randint(0, 256, shape, generator=g, dtype=torch.uint8) for _ in range(n)]


def labelled(n):
    return [DataSample(gt_label=torch.tensor([i % 3])) for i in range(n)]


def normalised(clip):
    mean = torch.tensor(MEAN).view(3, 1, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1, 1)
    return (clip.float() - mean) / std


def test_single_view_clips_are_normalised_per_channel():
    pre = MODELS.build(dict(type="VideoDataPreprocessor", mean=MEAN, std=STD))
    inputs = clips(3)
    out = pre({"inputs": inputs, "data_samples": labelled(3)})
    assert out["inputs"].shape == (3, 3, 2, 4, 4) and out["inputs"].dtype == torch.float32
    for i in range(3):
        assert torch.allclose(out["inputs"][i], normalised(inputs[i]))
    assert [s.num_views for s in out["data_samples"]] == [1, 1, 1]


def test_views_fold_into_the_batch_in_sample_order():
    pre = VideoDataPreprocessor(mean=MEAN, std=STD)
    inputs = clips(2, views=3)
    out = pre({"inputs": inputs, "data_samples": labelled(2)})
    assert out["inputs"].shape == (6, 3, 2, 4, 4)
    for n in range(2):
        for v in range(3):
            assert torch.allclose(out["inputs"][n * 3 + v], normalised(inputs[n][v]))
    assert [s.num_views for s in out["data_samples"]] == [3, 3]
    # An already stacked tensor works as well (inference helpers).
    stacked = pre({"inputs": torch.stack(inputs)})["inputs"]
    assert torch.equal(stacked, out["inputs"])


def test_batch_augments_mix_whole_clips_and_make_soft_targets():
    pre = VideoDataPreprocessor(mean=MEAN, std=STD, num_classes=4,
                                batch_augments=dict(augments=[dict(type="Mixup", alpha=0.8)], probs=[1.0]))
    inputs = clips(4, t=3)
    samples = [DataSample(gt_label=torch.tensor([i])) for i in range(4)]  # one class each
    torch.manual_seed(0)
    out = pre({"inputs": inputs, "data_samples": samples}, training=True)
    # Mixup: each output is lam * own + (1 - lam) * other; recover lam from the soft targets.
    plain = torch.stack([normalised(c) for c in inputs])
    for i, sample in enumerate(out["data_samples"]):
        score = sample.gt_score
        assert score.shape == (4,) and score.sum().item() == pytest.approx(1.0)
        lam = float(score[i])  # 1 when the permutation left the clip with itself
        others = [j for j in range(4)
                  if torch.allclose(out["inputs"][i], lam * plain[i] + (1 - lam) * plain[j], atol=1e-4)]
        assert others, f"sample {i} is not a mix of itself and another clip"
    # Not in evaluation.
    evaluated = pre({"inputs": inputs, "data_samples": labelled(4)}, training=False)
    assert torch.allclose(evaluated["inputs"], plain)
    assert all("gt_score" not in s for s in evaluated["data_samples"])


def test_errors():
    with pytest.raises(ConfigError, match="num_classes"):
        VideoDataPreprocessor(batch_augments=dict(augments=[dict(type="Mixup")]))
    with pytest.raises(ConfigError, match="3 values"):
        VideoDataPreprocessor(mean=(1.0, 2.0), std=(1.0, 2.0))
    pre = VideoDataPreprocessor()
    with pytest.raises(ValueError, match="differ in shape"):
        pre({"inputs": clips(1, views=2) + clips(1, views=3)})
    with pytest.raises(ValueError, match=r"\(3, T, H, W\)"):
        pre({"inputs": [torch.zeros(4, 2, 4, 4, dtype=torch.uint8)]})
