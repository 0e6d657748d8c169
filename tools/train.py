"""Train a model from a YAML config: ``python tools/train.py CONFIG [--work-dir D] [--resume [CKPT]]``."""
import sys

from vitasks.cli import end_process, main

if __name__ == "__main__":
    end_process(main(["train", *sys.argv[1:]]))
