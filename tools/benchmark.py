"""Throughput, peak memory, FLOPs and FLOP/s efficiency of a config's model:
``python tools/benchmark.py CONFIG [--batch-size N] [--amp] [--compile] [--grad-ckpt]
[--img-size N] [--iters N] [--json OUT]``. See ``vitasks/benchmark.py`` for what is measured."""
import sys

from vitasks.benchmark import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
