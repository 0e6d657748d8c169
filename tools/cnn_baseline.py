"""The reference the demos must reach: ``python tools/cnn_baseline.py {cls,seg,video} DATA_DIR``.

A plain BatchNorm CNN (cls, ImageNet layout), a plain FCN (seg, ADE20K layout) or a plain 3D CNN
(video, Kinetics list layout: train.txt / val.txt) trained from
scratch in a plain PyTorch loop with the demo's budget (vitasks/benchmarks/cnn_baseline.py), then
scored with the demo's metric; ``--json OUT`` writes the scores.
"""
import argparse
import dataclasses
import json
import sys

from vitasks.errors import VitasksError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cnn_baseline", description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=("cls", "seg", "video"),
                        help="cls: ImageNet folders; seg: ADE20K layout; video: Kinetics lists train.txt / val.txt")
    parser.add_argument("data_dir", help="the dataset's root (a demo's data_root)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="seg: K, the ADE labels 1..K (default: the lines of classes.txt, else 11); "
                             "video: K, labels 0..K-1 (default: the lines of classes.txt, else the largest label + 1)")
    parser.add_argument("--epochs", type=int, default=None, help="passes over the training set (default: the demo's)")
    parser.add_argument("--width", type=int, default=None, help="channels of the first layer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the scores to this JSON file")
    args = parser.parse_args(argv)

    from vitasks.benchmarks import cnn_baseline as cb

    cfg = {"cls": cb.CLS_DEFAULTS, "seg": cb.SEG_DEFAULTS, "video": cb.VIDEO_DEFAULTS}[args.task]
    changes = {k: v for k, v in (("epochs", args.epochs), ("width", args.width)) if v is not None}
    cfg = dataclasses.replace(cfg, seed=args.seed, **changes)
    try:
        if args.task == "cls":
            scores = cb.train_cls_baseline(args.data_dir, cfg)
        elif args.task == "video":
            scores = cb.train_video_baseline(args.data_dir, args.num_classes, cfg)
        else:
            num_classes = args.num_classes or cb.count_classes(args.data_dir, default=11)
            scores = cb.train_seg_baseline(args.data_dir, num_classes, cfg)
    except VitasksError as err:
        print(f"cnn_baseline: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(scores))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(scores, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
