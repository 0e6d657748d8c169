"""One recipe over several seeds: ``python tools/seeds.py CONFIG --data DIR --num-classes K --seeds 0 1 2``.

Trains CONFIG on DIR once per seed (``tools/train.py --cfg-options data_root=DIR num_classes=K
randomness.seed=S``, each in its own process, ``--jobs`` at a time), scores each run's last
checkpoint with ``tools/test.py`` and prints a Markdown table: one row per seed, then the mean, min
and max. ``--baseline cls|seg|video`` trains ``tools/cnn_baseline.py`` with the same seeds beside it.
Logs and results go to ``--work-dir`` (``seed<S>/``); ``--json OUT`` writes everything. A failed
run is reported with its log; the tool then exits with 1, after the other seeds.
"""
import argparse
import json
import os
import os.path as osp
import sys

from vitasks.benchmarks.seeds import BASELINE_TASKS, SeedsOptions, run_seeds

TOOLS = osp.dirname(osp.abspath(__file__))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="seeds", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the recipe's YAML config")
    parser.add_argument("--data", required=True, metavar="DIR", help="the dataset's root (data_root)")
    parser.add_argument("--num-classes", required=True, type=int, metavar="K", help="num_classes")
    parser.add_argument("--seeds", required=True, type=int, nargs="+", metavar="S",
                        help="randomness.seed of each run (and the baseline's --seed)")
    parser.add_argument("--baseline", choices=BASELINE_TASKS, default=None,
                        help="also train tools/cnn_baseline.py {cls,seg,video} DIR with each seed")
    parser.add_argument("--baseline-epochs", type=int, default=None, metavar="N",
                        help="the baseline's --epochs (default: its own, the demo's budget)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="processes at a time (each gets OMP_NUM_THREADS = cores / N unless set)")
    parser.add_argument("--work-dir", default=None, metavar="D",
                        help="default work_dirs/seeds/<config name>; the runs go to D/seed<S>")
    parser.add_argument("--metrics", nargs="+", default=None, metavar="NAME",
                        help="columns of the table (default: the task's main metric(s); `all`: every number)")
    parser.add_argument("--json", default=None, metavar="OUT", help="write every run's metrics and the summary")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="more overrides for every run (and its test)")
    args = parser.parse_args(argv)

    problems = []
    if not osp.isfile(args.config):
        problems.append(f"config {args.config!r} does not exist")
    if not osp.isdir(args.data):
        problems.append(f"--data {args.data!r} is not a directory")
    if args.num_classes < 1:
        problems.append(f"--num-classes must be at least 1, got {args.num_classes}")
    if len(set(args.seeds)) != len(args.seeds):
        problems.append(f"--seeds has repeats: {args.seeds}")
    if args.jobs < 1:
        problems.append(f"--jobs must be at least 1, got {args.jobs}")
    if problems:
        for problem in problems:
            print(f"seeds: error: {problem}", file=sys.stderr)
        return 2

    stem = osp.splitext(osp.basename(args.config))[0]
    opts = SeedsOptions(
        config=args.config, data_root=args.data, num_classes=args.num_classes, seeds=args.seeds,
        work_dir=osp.abspath(args.work_dir or osp.join("work_dirs", "seeds", stem)), tools_dir=TOOLS,
        baseline=args.baseline, baseline_epochs=args.baseline_epochs, jobs=args.jobs,
        cfg_options=args.cfg_options, metrics=args.metrics,
    )
    result = run_seeds(opts, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(result["table"])
    if args.json:
        os.makedirs(osp.dirname(osp.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    failed = [run for run in result["runs"] if not run["ok"]]
    for run in failed:
        for error in run["errors"]:
            print(f"seeds: seed {run['seed']}: {error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
