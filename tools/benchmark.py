"""Throughput, peak memory, FLOPs and FLOP/s efficiency of a config's model:
``python tools/benchmark.py CONFIG [--batch-size N] [--amp] [--compile] [--grad-ckpt]
[--img-size N] [--iters N] [--json OUT]``. See ``vitasks/benchmarks/throughput.py`` for what is measured."""
import os
import sys

# Passive OpenMP threads: spinning ones make torch much slower on a shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from vitasks.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
