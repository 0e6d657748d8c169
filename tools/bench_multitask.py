"""Each task trained alone against all tasks trained jointly, on the multi-task demo.

Two measurements, on a multi-task config (default configs/demo/multitask_synthetic.yaml):

1. Step time: one model, each task's optimizer step on its own batch (what a single-task run
   does per iteration) and the joint step with every task's batch (``accumulate``), measured
   interleaved in ONE process (rounds over the variants, medians), batches loaded beforehand,
   so data loading and a shared, loaded machine affect every variant alike.
2. Metrics: the joint run (the config's schedule, N iterations) against each task trained alone
   (the same model with only that task) for as many iterations as it had batches in the joint
   run (N / T each for round robin), so the single-task runs together take as many iterations
   as the joint one; the learning-rate schedule is
   rescaled with the iterations. Every run is tested at its end; the table puts each task's
   metrics side by side. The wall-clock time of each run (training + its validation) is listed.

    python tools/make_synthetic.py cls data/synthetic/cls   # (and seg, det)
    python tools/bench_multitask.py [CONFIG] [--iters N] [--work-dir D] [--json OUT]
        [--skip-timing | --timing-only] [--threads T] [--rounds R] [--steps K] [--cfg-options KEY=VALUE ...]
"""

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vitasks.engine import launch  # noqa: E402
from vitasks.last_checkpoint import read_last_checkpoint  # noqa: E402

DEFAULT_CONFIG = "configs/demo/multitask_synthetic.yaml"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default=DEFAULT_CONFIG)
    parser.add_argument("--iters", type=int, default=None, help="joint iterations (default: the config's max_iters)")
    parser.add_argument("--work-dir", default="work_dirs/bench_multitask")
    parser.add_argument("--json", default=None, help="write every number here")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds over the variants")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per variant and round")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (1 is often faster for these small models on a shared CPU)")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--timing-only", action="store_true")
    parser.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- configs
def task_names(cfg) -> list:
    return list(cfg.model.tasks)


def single_task_config(cfg, task: str):
    """The same model with only ``task``: its head, data, metric (the shared backbone as is)."""
    cfg = copy.deepcopy(cfg)
    for key in ("tasks", "out_indices", "loss_weights"):
        section = cfg.model.get(key)
        if section:
            cfg.model[key] = {n: v for n, v in section.items() if n == task}
    for key in ("train_dataloader", "val_dataloader", "test_dataloader", "val_evaluator", "test_evaluator"):
        section = cfg.get(key)
        if section and "tasks" in section:
            section["tasks"] = {n: v for n, v in section["tasks"].items() if n == task}
            if "mean_of" in section:
                section["mean_of"] = [m for m in section["mean_of"] if m.startswith(task + "/")]
    checkpoint = cfg.get("default_hooks", {}).get("checkpoint")
    if checkpoint is not None and checkpoint.get("save_best") is not None:
        checkpoint["save_best"] = None
    return cfg


def rescale_schedule(cfg, iters: int):
    """``max_iters`` -> ``iters``; the lr schedule's milestones, validation and checkpoint
    intervals scaled with it (one validation and one checkpoint at the end)."""
    cfg = copy.deepcopy(cfg)
    old = int(cfg.train_cfg.max_iters)
    scale = iters / old
    cfg.train_cfg.max_iters = iters
    cfg.train_cfg.val_interval = iters
    for scheduler in cfg.get("param_scheduler") or []:
        for key in ("begin", "end", "T_max"):
            if key in scheduler and scheduler[key] is not None:
                scheduler[key] = max(1, round(scheduler[key] * scale)) if key != "begin" else round(scheduler[key] * scale)
    checkpoint = cfg.get("default_hooks", {}).get("checkpoint")
    if checkpoint is not None:
        checkpoint["interval"] = iters
    return cfg


def batches_per_task(cfg, names: list, iters: int) -> dict:
    """How many batches each task trains on in ``iters`` joint iterations of ``cfg``'s schedule."""
    from vitasks.engine.multitask_loop import TaskSchedule

    train_cfg = cfg.train_cfg
    kind = train_cfg.get("schedule", "round_robin")
    weights = train_cfg.get("weights")
    if kind == "weighted" and weights is None:
        raise SystemExit("bench_multitask: a weighted schedule without train_cfg.weights (dataset sizes) is not "
                         "supported here; give the weights in the config")
    schedule = TaskSchedule(names, kind, weights, seed=cfg.get("randomness", {}).get("seed") or 0)
    return schedule.batches_before(iters)


# ---------------------------------------------------------------------------- step time
def time_steps(cfg, rounds: int, steps: int) -> dict:
    """Median seconds per optimizer step: each task alone, and every task in one step."""
    from vitasks.engine.launch import build_runner

    cfg = copy.deepcopy(cfg)
    cfg.work_dir = os.path.join(cfg.work_dir, "timing")
    runner = build_runner(cfg)
    model = runner.model
    optim_wrapper = runner.build_optim_wrapper(cfg.optim_wrapper)
    names = task_names(cfg)
    batches = {}
    for name in names:
        loader = runner.build_dataloader(copy.deepcopy(cfg.train_dataloader["tasks"][name]), seed=0)
        iterator = iter(loader)
        batches[name] = [next(iterator) for _ in range(steps)]
    variants = [(name, [name]) for name in names] + [("joint (all tasks, one step)", names)]
    model.train()
    for label, tasks in variants:  # warm-up: allocator, first-call costs
        model.train_step({t: batches[t][0] for t in tasks}, optim_wrapper)
    times = {label: [] for label, _ in variants}
    for _ in range(rounds):
        for label, tasks in variants:
            start = time.perf_counter()
            for k in range(steps):
                model.train_step({t: batches[t][k] for t in tasks}, optim_wrapper)
            times[label].append((time.perf_counter() - start) / steps)
    medians = {label: statistics.median(values) for label, values in times.items()}
    single_sum = sum(medians[n] for n in names)
    joint = medians[variants[-1][0]]
    return dict(per_step_s=medians, sum_of_single_steps_s=single_sum, joint_step_s=joint,
                joint_over_sum=joint / single_sum, round_robin_cycle_s=single_sum,
                threads=torch.get_num_threads(), rounds=rounds, steps=steps)


# ---------------------------------------------------------------------------- training
def train_and_test(cfg, work_dir: str) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg.work_dir = work_dir
    start = time.perf_counter()
    launch.train(cfg, work_dir=work_dir)
    seconds = time.perf_counter() - start
    checkpoint = read_last_checkpoint(work_dir)
    metrics = launch.test(cfg, checkpoint, work_dir=os.path.join(work_dir, "test"))
    return dict(metrics=metrics, train_seconds=seconds, iters=int(cfg.train_cfg.max_iters))


SHOWN = ("accuracy/top1", "mIoU", "aAcc", "coco/bbox_mAP", "coco/bbox_mAP_50", "coco/segm_mAP", "coco/segm_mAP_50",
         "depth/abs_rel", "acc/top1")


def table(joint: dict, alone: dict, names: list) -> str:
    lines = ["| task | metric | alone | joint |", "| --- | --- | --- | --- |"]
    for name in names:
        for metric in SHOWN:
            key = f"{name}/{metric}"
            if key in joint["metrics"] and key in alone[name]["metrics"]:
                a, j = alone[name]["metrics"][key], joint["metrics"][key]
                lines.append(f"| {name} | {metric} | {a:.3f} | {j:.3f} |")
    lines.append("")
    lines.append("| run | iterations | wall-clock s (train + val) |")
    lines.append("| --- | --- | --- |")
    for name in names:
        lines.append(f"| {name} alone | {alone[name]['iters']} | {alone[name]['train_seconds']:.0f} |")
    lines.append(f"| all alone, summed | {sum(alone[n]['iters'] for n in names)} | "
                 f"{sum(alone[n]['train_seconds'] for n in names):.0f} |")
    lines.append(f"| joint | {joint['iters']} | {joint['train_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = launch.prepare_config(args.config, args.cfg_options, args.work_dir)
    names = task_names(cfg)
    report: dict = dict(config=args.config, cfg_options=args.cfg_options, tasks=names)
    if not args.skip_timing:
        report["step_time"] = timing = time_steps(cfg, args.rounds, args.steps)
        print("Seconds per optimizer step (median of %d rounds of %d steps, %d threads):"
              % (args.rounds, args.steps, timing["threads"]))
        for label, seconds in timing["per_step_s"].items():
            print(f"  {label:32s} {seconds:.3f}")
        print(f"  sum of the single-task steps     {timing['sum_of_single_steps_s']:.3f}")
        print(f"  joint / sum                      {timing['joint_over_sum']:.2f}")
    if not args.timing_only:
        iters = args.iters or int(cfg.train_cfg.max_iters)
        joint_cfg = rescale_schedule(cfg, iters)
        joint_cfg.train_cfg.accumulate = False
        report["joint"] = joint = train_and_test(joint_cfg, os.path.join(args.work_dir, "joint"))
        # Each task alone for as many batches as it had in the joint run (the config's schedule:
        # round robin gives iters / T each; weighted as it drew them for this seed).
        batches = batches_per_task(joint_cfg, names, iters)
        report["batches_per_task"] = batches
        alone = {}
        for name in names:
            single = rescale_schedule(single_task_config(cfg, name), batches[name])
            alone[name] = train_and_test(single, os.path.join(args.work_dir, f"alone_{name}"))
        report["alone"] = alone
        print(table(joint, alone, names))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
