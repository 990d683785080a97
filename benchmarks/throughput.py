"""Images per second of a SMoPE learner for training and inference: fp32 vs bf16 vs torch.compile.

Every variant is a learner built from the same settings the trainer uses (``train.precision``,
``train.compile``), so the numbers include autocast, the loss and the optimizer step. Variants are measured in the same run, interleaved, and the median of the
repeats is reported as a ratio to fp32, because shared machines are noisy. The first call
of each variant is a warm-up (for compiled variants it includes the compilation).

    python benchmarks/throughput.py [--model vit_small_patch14_dinov2] [--img-size 112] [--batch 8]
                                    [--repeats 5] [--variants fp32,bf16,compiled[,compiled-bf16]]

The defaults take about five minutes on 2 CPU cores, most of it compiling and bf16 (CPUs
without native bf16 instructions emulate it).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.data import TensorDataset

from smope.learners import Learner, TaskContext, create_learner
from smope.runconfig import load_config

# name -> (train.precision, train.compile)
VARIANTS = {"fp32": ("fp32", False), "bf16": ("bf16", False), "compiled": ("fp32", True), "compiled-bf16": ("bf16", True)}


def build_learner(args: argparse.Namespace, precision: str, compiled: bool) -> Learner:
    overrides = [
        f"model.name={args.model}",
        f"model.img_size={args.img_size}",
        "model.weights=none",
        f"train.batch_size={args.batch}",
        f"train.eval_batch_size={args.batch}",
        f"train.precision={precision}",
        "train.device=cpu",
        "train.progress=false",
    ]
    torch.manual_seed(0)
    learner = create_learner(load_config(None, overrides), args.num_classes)
    if compiled:
        learner.compile()
    return learner


def seconds(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch14_dinov2")
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1, help="training steps / inference batches per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--variants", default="fp32,bf16,compiled", help=f"comma-separated subset of {', '.join(VARIANTS)}; fp32 is always measured")
    args = parser.parse_args()
    names = ["fp32", *[n for n in args.variants.split(",") if n != "fp32"]]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")

    images = torch.randn(args.steps * args.batch, 3, args.img_size, args.img_size)
    labels = torch.randint(0, args.num_classes, (len(images),))
    classes = range(args.num_classes)
    task = TaskContext(task=0, classes=classes, seen=classes, train_data=TensorDataset(images, labels), seed=0)
    batches = images.split(args.batch)

    def train(learner: Learner) -> None:
        learner.train_phase(task, epochs=1, description="benchmark")

    def infer(learner: Learner) -> None:
        for batch in batches:
            learner.logits(batch)

    learners = {name: build_learner(args, *VARIANTS[name]) for name in names}
    for learner in learners.values():  # warm-up, and compilation for the compiled variants
        train(learner)
        infer(learner)
    timings = {(name, phase): [] for name in names for phase in ("train", "inference")}
    for _ in range(args.repeats):
        for name, learner in learners.items():
            timings[name, "train"].append(seconds(lambda: train(learner)))
            timings[name, "inference"].append(seconds(lambda: infer(learner)))

    print(f"{args.model} (random weights) at {args.img_size}px, SMoPE sparse, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{torch.__version__}; median of {args.repeats} interleaved repeats of {args.steps} step(s)")
    for phase in ("train", "inference"):
        base = statistics.median(timings["fp32", phase])
        for name in names:
            median = statistics.median(timings[name, phase])
            print(f"  {phase:<9} {name:<14} {len(images) / median:8.1f} images/s   x{base / median:.2f} vs fp32")


if __name__ == "__main__":
    main()
