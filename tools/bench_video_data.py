"""Video data loading speed: decode + sample + transform clips/s in one process (one data-loader
worker), for training pipelines of 8- and 32-frame clips, on generated videos.

    python tools/bench_video_data.py [--size 256] [--frames 300] [--keyframe-interval 64] [--seconds 20]

Writes the videos to a temporary folder (Kinetics-like by default: 256 px, 300 frames, a
keyframe every 64 frames), then runs each pipeline over them for ``--seconds`` and prints clips/s,
the process's CPU time per clip and the machine's load average.
"""

import argparse
import os
import tempfile
import time

import torch


def pipeline(clip_len: int, frame_interval: int, crop: int) -> list:
    return [
        dict(type="SampleFrames", clip_len=clip_len, frame_interval=frame_interval),
        dict(type="DecodeFrames"),
        dict(type="VideoAlbu", transforms=[
            dict(type="RandomResizedCrop", size=[crop, crop], scale=[0.25, 1.0]),
            dict(type="HorizontalFlip"),
        ]),
        dict(type="PackVideoInputs"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--keyframe-interval", type=int, default=64)
    parser.add_argument("--videos-per-class", type=int, default=2)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from vitasks.data.synthetic.video import make_video_dataset
    from vitasks.data.seeding import SeededIndex
    from vitasks.data.video import VideoListDataset

    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        make_video_dataset(root, train_per_class=args.videos_per_class, val_per_class=0, size=args.size,
                           num_frames=args.frames, keyframe_interval=args.keyframe_interval)
        print(f"wrote {4 * args.videos_per_class} videos of {args.frames} frames at {args.size} px "
              f"(keyframe every {args.keyframe_interval}) in {time.perf_counter() - start:.0f} s")
        for clip_len, interval in ((8, 8), (32, 2)):
            ds = VideoListDataset(root, "train.txt", pipeline=pipeline(clip_len, interval, args.crop))
            ds[SeededIndex(0, 0)]  # warm up: the index of each video is built once per worker
            for i in range(len(ds)):
                ds[SeededIndex(i, i)]
            count, cpu0, wall0 = 0, time.process_time(), time.perf_counter()
            while time.perf_counter() - wall0 < args.seconds:
                item = ds[SeededIndex(count % len(ds), count)]
                count += 1
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            print(f"clip {clip_len}x{interval}: {count / wall:.1f} clips/s, {1000 * cpu / count:.1f} ms CPU "
                  f"per clip, output {tuple(item['inputs'].shape)}; load average {os.getloadavg()[0]:.1f} "
                  f"on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
