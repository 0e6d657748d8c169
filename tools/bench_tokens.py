"""Token reduction side by side: images/s and GFLOPs of several variants of one model, measured
interleaved in ONE process (round-robin over the variants, several rounds, medians), so a
shared, loaded machine slows every variant alike.

Default: ViT-B/16 at 224, fp32 inference, batch 8 (configs/cls_imagenet.yaml): plain, ToMe
r = 8 / 13 / 16, TokenLearner 8 tokens at block 6, visual tokens (16 at block 6):
    python tools/bench_tokens.py [--rounds 5] [--iters 2] [--json OUT]
Any configs instead (e.g. the demo variants), each NAME=CONFIG[:KEY=VALUE,...]:
    python tools/bench_tokens.py --variants plain=configs/demo/cls_synthetic.yaml \\
        tome=configs/demo/cls_synthetic_tome.yaml --batch-size 64
All variants of a run share the first one's weights where the names match (ToMe adds none), so
the merging decisions are those of one network. The machine is shared: set OMP_NUM_THREADS (the
measurements in docs/tokens.md use 2), and --max-load L waits (at most 30 min) until the 1-minute
load average is at most L before timing; the load average is printed with the table. images/s and "speedup" come from each variant's median
batch; "fastest" is the speedup between the fastest batches (other processes only add time, so
on a busy machine it is the closer estimate of a quiet machine's ratio).
"""

import argparse
import json
import os
import statistics
import sys

import torch

from vitasks.apis import build_model, load_cfg
from vitasks.benchmarks.throughput import count_model_flops, init_on_meta
from vitasks.models.layers.token_reduction import count_tokens
from vitasks.benchmarks.token_tradeoff import interleaved_times, wait_for_quiet

VIT_B = "configs/cls_imagenet.yaml"
DEFAULT_VARIANTS = [
    ("plain", VIT_B, []),
    ("ToMe r=8", VIT_B, ["model.backbone.token_reduction={type: ToMe, r: 8}"]),
    ("ToMe r=13", VIT_B, ["model.backbone.token_reduction={type: ToMe, r: 13}"]),
    ("ToMe r=16", VIT_B, ["model.backbone.token_reduction={type: ToMe, r: 16}"]),
    ("TokenLearner 8 @6", VIT_B, ["model.backbone.token_reduction={type: TokenLearner, num_tokens: 8, at_block: 6}"]),
    ("VisualTokens 16 @6", VIT_B, ["model.backbone.token_reduction={type: VisualTokens, num_tokens: 16, at_block: 6}"]),
]


def parse_variant(text: str):
    name, _, rest = text.partition("=")
    config, _, options = rest.partition(":")
    if not name or not config:
        raise SystemExit(f"--variants: expected NAME=CONFIG[:KEY=VALUE,...], got {text!r}")
    return name, config, [o for o in options.split(",") if o]


def build(config: str, options, img_size: int):
    cfg = load_cfg(config, list(options) or None)
    model = build_model(cfg).eval()
    with init_on_meta():
        meta = build_model(cfg)
    return cfg, model, meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME=CONFIG[:K=V,...]")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--img-size", type=int, default=None, help="default: the config's img_size")
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds over the variants")
    p.add_argument("--iters", type=int, default=2, help="timed batches per variant per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches per variant before the rounds")
    p.add_argument("--max-load", type=float, default=None, help="wait for this 1-minute load average first")
    p.add_argument("--json", default=None, metavar="OUT")
    args = p.parse_args(argv)
    variants = [parse_variant(v) for v in args.variants] if args.variants else DEFAULT_VARIANTS

    torch.manual_seed(0)
    built = []
    reference = None
    for name, config, options in variants:
        cfg, model, meta = build(config, options, args.img_size)
        if reference is None:
            reference = model.state_dict()
        else:  # the same network under every reduction
            own = model.state_dict()
            model.load_state_dict({k: v for k, v in reference.items() if k in own and own[k].shape == v.shape}, strict=False)
        size = args.img_size or int(cfg.get("img_size", 224))
        x = torch.randn(args.batch_size, 3, size, size)
        meta_x = torch.empty(args.batch_size, 3, size, size, device="meta")
        gflops = count_model_flops(meta, meta_x) / args.batch_size / 1e9
        tokens = count_tokens(meta, meta_x[:1])
        built.append(dict(name=name, config=config, options=options, model=model, x=x, gflops=gflops,
                          tokens=tokens))

    def step(v):
        def run():
            with torch.no_grad():
                v["model"](v["x"], mode="tensor")

        return run

    load_before, waited = wait_for_quiet(args.max_load)
    times = interleaved_times({v["name"]: step(v) for v in built}, args.rounds, args.iters, args.warmup)
    load_after = os.getloadavg()[0]
    for v in built:
        v["times"] = times[v["name"]]

    base = None
    rows = []
    for v in built:
        ips = args.batch_size / statistics.median(v["times"])
        base = base or ips
        rows.append(dict(name=v["name"], config=v["config"], options=v["options"], images_per_s=ips,
                         speedup=ips / base, speedup_fastest=min(built[0]["times"]) / min(v["times"]),
                         gflops=v["gflops"], tokens_per_block=v["tokens"], times_s=v["times"]))
    print(f"batch {args.batch_size}, fp32, threads {torch.get_num_threads()}, {args.rounds} rounds x {args.iters} "
          f"iters interleaved; load average before {load_before:.1f}, after {load_after:.1f}"
          + (f" (waited {waited:.0f} s for it)" if waited >= 1 else ""))
    print(f"{'variant':<22}{'images/s':>10}{'speedup':>9}{'fastest':>9}{'GFLOPs':>9}  tokens per block")
    for r in rows:
        tokens = r["tokens_per_block"]
        shown = f"{tokens[0]} -> {tokens[-1]} (mean {sum(tokens) / len(tokens):.0f})" if tokens else "-"
        print(f"{r['name']:<22}{r['images_per_s']:>10.2f}{r['speedup']:>8.2f}x{r['speedup_fastest']:>8.2f}x"
              f"{r['gflops']:>9.2f}  {shown}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(batch_size=args.batch_size, rounds=args.rounds, iters=args.iters,
                           threads=torch.get_num_threads(), load_average=[load_before, load_after], rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
