"""The ``vitasks`` command: ``train``, ``test``, ``infer``, ``attention-map``, ``convert``,
``list``, ``benchmark``, ``export-onnx``, ``eval-coco``, ``browse-dataset``, ``analyze-logs``,
``gpu-check`` and ``make-synthetic``.

The package's only command-line code: the lower layers expose functions, and this module parses
arguments for them.

The sub-commands and their arguments are one table (:func:`commands`), each with its handler
``_run_<name>``; the scripts in ``tools/`` call ``vitasks.cli.main(["train", *sys.argv[1:]])``. Heavy modules (torch, the
Runner, the converters) are imported inside the handlers, so ``--help`` and argument errors
answer at once.

A :class:`vitasks.errors.VitasksError` (a bad config, data or checkpoint) is printed as
``vitasks: error: <message>`` with exit status 2 and no traceback; any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, List, NamedTuple, Optional, Sequence

from vitasks.errors import VitasksError

__all__ = ["main", "build_parser", "commands", "Command"]

CONVERT_FORMATS = ("timm", "hf", "npz", "mae", "deit", "detectron2", "mmdet", "mmseg")
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
# the handlers, one per sub-command (``_run_<name>``)
# --------------------------------------------------------------------------------------------


def _run_train(args: argparse.Namespace) -> int:
    launch = importlib.import_module("vitasks.engine.launch")
    launch.train(
        args.config,
        work_dir=args.work_dir,
        resume=args.resume,
        amp=args.amp,
        launcher=args.launcher,
        cfg_options=args.cfg_options,
    )
    return 0


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
    launch = importlib.import_module("vitasks.engine.launch")
    metrics = launch.test(
        args.config,
        args.checkpoint,
        work_dir=args.work_dir,
        dump=args.dump,
        amp=args.amp,
        launcher=args.launcher,
        cfg_options=args.cfg_options,
    )
    if isinstance(metrics, dict) and os.environ.get("RANK", "0") == "0":  # one table, not one per rank
        print(format_metrics(metrics))
    return 0


def _run_infer(args: argparse.Namespace) -> int:
    apis = importlib.import_module("vitasks.apis")
    results = apis.run_inference(
        args.config,
        args.checkpoint,
        args.inputs,
        args.out_dir,
        device=args.device,
        topk=args.topk,
        cfg_options=args.cfg_options,
    )
    count = len(results) if isinstance(results, (list, tuple)) else len(args.inputs)
    print(f"wrote predictions for {count} input(s) to {args.out_dir}")
    return 0


def _run_attention_map(args: argparse.Namespace) -> int:
    apis = importlib.import_module("vitasks.apis")
    apis.attention_map(
        args.config, args.checkpoint, args.image, args.out, device=args.device,
        head_fusion=args.head_fusion, add_residual=not args.no_residual,
        cfg_options=args.cfg_options,
    )
    print(f"wrote {args.out}")
    return 0


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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _write_json(path: str, data) -> None:
    import json
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)


def _run_benchmark(args: argparse.Namespace) -> int:
    throughput = importlib.import_module("vitasks.benchmarks.throughput")
    result = throughput.run_benchmark(
        args.config, batch_size=args.batch_size, amp=args.amp, compile=args.compile,
        grad_ckpt=args.grad_ckpt, img_size=args.img_size, iters=args.iters,
        warmup=max(0, args.warmup), device=args.device, matmul_size=args.matmul_size,
        matmul_iters=args.matmul_iters, train=not args.no_train,
        cfg_options=args.cfg_options, onnx=args.onnx,
    )
    print(throughput.format_table(result))
    if args.json:
        _write_json(args.json, result)
    return 0


def _run_export_onnx(args: argparse.Namespace) -> int:
    if args.img_size is not None and len(args.img_size) > 2:
        args.parser.error("--img-size takes H or H W")
    img_size = None if args.img_size is None else (args.img_size * 2)[:2]
    checkpoint = None if args.checkpoint.lower() == "none" else args.checkpoint
    onnx = importlib.import_module("vitasks.deploy.onnx")
    try:
        result = onnx.export_from_config(args.config, checkpoint, args.out, cfg_options=args.cfg_options,
                                         batch_size=args.batch_size, opset=args.opset, img_size=img_size,
                                         rtol=args.rtol)
    except onnx.ExportMismatchError as err:
        print(f"vitasks: error: {err}", file=sys.stderr)
        return 1
    print(result.summary())
    if args.time > 0:
        timing = importlib.import_module("vitasks.benchmarks.onnx_timing")
        print(timing.format_comparison(timing.compare_onnx_eager(
            args.out, args.config, checkpoint, args.batch_size, iters=args.time, img_size=img_size,
            cfg_options=args.cfg_options)))
    return 0


def _run_eval_coco(args: argparse.Namespace) -> int:
    coco = importlib.import_module("vitasks.evaluation.coco")
    metrics, text = coco.evaluate_results_file(args.results, args.annotations)
    print(text)
    print(format_metrics(metrics))
    if args.out:
        _write_json(args.out, metrics)
        print(f"wrote {args.out}")
    return 0


def _run_browse_dataset(args: argparse.Namespace) -> int:
    browse = importlib.import_module("vitasks.visualization.browse")
    written = browse.browse_dataset(args.config, args.out_dir, num=args.num,
                                    cfg_options=args.cfg_options)
    print(f"wrote {len(written)} images to {args.out_dir}")
    return 0


def _run_analyze_logs(args: argparse.Namespace) -> int:
    import os

    curves = importlib.import_module("vitasks.visualization.log_curves")
    try:
        if args.action == "plot_curve":
            out = args.out or os.path.join(args.work_dirs[0], "curves.png")
            curves.plot_curves(args.work_dirs, args.keys, out, title=args.title, legend=args.legend)
            print(f"wrote {out}")
            return 0
        for path in args.work_dirs:
            print(curves.format_train_time(path, curves.train_time_stats(curves.load_work_dir_logs(path))))
    except OSError as err:
        raise VitasksError(str(err)) from err
    return 0


def _run_gpu_check(args: argparse.Namespace) -> int:
    gpu = importlib.import_module("vitasks.benchmarks.gpu_check")
    report = gpu.gpu_check(args.config, args.batch_size, args.peak_tflops, args.iters, compile=not args.no_compile)
    print(gpu.format_report(report))
    if args.json:
        _write_json(args.json, report)
    return 0


def _run_make_synthetic(args: argparse.Namespace) -> int:
    synthetic = importlib.import_module("vitasks.data.synthetic")
    synthetic.make_synthetic(args.kind, args.out, seed=args.seed, style=args.style)
    print(f"wrote a synthetic {args.kind} dataset ({args.style} style) to {args.out}")
    return 0


# --------------------------------------------------------------------------------------------
# the sub-commands (one table) and main
# --------------------------------------------------------------------------------------------


class Command(NamedTuple):
    """One sub-command: its handler (which reaches the parser as ``args.parser``, for
    ``parser.error``) and its arguments as ``(flags, add_argument keywords)``. With
    ``cfg_options``, ``--cfg-options`` comes last and :func:`main` checks it before the handler
    runs. ``actions``: sub-commands of its own, ``(name, help, arguments)``."""

    name: str
    run: Callable[[argparse.Namespace], int]
    help: str
    description: str
    arguments: Sequence[tuple] = ()
    cfg_options: bool = True
    actions: Sequence[tuple] = ()


def _arg(*flags: str, **keywords) -> tuple:
    """An argument as ``parser.add_argument(*flags, **keywords)`` takes it."""
    return flags, keywords


def commands() -> List[Command]:
    """Every sub-command of ``vitasks`` (the lists its modules name are read when the parser is built)."""
    from vitasks.data.synthetic import KINDS
    from vitasks.visualization.rollout import HEAD_FUSIONS

    config, checkpoint = _arg("config", help="YAML config file"), _arg("checkpoint", help="checkpoint file")
    device = _arg("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    json_out = _arg("--json", default=None, metavar="OUT", help="also write the results as JSON")
    store = dict(action="store_true")
    launcher = _arg("--launcher", choices=LAUNCHERS, default="none", help="job launcher for distributed runs")
    # torch.distributed.launch / older torchrun pass the local rank; the launcher reads it from the
    # environment instead.
    local_rank = _arg("--local-rank", "--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    return [
        Command("train", _run_train, "train a model from a config",
                "Train with mmengine's Runner. Checkpoints and `last_checkpoint` go to the work dir (default "
                "work_dirs/<config name>).", [
                    config,
                    _arg("--work-dir", help="where logs and checkpoints go"),
                    _arg("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                         help="resume training: from CKPT, or without a value from the work dir's last checkpoint"),
                    _arg("--amp", **store, help="automatic mixed precision"),
                    launcher, local_rank,
                ]),
        Command("test", _run_test, "evaluate a checkpoint",
                "Evaluate a checkpoint on the config's test set; writes metrics.json in the work dir.", [
                    config, checkpoint,
                    _arg("--work-dir", help="where logs and metrics.json go"),
                    _arg("--dump", metavar="PATH", help="also write the predictions (the config's `test_dump`) to PATH"),
                    _arg("--amp", **store, help="evaluate under bf16 autocast (CPU and GPU)"),
                    launcher, local_rank,
                ]),
        Command("infer", _run_infer, "predict on images or videos (every task of a multi-task model)",
                "Write predictions as JSON and drawn as PNG, one per input.", [
                    config, checkpoint,
                    _arg("inputs", nargs="+", metavar="INPUT", help="image or video files, or folders of them"),
                    _arg("--out-dir", required=True, help="output folder"),
                    device,
                    _arg("--topk", type=int, default=5, help="classes kept per prediction"),
                ]),
        Command("attention-map", _run_attention_map, "attention rollout and per-layer maps over an image",
                "Attention rollout (Abnar & Zuidema 2020) and per-layer class-token attention of a ViT model, "
                "drawn over the image.", [
                    config, checkpoint, _arg("image", help="image file"), _arg("--out", required=True, help="output PNG"),
                    _arg("--head-fusion", choices=HEAD_FUSIONS, default="mean", help="how heads are fused per layer"),
                    _arg("--no-residual", **store, help="do not model the skip connection as 0.5 * (A + I)"),
                    device,
                ]),
        Command("convert", _run_convert, "convert outside ViT weights to vitasks names",
                "Convert a timm, Hugging Face, Google .npz, MAE or DeiT checkpoint, or a whole detectron2 / "
                "mmdetection ViTDet detector or mmsegmentation UperNet segmentor (these print the config and "
                "--cfg-options that hold them).", [
                    _arg("format", choices=CONVERT_FORMATS, metavar="FORMAT",
                         help=f"source format: {', '.join(CONVERT_FORMATS)}"),
                    _arg("src", metavar="IN", help="source checkpoint"),
                    _arg("dst", metavar="OUT", help="converted checkpoint to write"),
                    _arg("--img-size", nargs="+", type=int, metavar="N",
                         help="resample position embeddings to this input size (N or H W)"),
                    _arg("--num-classes", type=int, metavar="K", help="keep the head only if it has K classes"),
                    _arg("--drop-head", **store, help="leave out the classifier head"),
                    _arg("--drop-final-norm", **store, help="leave out the final norm (for dense tasks)"),
                    _arg("--pool", choices=("token", "mean"),
                         help="pooling of the converted model when the weights don't say"),
                    _arg("--num-heads", type=int, metavar="H",
                         help="attention heads, for widths whose head count can't be inferred"),
                    _arg("--keep-pre-logits", **store, help="keep a pre-training pre_logits layer as MLPClsHead.hidden"),
                ], cfg_options=False),
        Command("list", _run_list, "list the registered components",
                "Print every component registered in vitasks (built-in and installed plugins), grouped by "
                "registry: its name, the module defining it and the package that provided it (vitasks, mmengine, "
                "a plugin and what named it, or a distribution).",
                [_arg("registry", nargs="?", help="only this registry (e.g. models)")], cfg_options=False),
        Command("benchmark", _run_benchmark, "throughput, memory and FLOP efficiency of a config's model",
                "Inference and training throughput, peak memory, FLOPs and FLOP/s efficiency relative to a plain "
                "matmul, for the model of a config (vitasks/benchmarks/throughput.py says what is measured).", [
                    config,
                    _arg("--batch-size", type=_positive_int, default=8),
                    _arg("--amp", **store, help="bf16 autocast (fp16 on GPUs without bf16)"),
                    _arg("--compile", **store,
                         help="torch.compile the model (inductor; inference with freezing=True); compilation "
                         "happens in the first warm-up iteration, whose time is printed as '1st iter s'"),
                    _arg("--grad-ckpt", **store, help="gradient checkpointing in training"),
                    _arg("--img-size", type=_positive_int, default=None, help="input side (default: the config's)"),
                    _arg("--iters", type=_positive_int, default=10, help="timed iterations per phase"),
                    _arg("--warmup", type=int, default=3, help="warm-up iterations per phase"),
                    _arg("--device", default=None, help="default: cuda when available, else cpu"),
                    _arg("--matmul-size", type=_positive_int, default=4096, help="side of the reference matmul"),
                    _arg("--matmul-iters", type=_positive_int, default=5,
                         help="timed reference matmuls before and after the model (each)"),
                    _arg("--no-train", **store, help="inference only"),
                    _arg("--onnx", **store, help="also export as ONNX and time onnxruntime beside eager PyTorch "
                         "(CPU, fp32; needs the deploy extra)"),
                    json_out,
                ]),
        Command("export-onnx", _run_export_onnx, "export a task model as ONNX, checked with onnxruntime",
                "Export a task model as ONNX (dynamic batch) and check it against PyTorch with onnxruntime. The "
                "graph takes already-normalised float32 inputs; the mean/std, the outputs and their "
                "post-processing are in the file's metadata_props. Exit status 1 when onnxruntime disagrees with "
                "PyTorch, 2 when the model cannot be exported.", [
                    config, _arg("checkpoint", help="checkpoint file; `none` keeps the initial weights"),
                    _arg("out", help="the .onnx file to write"),
                    _arg("--batch-size", type=_positive_int, default=2,
                         help="a batch size the check runs at (plus one other); the batch axis is dynamic"),
                    _arg("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)"),
                    _arg("--img-size", type=_positive_int, nargs="+", default=None, metavar="H [W]",
                         help="input size (default: the backbone's img_size)"),
                    _arg("--rtol", type=float, default=1e-4,
                         help="fail above this relative difference between onnxruntime and PyTorch (default 1e-4)"),
                    _arg("--time", type=int, default=0, metavar="ITERS",
                         help="then time onnxruntime and eager PyTorch at --batch-size, ITERS runs each"),
                ]),
        Command("eval-coco", _run_eval_coco, "score a COCO results file with pycocotools",
                "Score a COCO results file with pycocotools (bbox, and segm when present).", [
                    _arg("results", help="COCO results JSON (a list of detections)"),
                    _arg("annotations", help="COCO annotation JSON the results refer to"),
                    _arg("--out", help="write the metrics as a flat JSON {name: value}"),
                ], cfg_options=False),
        Command("browse-dataset", _run_browse_dataset, "draw what the training pipeline feeds the model",
                "Draw what the training pipeline feeds the model: the first N samples of the training stream, "
                "random augmentations included (seeded by randomness.seed).", [
                    config, _arg("--out-dir", required=True, help="folder for the PNGs"),
                    _arg("--num", type=_positive_int, default=10, help="how many samples (default 10)"),
                ]),
        Command("analyze-logs", _run_analyze_logs, "training curves and iteration times from work dirs' logs",
                "Training curves and iteration times from work dirs' logs.", cfg_options=False, actions=[
                    ("plot_curve", "plot logged quantities (loss, lr, metrics) as a PNG", [
                        _arg("work_dirs", nargs="+", metavar="WORK_DIR",
                             help="work dirs (or run folders, or scalars.json files); several compare"),
                        _arg("--keys", nargs="+", default=["loss"], help="logged keys to plot (default: loss)"),
                        _arg("--out", help="the PNG to write (default: WORK_DIR/curves.png of the first)"),
                        _arg("--title", help="figure title"),
                        _arg("--legend", nargs="+", help="curve labels: one per work dir, or one per work dir and key"),
                    ]),
                    ("cal_train_time", "mean time per training iteration",
                     [_arg("work_dirs", nargs="+", metavar="WORK_DIR")]),
                ]),
        Command("gpu-check", _run_gpu_check, "check a GPU machine (tools/gpu_check.sh)",
                "Which SDPA and detection kernels run, the benchmark table of a ViT-B/16 and the MFU of its bf16 "
                "training step (vitasks/benchmarks/gpu_check.py).", [
                    _arg("--config", default="configs/cls_imagenet.yaml", help="ViT-B/16 by default"),
                    _arg("--batch-size", type=_positive_int, default=None,
                         help="training batch for the MFU (default: largest that fits)"),
                    _arg("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in the table"),
                    _arg("--iters", type=_positive_int, default=10),
                    _arg("--no-compile", **store),
                    json_out,
                ], cfg_options=False),
        Command("make-synthetic", _run_make_synthetic, "write a small generated dataset",
                "Write a small generated dataset in a standard layout (tools/make_synthetic.py).", [
                    _arg("kind", choices=sorted(KINDS), help="which task's dataset"),
                    _arg("out", help="output folder (the dataset's data_root)"),
                    _arg("--seed", type=int, default=0),
                    _arg("--style", choices=("random", "plain", "photo"), default="random",
                         help="random: shapes in random colours and textures on textured backgrounds (default); "
                         "plain: white shapes on black (quick checks); photo: shapes drawn light or dark over crops "
                         "of the photograph that ships with matplotlib (photo composites; video: the still "
                         "backgrounds drift slowly). Every kind takes every style."),
                ], cfg_options=False),
    ]


def _add_arguments(parser: argparse.ArgumentParser, arguments: Sequence[tuple]) -> None:
    for flags, keywords in arguments:
        parser.add_argument(*flags, **keywords)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitasks",
        description="One Vision Transformer backbone, many vision tasks.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in commands():
        sub = subparsers.add_parser(command.name, help=command.help, description=command.description)
        sub.set_defaults(handler=command.run, parser=sub)
        _add_arguments(sub, command.arguments)
        if command.actions:
            actions = sub.add_subparsers(dest="action", required=True)
            for name, text, arguments in command.actions:
                _add_arguments(actions.add_parser(name, help=text), arguments)
        if command.cfg_options:
            _add_cfg_options(sub)
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
        if getattr(args, "cfg_options", None) is not None:  # a malformed KEY=VALUE fails before heavy imports
            args.cfg_options = _check_cfg_options(args.cfg_options)
        return int(args.handler(args) or 0)
    except VitasksError as err:
        print(f"vitasks: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # parser.error() inside a handler
        code = exit_.code
        return code if isinstance(code, int) else 2


def end_process(code: int) -> None:
    """Leave the process with ``code`` (what ``tools/train.py``, ``tools/test.py`` and the
    ``vitasks`` command end with).

    After a distributed run the process group is destroyed first, while the interpreter still
    works (:func:`vitasks.engine.distributed.shutdown_distributed`). If the backend's threads
    outlive it (FSDP on torch 2.13 holds its group from C++), the interpreter's own finalisation
    could abort: a gloo worker that asks for the GIL then is ended with ``pthread_exit`` inside a
    ``noexcept`` destructor (``terminate called without an active exception``). Then the logs and
    output are flushed and the process ends with ``os._exit(code)``, skipping that finalisation,
    so a finished run exits with its status, never with SIGABRT.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        import logging
        import os

        from vitasks.engine.distributed import backend_threads, shutdown_distributed

        shutdown_distributed()
        if backend_threads():
            print("distributed: backend threads outlive the process group; output flushed, the process "
                  f"ends now with status {code}", file=sys.stderr)
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    sys.exit(code)


def console_main() -> None:
    """The ``vitasks`` console command."""
    end_process(main())


if __name__ == "__main__":
    console_main()
