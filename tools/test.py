"""Evaluate a checkpoint: ``python tools/test.py CONFIG CKPT [--work-dir D] [--dump PATH]``."""
import sys

from vitasks.cli import end_process, main

if __name__ == "__main__":
    end_process(main(["test", *sys.argv[1:]]))
