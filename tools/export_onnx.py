"""Export a task model as ONNX and check it with onnxruntime:
``python tools/export_onnx.py CONFIG CKPT OUT.onnx [--batch-size N] [--opset K] [--img-size H [W]]
[--time ITERS] [--cfg-options ...]``. See ``vitasks/deploy/onnx.py``."""
import os
import sys

# Passive OpenMP threads: spinning ones make torch much slower on a shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from vitasks.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["export-onnx", *sys.argv[1:]]))
