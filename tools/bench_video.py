"""Clips/s, peak memory and GFLOPs of the video ViT-B for each attention layout at 8 and 32 frames.

``python tools/bench_video.py [--frames 8 32] [--attention joint factorised_encoder divided]
[--tubelet 2] [--img-size 224] [--warmup 1] [--iters 1] [--device cpu] [--json OUT]``

Each case runs in its own process (so one case's peak memory does not hide another's): a
``VideoVisionTransformer`` ViT-B (width 768, 12 blocks, 12 heads; the factorised encoder adds its
4 temporal blocks, as ViViT-B), tubelets of ``--tubelet`` x 16 x 16 for every layout so that all
see the same tokens, fp32, batch 1, a random clip, eval mode under ``torch.no_grad()``. GFLOPs are
counted in the first (warm-up) pass with vitasks' FLOP counter (multiply-adds x 2, the fused CPU
attention kernel included). Peak memory is the process's peak resident memory during the timed
passes minus its resident memory before the first pass (weights and input already allocated), as
``tools/benchmark.py`` counts it on a CPU; on a GPU ``torch.cuda.max_memory_allocated``. The
summary gives each layout's time and memory relative to joint attention at the same length.

``python tools/bench_video.py --data CONFIG [--cfg-options data_root=DIR ...] [--seconds 20]``
instead measures the data side: the config's training pipeline (sample + decode + transform +
pack) on its training list, in this one process, as one data-loader worker runs it (one torch
thread), with the samples' seeds as training draws them: clips/s, the process's CPU time per clip
(the steadier figure on a shared machine) and the load average.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ATTENTION = ("joint", "factorised_encoder", "divided")
VIT_B = dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, patch_size=16, temporal_depth=4)


def run_case(attention: str, frames: int, tubelet: int, img_size: int, warmup: int, iters: int, device: str) -> dict:
    import torch

    from vitasks.benchmarks.throughput import PeakMemory, current_rss, flop_counter
    from vitasks.models.backbones import VideoVisionTransformer

    dev = torch.device(device)
    torch.manual_seed(0)
    model = VideoVisionTransformer(num_frames=frames, img_size=img_size, tubelet_size=tubelet,
                                   attention_type=attention, **VIT_B).to(dev).eval()
    x = torch.randn(1, 3, frames, img_size, img_size, device=dev)

    def step():
        with torch.no_grad():
            model(x)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    baseline = current_rss()
    with flop_counter() as counter:  # the first warm-up pass counts the FLOPs
        step()
    flops = counter.get_total_flops()
    more_warmup = max(warmup - 1, 0)
    times = []
    with PeakMemory(dev, baseline) as peak:
        for i in range(more_warmup + iters):
            start = time.perf_counter()
            step()
            if i >= more_warmup:
                times.append(time.perf_counter() - start)
    tokens = (frames // tubelet) * (img_size // 16) ** 2
    return dict(attention=attention, frames=frames, tokens=tokens, seconds=min(times), clips_per_s=1.0 / min(times),
                gflops=flops / 1e9, peak_mib=peak.peak / 2**20, memory=peak.method)


def data_speed(config: str, cfg_options, seconds: float) -> dict:
    """Clips/s and CPU ms per clip of ``config``'s training pipeline over its training list."""
    import torch

    from vitasks.config import load_config
    from vitasks.data.seeding import SeededIndex
    from vitasks.visualization.browse import build_train_dataset

    torch.set_num_threads(1)
    dataset = build_train_dataset(load_config(config, cfg_options))
    for i in range(len(dataset)):  # warm up: each video is indexed once per worker
        dataset[SeededIndex(i, i)]
    count, cpu0, wall0 = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - wall0 < seconds:
        item = dataset[SeededIndex(count % len(dataset), len(dataset) + count)]
        count += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return dict(config=config, videos=len(dataset), clips=count, clips_per_s=count / wall,
                cpu_ms_per_clip=1000 * cpu / count, shape=list(item["inputs"].shape), loadavg=os.getloadavg()[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--attention", nargs="+", choices=ATTENTION, default=list(ATTENTION))
    parser.add_argument("--tubelet", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--data", metavar="CONFIG", help="measure this config's training data pipeline instead")
    parser.add_argument("--cfg-options", nargs="+", default=None, metavar="KEY=VALUE",
                        help="with --data: override config keys, e.g. data_root=DIR")
    parser.add_argument("--seconds", type=float, default=20.0, help="with --data: how long to measure")
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)  # internal: ATTENTION FRAMES, print JSON
    args = parser.parse_args(argv)
    if args.data:
        result = data_speed(args.data, args.cfg_options, args.seconds)
        print(f"{args.data}: {result['videos']} videos, clips {tuple(result['shape'])}: {result['clips_per_s']:.1f} "
              f"clips/s, {result['cpu_ms_per_clip']:.1f} ms CPU per clip (one worker, one thread); load average "
              f"{result['loadavg']:.1f} on {os.cpu_count()} CPUs")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:
        attention, frames = args.case[0], int(args.case[1])
        print(json.dumps(run_case(attention, frames, args.tubelet, args.img_size, args.warmup, args.iters, args.device)))
        return 0

    from vitasks.benchmarks.machine import cpu_name

    print(
        f"VideoVisionTransformer ViT-B, {args.img_size}px, tubelets {args.tubelet}x16x16, batch 1, fp32 inference, "
        f"{args.device}; {cpu_name()}, {torch.get_num_threads()} threads; load average before: {os.getloadavg()}"
    )
    results = []
    for frames in args.frames:
        for attention in args.attention:
            cmd = [sys.executable, __file__, "--case", attention, str(frames), "--tubelet", str(args.tubelet),
                   "--img-size", str(args.img_size), "--warmup", str(args.warmup), "--iters", str(args.iters),
                   "--device", args.device]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(f"{attention} {frames}: failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result["loadavg_after"] = os.getloadavg()[0]
            results.append(result)
            print(f"{attention:19s} {frames:3d} frames {result['tokens']:5d} tokens  {result['clips_per_s']:7.3f} clips/s  "
                  f"{result['seconds']:7.2f} s  {result['gflops']:7.1f} GFLOPs  {result['peak_mib']:7.0f} MiB  "
                  f"(load {result['loadavg_after']:.1f})")
    print("relative to joint attention at the same length (time, memory, GFLOPs):")
    for r in results:
        joint = next((j for j in results if j["attention"] == "joint" and j["frames"] == r["frames"]), None)
        if joint is None or r is joint:
            continue
        print(f"  {r['attention']:19s} {r['frames']:3d} frames: {r['seconds'] / joint['seconds']:.2f}x time, "
              f"{r['peak_mib'] / max(joint['peak_mib'], 1e-9):.2f}x memory, {r['gflops'] / joint['gflops']:.2f}x GFLOPs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
