"""The ``smope`` command line: run (or its --dry-run), eval, report, predict, export, params, flops.

User-fixable problems (:class:`~smope.errors.SmopeError`) print one line and exit 2;
an interrupted run (Ctrl-C: exit 130; SIGTERM, what a cluster scheduler sends before it
preempts a job: exit 143) says how to resume. Finished tasks are always on disk.
``torchrun --nproc_per_node N -m smope run CONFIG`` runs data-parallel (see :mod:`smope.distributed`).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from .errors import SmopeError, exit_on_user_error
from .metrics import format_mean_std

# The default experiment, shipped inside the package so `smope run` works from any folder
# (configs/demo.yaml in the repository links to it).
DEMO_CONFIG = Path(__file__).with_name("demo.yaml")


def _summary(metrics: dict, out: str) -> str:
    lines = [f"\n{metrics['method']} on {metrics['dataset']} ({metrics['num_tasks']} tasks, seeds {metrics['seeds']})"]
    curve = "  ".join(f"{a:.1f}" for a in metrics["average_accuracy"])
    lines.append(f"  average accuracy after each task (%): {curve}")
    several = len(metrics["seeds"]) > 1
    lines.append(f"  final average accuracy: {format_mean_std(metrics, 'final_average_accuracy', '%', '+-', several)}")
    lines.append(f"  cumulative average accuracy: {format_mean_std(metrics, 'cumulative_average_accuracy', '%', '+-', several)}")
    lines.append(f"  final forgetting: {format_mean_std(metrics, 'final_forgetting', '', '+-', several)}")
    lines.append(f"  trainable parameters: {metrics['trainable_parameters']:,d}")
    lines.append(f"  outputs: {out}/ (metrics.json, metrics.csv, log.jsonl, config.yaml, seed_*/task_*.safetensors)")
    return "\n".join(lines)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt (a BaseException, so nothing swallows it)."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def cmd_run(args: argparse.Namespace) -> None:
    from .runconfig import load_config

    config_path, overrides = args.config, [text for text in args.overrides if text != "--dry-run"]
    if config_path is not None and "=" in config_path and not Path(config_path).exists():
        overrides.insert(0, config_path)  # `smope run train.epochs=1`: no file, only overrides
        config_path = None
    if config_path is None:
        config_path = DEMO_CONFIG
    config = load_config(config_path, overrides)
    if args.dry_run or "--dry-run" in args.overrides:  # the flag may stand among the overrides
        from .dryrun import dry_run

        print(dry_run(config))
        return
    from . import distributed
    from .experiment import run_experiment

    previous = signal.signal(signal.SIGTERM, _terminate)
    with distributed.data_parallel(config.train.device, config.train.parallel):  # under torchrun; nothing changes in one process
        try:
            metrics = run_experiment(config)
        except (KeyboardInterrupt, Terminated) as exc:
            why, status = ("interrupted", 130) if isinstance(exc, KeyboardInterrupt) else ("terminated (SIGTERM)", 143)
            if distributed.is_main():
                print(f"\n{why}: finished tasks are saved in {config.output_dir}; run the same command to resume", file=sys.stderr)
            raise SystemExit(status) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
        if distributed.is_main():
            print(_summary(metrics, config.output_dir))


def cmd_eval(args: argparse.Namespace) -> None:
    from .experiment import evaluate_run

    result = evaluate_run(Path(args.run_dir))
    print(f"re-evaluated {args.run_dir}: final average accuracy {result['final_average_accuracy']:.2f}%, "
          f"forgetting {result['final_forgetting']:.2f} (written to {args.run_dir}/eval.json)")


def cmd_report(args: argparse.Namespace) -> None:
    if len(args.run_dirs) > 1 and args.out is None:
        raise SmopeError("comparing several runs needs a folder for the result: add --out DIR")
    if len(args.run_dirs) > 1:
        from .compare import compare_runs  # builds each method's model for its FLOPs: imports the learners

        paths = compare_runs([Path(d) for d in args.run_dirs], Path(args.out))
    else:
        from .report import write_report

        paths = write_report(Path(args.run_dirs[0]), None if args.out is None else Path(args.out))
    for path in paths:
        print(path)


def cmd_predict(args: argparse.Namespace) -> None:
    import json

    from .predict import format_predictions, image_paths, load_trained_run, predict

    if args.top_k < 1:
        raise SmopeError(f"--top-k must be at least 1, got {args.top_k}")
    if args.routes:
        from .routes import refuse_gateless

        refuse_gateless(args.run_dir)  # before the model is built
    paths = image_paths(args.images)
    results = predict(load_trained_run(args.run_dir, args.seed), paths, args.top_k, strict=args.strict, routes=args.routes)
    if args.json:
        print(json.dumps(results, indent=2))
    elif args.routes:
        from .routes import format_routes

        print(format_routes(results))
    else:
        print(format_predictions(results))


def cmd_export(args: argparse.Namespace) -> None:
    from .predict import export_adapter

    out = export_adapter(args.run_dir, args.out_dir, args.seed, overwrite=args.overwrite)
    print(f"adapter written to {out}/ (adapter_config.json, adapter_model.safetensors, classes.json)")


def cmd_params(args: argparse.Namespace) -> None:
    from .cost import method_config, parameter_table

    config = method_config(args.model, args.method, args.num_experts, args.top_k, args.layers, args.img_size, args.overrides)
    print(parameter_table(config, args.num_classes))


def cmd_flops(args: argparse.Namespace) -> None:
    from .cost import flops_table, method_config

    print(flops_table(method_config(args.model, args.method, img_size=args.img_size, overrides=args.overrides), args.num_classes))


def _block_list(text: str) -> list[int]:
    try:
        return [int(i) for i in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices, e.g. 0,1,2, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smope", description="Sparse mixtures of prompt experts for continual learning")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) an experiment")
    run.add_argument("--dry-run", action="store_true", help="print the resolved config, class orders and task sizes; train nothing")
    run.add_argument("config", nargs="?", help="YAML config (default: the offline demo, configs/demo.yaml)")
    # REMAINDER, not "*": argparse would refuse overrides after a --dry-run placed among them.
    run.add_argument("overrides", nargs=argparse.REMAINDER, help="dotted overrides, e.g. train.epochs=3 data.root=/data")
    run.set_defaults(func=cmd_run)

    evaluate = sub.add_parser("eval", help="re-evaluate a run from its checkpoints")
    evaluate.add_argument("run_dir")
    evaluate.set_defaults(func=cmd_eval)

    report = sub.add_parser("report", help="plots and a Markdown summary of a run, or a comparison of several runs")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", default=None, help="output folder (required for several runs; default for one: RUN_DIR/report)")
    report.set_defaults(func=cmd_report)

    predict = sub.add_parser(
        "predict",
        help="top-k classes of images with a run's final checkpoint",
        description="Top-k classes of images with the last finished task's checkpoint of one seed of a run, "
        "preprocessed as the run's test images were. Unreadable files are skipped with one line each on stderr.",
    )
    predict.add_argument("run_dir", help="a run's output_dir (holds config.yaml and seed_*/task_*.safetensors)")
    predict.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders searched recursively for images")
    predict.add_argument("--top-k", type=int, default=5, help="classes per image, at most the classes learned so far (default: %(default)s)")
    predict.add_argument("--seed", type=int, default=None, help="which seed's model (default: the run's first)")
    predict.add_argument("--json", action="store_true", help="print JSON for scripts (default: a table per image)")
    predict.add_argument("--strict", action="store_true", help="stop at the first unreadable file instead of skipping it")
    predict.add_argument(
        "--routes",
        action="store_true",
        help="also show, per image, the prompt experts the gate chose in each layer and head, their margins and "
        "the task whose training images used them (docs/routing.md); with --json every head's detail",
    )
    predict.set_defaults(func=cmd_predict)

    export = sub.add_parser("export", help="save a run's final adapter in peft's layout (SMoPEModel.from_pretrained loads it)")
    export.add_argument("run_dir")
    export.add_argument("out_dir")
    export.add_argument("--seed", type=int, default=None, help="which seed's model (default: the run's first)")
    export.add_argument("--overwrite", action="store_true", help="replace an adapter already in out_dir")
    export.set_defaults(func=cmd_export)

    params = sub.add_parser("params", help="parameter counts of a method on a backbone (random weights, nothing downloaded)")
    params.add_argument("--model", required=True, help="timm model name, e.g. vit_base_patch16_224")
    params.add_argument("--num-classes", type=int, required=True)
    params.add_argument("--method", default="smope")
    params.add_argument("--num-experts", type=int, default=None, help="prompt experts per head (default 25)")
    params.add_argument("--top-k", type=int, default=None, help="active experts (default 5)")
    params.add_argument("--layers", type=_block_list, default=None, help="comma-separated prompted blocks (default 0,1,2,3,4,5)")
    params.add_argument("--img-size", type=int, default=None)
    params.add_argument("overrides", nargs="*", metavar="key=value", help="more method settings, e.g. method.prompt_length=40")
    params.set_defaults(func=cmd_params)

    flops = sub.add_parser("flops", help="forward FLOPs per image for training and inference (random weights, nothing downloaded)")
    flops.add_argument("--model", required=True, help="timm model name, e.g. vit_base_patch16_224")
    flops.add_argument("--method", default="smope")
    flops.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    flops.add_argument("--num-classes", type=int, default=100)
    flops.add_argument("overrides", nargs="*", metavar="key=value", help="more method settings, e.g. method.prompt_length=40")
    flops.set_defaults(func=cmd_flops)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    exit_on_user_error(lambda: args.func(args))


if __name__ == "__main__":
    main()
