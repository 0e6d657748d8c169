"""Train a model from a YAML config: ``python tools/train.py CONFIG [--work-dir D] [--resume [CKPT]]``."""
import sys

from vitasks.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
