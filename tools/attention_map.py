"""Attention rollout and per-layer attention maps of a ViT model over an image:
``python tools/attention_map.py CONFIG CKPT IMAGE --out F.png [--head-fusion mean|max|min]``."""
import sys

from vitasks.visualization.attention_map import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
