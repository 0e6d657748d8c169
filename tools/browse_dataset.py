"""Draw what the training pipeline feeds the model (augmentations included, seeded by the config):
``python tools/browse_dataset.py CONFIG --out-dir D [--num N] [--cfg-options KEY=VALUE ...]``."""
import sys

from vitasks.cli import main

if __name__ == "__main__":
    sys.exit(main(["browse-dataset", *sys.argv[1:]]))
