"""Predict on images or videos: ``python tools/infer.py CONFIG CKPT INPUT... --out-dir D [--topk K]``.

INPUT: files, or folders (their images, or their videos for a video recognizer: a model whose
test pipeline decodes videos reads .mp4/.avi/.mkv/.mov/.webm, an image model reads images).

Writes, per input, a JSON of the prediction and a PNG with it drawn: a classifier's top-k labels
and scores over the image; a video recognizer's top-k labels and scores (averaged over the test
views) over a strip of the frames it saw, as the config's test pipeline sampled, resized and
cropped them; a segmentor's label map blended over the image with a legend of the classes
present (plus the raw label map as ``<name>_labels.png``); a multi-task model's every task, from
one backbone pass, drawn into one PNG (JSON: ``{"file", "tasks": {task: ...}}``).
"""
import sys

from vitasks.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
