"""The ``vitasks`` command: ``train``, ``test``, ``infer``, ``convert`` and ``list``.

Each sub-command's parser is built by its own ``add_*_parser`` function; the scripts in
``tools/`` call ``vitasks.cli.main(["train", *sys.argv[1:]])``. Heavy modules (torch, the
Runner, the converters) are imported inside the handlers, so ``--help`` and argument errors
answer at once.

A :class:`vitasks.errors.VitasksError` (a bad config, data or checkpoint) is printed as
``vitasks: error: <message>`` with exit status 2 and no traceback; any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, List, Optional, Sequence

from vitasks.errors import VitasksError

__all__ = [
    "main",
    "build_parser",
    "add_train_parser",
    "add_test_parser",
    "add_infer_parser",
    "add_convert_parser",
    "add_list_parser",
]

CONVERT_FORMATS = ("timm", "hf", "npz", "mae", "deit")
LAUNCHERS = ("none", "pytorch", "slurm")


def _add_cfg_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys: dotted keys with list indices "
        "(model.head.num_classes=10, train_dataloader.dataset.pipeline.1.p=0.3), "
        "values parsed as YAML ([1, 2], true, 1e-4, text)",
    )


def _check_cfg_options(options: Sequence[str]) -> List[str]:
    """Fail on a malformed ``KEY=VALUE`` before anything heavy is imported."""
    from vitasks.config import parse_cfg_options

    parse_cfg_options(options)
    return list(options)


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train a model from a config",
        description="Train with mmengine's Runner. Checkpoints and `last_checkpoint` go to the "
        "work dir (default work_dirs/<config name>).",
    )
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("--work-dir", help="where logs and checkpoints go")
    parser.add_argument(
        "--resume", nargs="?", const="auto", default=None, metavar="CKPT",
        help="resume training: from CKPT, or without a value from the work dir's last checkpoint",
    )
    parser.add_argument("--amp", action="store_true", help="automatic mixed precision")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="none",
                        help="job launcher for distributed training")
    # torch.distributed.launch / older torchrun pass the local rank; the launcher reads it
    # from the environment instead.
    parser.add_argument("--local-rank", "--local_rank", type=int, default=0,
                        help=argparse.SUPPRESS)
    _add_cfg_options(parser)
    parser.set_defaults(handler=_run_train)
    return parser


def _run_train(args: argparse.Namespace) -> int:
    cfg_options = _check_cfg_options(args.cfg_options)
    launch = importlib.import_module("vitasks.engine.launch")
    launch.train(
        args.config,
        work_dir=args.work_dir,
        resume=args.resume,
        amp=args.amp,
        launcher=args.launcher,
        cfg_options=cfg_options,
    )
    return 0


# --------------------------------------------------------------------------------------------
# test
# --------------------------------------------------------------------------------------------


def add_test_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "test", help="evaluate a checkpoint",
        description="Evaluate a checkpoint on the config's test set; writes metrics.json in the "
        "work dir.",
    )
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("checkpoint", help="checkpoint file")
    parser.add_argument("--work-dir", help="where logs and metrics.json go")
    parser.add_argument("--dump", metavar="PATH",
                        help="also write the predictions (the config's `test_dump`) to PATH")
    parser.add_argument("--amp", action="store_true",
                        help="evaluate under bf16 autocast (CPU and GPU)")
    _add_cfg_options(parser)
    parser.set_defaults(handler=_run_test)
    return parser


def format_metrics(metrics: dict) -> str:
    """A two-column table of metric names and values."""
    if not metrics:
        return "(no metrics)"
    width = max(len("metric"), *(len(str(k)) for k in metrics))
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for name, value in metrics.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{name!s:<{width}}  {shown}")
    return "\n".join(lines)


def _run_test(args: argparse.Namespace) -> int:
    cfg_options = _check_cfg_options(args.cfg_options)
    launch = importlib.import_module("vitasks.engine.launch")
    metrics = launch.test(
        args.config,
        args.checkpoint,
        work_dir=args.work_dir,
        dump=args.dump,
        amp=args.amp,
        cfg_options=cfg_options,
    )
    if isinstance(metrics, dict):
        print(format_metrics(metrics))
    return 0


# --------------------------------------------------------------------------------------------
# infer
# --------------------------------------------------------------------------------------------


def add_infer_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "infer", help="predict on images or videos (every task of a multi-task model)",
        description="Write predictions as JSON and drawn as PNG, one per input.",
    )
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("checkpoint", help="checkpoint file")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image or video files, or folders of them")
    parser.add_argument("--out-dir", required=True, help="output folder")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--topk", type=int, default=5, help="classes kept per prediction")
    _add_cfg_options(parser)
    parser.set_defaults(handler=_run_infer)
    return parser


def _run_infer(args: argparse.Namespace) -> int:
    cfg_options = _check_cfg_options(args.cfg_options)
    apis = importlib.import_module("vitasks.apis")
    results = apis.run_inference(
        args.config,
        args.checkpoint,
        args.inputs,
        args.out_dir,
        device=args.device,
        topk=args.topk,
        cfg_options=cfg_options,
    )
    count = len(results) if isinstance(results, (list, tuple)) else len(args.inputs)
    print(f"wrote predictions for {count} input(s) to {args.out_dir}")
    return 0


# --------------------------------------------------------------------------------------------
# attention-map
# --------------------------------------------------------------------------------------------


def add_attention_map_parser(subparsers) -> argparse.ArgumentParser:
    from vitasks.visualization.rollout import HEAD_FUSIONS

    parser = subparsers.add_parser(
        "attention-map", help="attention rollout and per-layer maps over an image",
        description="Attention rollout (Abnar & Zuidema 2020) and per-layer class-token attention "
        "of a ViT model, drawn over the image.",
    )
    parser.add_argument("config", help="config file (YAML)")
    parser.add_argument("checkpoint", help="checkpoint file")
    parser.add_argument("image", help="image file")
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--head-fusion", choices=HEAD_FUSIONS, default="mean", help="how heads are fused per layer")
    parser.add_argument("--no-residual", action="store_true",
                        help="do not model the skip connection as 0.5 * (A + I)")
    parser.add_argument("--device", default="cpu")
    _add_cfg_options(parser)
    parser.set_defaults(handler=_run_attention_map)
    return parser


def _run_attention_map(args: argparse.Namespace) -> int:
    apis = importlib.import_module("vitasks.apis")
    apis.attention_map(
        args.config, args.checkpoint, args.image, args.out, device=args.device,
        head_fusion=args.head_fusion, add_residual=not args.no_residual,
        cfg_options=_check_cfg_options(args.cfg_options),
    )
    print(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert", help="convert outside ViT weights to vitasks names",
        description="Convert a timm, Hugging Face, Google .npz, MAE or DeiT checkpoint.",
    )
    parser.add_argument("format", choices=CONVERT_FORMATS, metavar="FORMAT",
                        help=f"source format: {', '.join(CONVERT_FORMATS)}")
    parser.add_argument("src", metavar="IN", help="source checkpoint")
    parser.add_argument("dst", metavar="OUT", help="converted checkpoint to write")
    parser.add_argument("--img-size", nargs="+", type=int, metavar="N",
                        help="resample position embeddings to this input size (N or H W)")
    parser.add_argument("--num-classes", type=int, metavar="K",
                        help="keep the head only if it has K classes")
    parser.add_argument("--drop-head", action="store_true", help="leave out the classifier head")
    parser.add_argument("--drop-final-norm", action="store_true",
                        help="leave out the final norm (for dense tasks)")
    parser.add_argument("--pool", choices=("token", "mean"),
                        help="pooling of the converted model when the weights don't say")
    parser.add_argument("--num-heads", type=int, metavar="H",
                        help="attention heads, for widths whose head count can't be inferred")
    parser.add_argument("--keep-pre-logits", action="store_true",
                        help="keep a pre-training pre_logits layer as MLPClsHead.hidden")
    parser.set_defaults(handler=_run_convert, parser=parser)
    return parser


def _run_convert(args: argparse.Namespace) -> int:
    img_size = None
    if args.img_size is not None:
        if len(args.img_size) > 2:
            args.parser.error("--img-size takes one or two numbers (N or H W)")
        # Always (H, W): one number means a square input.
        img_size = (args.img_size[0], args.img_size[-1])
    convert = importlib.import_module("vitasks.convert")
    convert.convert_checkpoint(
        args.format,
        args.src,
        args.dst,
        img_size=img_size,
        num_classes=args.num_classes,
        drop_head=args.drop_head,
        drop_final_norm=args.drop_final_norm,
        pool=args.pool,
        num_heads=args.num_heads,
        keep_pre_logits=args.keep_pre_logits,
    )
    print(f"wrote {args.dst}")
    return 0


# --------------------------------------------------------------------------------------------
# list
# --------------------------------------------------------------------------------------------


def add_list_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "list", help="list the registered components",
        description="Print every component registered in vitasks (built-in and installed "
        "plugins), grouped by registry: its name, the module defining it and the package that "
        "provided it (vitasks, mmengine, a plugin and what named it, or a distribution).",
    )
    parser.add_argument("registry", nargs="?", help="only this registry (e.g. models)")
    parser.set_defaults(handler=_run_list)
    return parser


def _run_list(args: argparse.Namespace) -> int:
    from vitasks.plugins import import_plugins, provider_of, register_all_modules
    from vitasks.registry import ALL_REGISTRIES

    if args.registry is not None and args.registry not in ALL_REGISTRIES:
        raise VitasksError(f"unknown registry '{args.registry}'; valid names: "
                           f"{', '.join(ALL_REGISTRIES)}")
    register_all_modules()
    import_plugins()
    chosen = [args.registry] if args.registry else list(ALL_REGISTRIES)
    blocks = []
    for name in chosen:
        entries = ALL_REGISTRIES[name].module_dict
        lines = [f"{name} ({len(entries)})"]
        modules = {key: getattr(obj, "__module__", "") or "" for key, obj in entries.items()}
        width = max((len(k) for k in entries), default=0)
        module_width = max((len(m) for m in modules.values()), default=0)
        for key in sorted(entries):
            # name, defining module, and the package that provided it: vitasks, mmengine, a
            # plugin (and what named it), or an installed distribution
            provider = provider_of(modules[key])
            lines.append(f"  {key:<{width}}  {modules[key]:<{module_width}}  {provider}".rstrip())
        if not entries:
            lines.append("  (none)")
        blocks.append("\n".join(lines))
    print("\n\n".join(blocks))
    return 0


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

_SUBCOMMANDS: Sequence[Callable] = (
    add_train_parser,
    add_test_parser,
    add_infer_parser,
    add_attention_map_parser,
    add_convert_parser,
    add_list_parser,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitasks",
        description="One Vision Transformer backbone, many vision tasks.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one sub-command; returns the exit status (2 for usage and vitasks errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exit_:  # --help or a usage error: argparse has printed it
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    try:
        return int(args.handler(args) or 0)
    except VitasksError as err:
        print(f"vitasks: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # parser.error() inside a handler
        code = exit_.code
        return code if isinstance(code, int) else 2


if __name__ == "__main__":
    sys.exit(main())
