"""Time and peak memory of the ViTDet ViT-B backbone: window against all-global attention, and
training with and without gradient checkpointing.

``python tools/bench_vitdet.py [--img-size 1024] [--warmup 1] [--iters 1] [--cases ...] [--json OUT]``

Each case runs in its own process (so one case's peak memory does not hide another's): the
backbone alone (detectron2's ViT-B: window 14, global blocks 2, 5, 8, 11, relative position bias,
drop path 0.1), fp32, batch 1, a random image. ``infer`` is a forward pass under
``torch.no_grad()`` in eval mode; ``train`` a forward and backward pass of a scalar loss in train
mode (no optimizer step: activations and gradients, not optimizer state). Peak memory is the
process's peak resident memory during the timed phase minus its resident memory before the first
pass (weights and input already allocated), as ``tools/benchmark.py`` counts it on a CPU; on a GPU
it is ``torch.cuda.max_memory_allocated``.
"""

import argparse
import json
import os
import subprocess
import sys
import time

CASES = {
    # name: (attention, mode, gradient checkpointing)
    "window-infer": ("window", "infer", False),
    "global-infer": ("global", "infer", False),
    "window-train": ("window", "train", False),
    "window-train-ckpt": ("window", "train", True),
    "global-train-ckpt": ("global", "train", True),
    "global-train": ("global", "train", False),
}

VIT_B = dict(
    embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, class_token=False, pool="none", out_indices=[-1],
    final_norm=False, use_rel_pos=True, drop_path_rate=0.1, global_indices=[2, 5, 8, 11],
)


def run_case(name: str, img_size: int, warmup: int, iters: int, device: str) -> dict:
    import torch

    from vitasks.benchmarks.throughput import PeakMemory, current_rss
    from vitasks.models.backbones import VisionTransformer

    attention, mode, ckpt = CASES[name]
    dev = torch.device(device)
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=img_size, window_size=14 if attention == "window" else 0, with_cp=ckpt, **VIT_B
    ).to(dev)
    model.train(mode == "train")
    x = torch.randn(1, 3, img_size, img_size, device=dev)

    def step():
        if mode == "infer":
            with torch.no_grad():
                model(x)
        else:
            model.zero_grad(set_to_none=True)
            (feat,) = model(x)
            feat.square().mean().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    baseline = current_rss()
    times = []
    with PeakMemory(dev, baseline) as peak:
        for i in range(warmup + iters):
            start = time.perf_counter()
            step()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return dict(case=name, seconds=min(times), peak_mib=peak.peak / 2**20, memory=peak.method)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--img-size", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=1)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES)[:5])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, help="torch threads (on a loaded machine 1 thread can beat 2 that wait on each other)"
    )
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(run_case(args.case, args.img_size, args.warmup, args.iters, args.device)))
        return 0

    from vitasks.benchmarks.machine import cpu_name

    print(
        f"ViT-B backbone, {args.img_size}x{args.img_size}, batch 1, fp32, {args.device}; "
        f"{cpu_name()}, {torch.get_num_threads()} threads; load average before: {os.getloadavg()}"
    )
    results = []
    for name in args.cases:
        cmd = [sys.executable, __file__, "--case", name, "--img-size", str(args.img_size), "--warmup",
               str(args.warmup), "--iters", str(args.iters), "--device", args.device]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(f"{name}: failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["loadavg_after"] = os.getloadavg()[0]
        results.append(result)
        print(f"{name:18s} {result['seconds']:8.2f} s  {result['peak_mib']:9.0f} MiB  (load {result['loadavg_after']:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
