"""tools/gpu_check.sh's parts that run anywhere: the peak table, the SDPA probe, the batch
search and the report (the GPU run itself needs a GPU: not in CI)."""

import pytest
import torch

from vitasks.benchmarks.gpu_check import bf16_peak_tflops, format_report, largest_batch, sdpa_kernels


def test_peak_table_matches_device_names():
    assert bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0  # before the generic H100 entry
    assert bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bf16_peak_tflops("NVIDIA L40S") == 362.0 and bf16_peak_tflops("NVIDIA L4") == 121.0
    assert bf16_peak_tflops("Some Future GPU") is None


def test_sdpa_probe_on_the_cpu():
    found = sdpa_kernels("cpu", torch.float32, (1, 2, 8, 16))
    assert found["backends"]["math"] == "runs"
    assert "flash_attention" in found["backends"]


def test_largest_batch_stops_at_the_first_out_of_memory():
    def fits(b):
        if b > 64:
            raise torch.OutOfMemoryError("too big")

    assert largest_batch(fits, start=8, limit=1024) == 64
    with pytest.raises(RuntimeError, match="not even a batch of 8"):
        largest_batch(lambda b: fits(b * 100), start=8)


def test_report_formats_mfu():
    phase = {"images_per_s": 100.0, "tflops": 50.0}
    report = {
        "device": "NVIDIA H100", "torch": "2.x", "bf16_peak_tflops": 989.0,
        "sdpa": {"backends": {"flash_attention": "runs"}, "default_kernels": ["flash_fwd"]},
        "table": {"bf16 eager": {"phases": {"inference": phase, "training": phase}}},
        "mfu": {"batch_size": 256, "train_tflops": 494.5, "mfu": 0.5},
    }
    text = format_report(report)
    assert "MFU 50.0 %" in text and "| bf16 eager | 100.0 | 100.0 | 50.0 |" in text
