"""The ADE20K schedules against the reference recipes' numbers.

- mmsegmentation's ``schedule_160k`` (SETR, Segmenter): poly decay, power 0.9, down to 1e-4, no
  warm-up, 160k iterations.
- BEiT / MAE UperNet (``_base_/schedules/poly_160k.yaml``): 1500 linear warm-up iterations from
  1e-6 x lr, then poly decay of power 1.0 to 0 until iteration 160k.
"""

import os

import pytest
import torch
from mmengine.optim.scheduler import PolyLR

from vitasks.config import load_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def schedulers(name):
    return [dict(s) for s in load_config(os.path.join(CONFIGS, name)).param_scheduler]


@pytest.mark.parametrize("name", ["seg_ade20k_setr_pup.yaml", "seg_ade20k_segmenter.yaml"])
def test_mmseg_160k_schedule(name):
    (poly,) = schedulers(name)
    assert poly["type"] == "PolyLR" and not poly["by_epoch"]
    assert (poly["power"], poly["eta_min"], poly["begin"], poly["end"]) == (0.9, 1.0e-4, 0, 160000)


def test_beit_mae_160k_schedule():
    warmup, poly = schedulers("seg_ade20k.yaml")
    assert (warmup["type"], warmup["start_factor"], warmup["begin"], warmup["end"]) == ("LinearLR", 1.0e-6, 0, 1500)
    assert (poly["type"], poly["power"], poly["eta_min"], poly["begin"], poly["end"]) == ("PolyLR", 1.0, 0.0, 1500, 160000)


def test_setr_learning_rate_follows_the_closed_form():
    # lr(t) = (lr0 - eta_min) * (1 - t / T) ** 0.9 + eta_min, stepped by mmengine from the config.
    (poly,) = schedulers("seg_ade20k_setr_pup.yaml")
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0e-3)
    kwargs = {k: v for k, v in poly.items() if k != "type"}
    scheduler = PolyLR(optimizer, **kwargs)
    lrs = []
    for _ in range(400):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    for t in (0, 1, 123, 399):
        expected = (1.0e-3 - 1.0e-4) * (1 - t / 160000) ** 0.9 + 1.0e-4
        assert lrs[t] == pytest.approx(expected, rel=1e-7)  # mmengine steps it recursively
