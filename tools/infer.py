"""Predict on images: ``python tools/infer.py CONFIG CKPT INPUT... --out-dir D [--topk K]``.

INPUT: image files, or folders (their images). Video input is not supported yet.

Writes, per input, a JSON of the prediction and a PNG with it drawn over the image: a
classifier's top-k labels and scores; a segmentor's label map blended over the image with a
legend of the classes present (plus the raw label map as ``<name>_labels.png``); a multi-task
model's every task, from one backbone pass, drawn into one PNG (JSON: ``{"file", "tasks":
{task: ...}}``).
"""
import sys

from vitasks.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
