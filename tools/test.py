"""Evaluate a checkpoint: ``python tools/test.py CONFIG CKPT [--work-dir D] [--dump PATH]``."""
import sys

from vitasks.cli import main

if __name__ == "__main__":
    sys.exit(main(["test", *sys.argv[1:]]))
