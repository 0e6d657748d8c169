"""Attention rollout and per-layer class-token maps over an image:
``python tools/attention_map.py CONFIG CKPT IMAGE --out F.png [--head-fusion mean|max|min] [--no-residual]``."""
import sys

from vitasks.cli import main

if __name__ == "__main__":
    sys.exit(main(["attention-map", *sys.argv[1:]]))
