"""Predict on images: ``python tools/infer.py CONFIG CKPT INPUT... --out-dir D [--topk K]``.

Writes one JSON (top-k labels, class names, scores) and one PNG (the prediction drawn over the
image) per input into the output folder.
"""
import sys

from vitasks.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
