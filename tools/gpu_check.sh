#!/usr/bin/env bash
# Check a GPU machine in one command: which SDPA kernels run (flash / memory-efficient / cuDNN),
# which kernels NMS and RoIAlign run (torchvision's on a GPU install, checked equal to plain torch),
# the benchmark table of ViT-B/16 (fp32, bf16, bf16 + torch.compile) and the MFU of a ViT-B/16
# bf16 training step at the largest batch that fits. Prints markdown for the README.
#
#   bash tools/gpu_check.sh [--batch-size N] [--peak-tflops P] [--no-compile] [--json OUT]
#
# Run from the repository root after `bash tools/setup_env.sh` with a CUDA build of torch
# (the CPU pin in setup_env.sh is for CPU machines: on a GPU machine install torch for its CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m vitasks.cli gpu-check "$@"
