"""Accuracy (mIoU) against images/s for each token reduction on the demo data, with the plain
demo model as the reference; ToMe applied to the plain checkpoint without retraining, and the
agreement of every variant's predictions with the plain model's (docs/tokens.md):

    python tools/make_synthetic.py cls data/synthetic/cls
    python tools/token_tradeoff.py cls [--work-dir work_dirs/token_tradeoff_cls] [--tome-r 4 8 16]
    python tools/token_tradeoff.py seg ...

Trains the plain, TokenLearner and visual-token demos where the work dir has no checkpoint of
them yet (--retrain: always), evaluates each with the test loop, times every variant in this
one process (interleaved rounds, medians) and prints a Markdown table (also tradeoff.json and
tradeoff.md in the work dir). Set OMP_NUM_THREADS to fix the thread count; --max-load L waits
(at most 30 min) for the 1-minute load average to fall to L before timing.
"""

import argparse
import os
import sys

from vitasks.benchmarks.token_tradeoff import format_tradeoff, run_tradeoff


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=["cls", "seg"])
    p.add_argument("--work-dir", default=None, help="default: work_dirs/token_tradeoff_<kind>")
    p.add_argument("--tome-r", type=int, nargs="+", default=None, help="ToMe's r values (default cls: 4 8 16, seg: 8 16 32)")
    p.add_argument("--retrain", action="store_true", help="train even where a checkpoint exists")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--batch-size", type=int, default=None, help="timing batch (default: the test loader's)")
    p.add_argument("--max-load", type=float, default=None, help="wait for this 1-minute load average before timing")
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE", help="for every variant")
    p.add_argument("--train-options", nargs="+", default=[], metavar="KEY=VALUE", help="for training only")
    args = p.parse_args(argv)
    work_dir = args.work_dir or f"work_dirs/token_tradeoff_{args.kind}"
    result = run_tradeoff(args.kind, work_dir, tome_r=args.tome_r, train_options=args.train_options,
                          options=args.cfg_options, retrain=args.retrain, rounds=args.rounds,
                          batch_size=args.batch_size, max_load=args.max_load)
    table = format_tradeoff(result)
    with open(os.path.join(work_dir, "tradeoff.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
