"""How far later training moves the features of an earlier task's classes, measured on a finished run.

    python benchmarks/feature_drift.py RUN_DIR                      # task 1's classes, after task 1 and after task 2
    python benchmarks/feature_drift.py RUN_DIR --task 0 --after 4 --seed 1

Classifier alignment (smope, dense-prompt, aligned-head, slca) samples old classes from the
statistics stored right after their task. They describe the features of that moment only: if
later prompts or backbone weights move an old class's features by about the distance that
separates it from its neighbours, the aligned head learns a class that is no longer there.

The run's checkpoints after ``--task`` and after ``--after`` are restored, the test images of
``--task``'s classes are passed through both, and the script prints how similar each image's
two features are (cosine), how far each class mean moved, and, for scale, the mean distance
between that task's class means after ``--task``. (Tasks are counted from 0 here, from 1 in the
run's output.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from smope.errors import SmopeError, exit_on_user_error
from smope.experiment import SeedRun
from smope.rundir import RunDir


def features_of_test_images(run: SeedRun, task: int, after: int, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of ``task``'s test images with the learner restored to the end of ``after``.

    ``first``: the learner already holds the state after task ``first - 1``.
    """
    run.restore(after, first)
    learner = run.learner
    return learner.features_and_labels(run.scenario.test_dataset(task), learner.pooled_features)


def drift(before: torch.Tensor, after: torch.Tensor, labels: torch.Tensor) -> dict:
    """Same-image cosine, each class mean's shift, and the mean pairwise distance between the class means before."""
    classes = labels.unique()
    means_before = torch.stack([before[labels == c].mean(0) for c in classes])
    means_after = torch.stack([after[labels == c].mean(0) for c in classes])
    return {
        "classes": classes.tolist(),
        "cosine": F.cosine_similarity(before, after).mean().item(),
        "mean_shift": (means_after - means_before).norm(dim=1).tolist(),
        "class_distance": torch.pdist(means_before).mean().item() if len(classes) > 1 else float("nan"),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--seed", type=int, default=None, help="default: the run's first seed")
    parser.add_argument("--task", type=int, default=0, help="the task whose classes are followed (from 0)")
    parser.add_argument("--after", type=int, default=None, help="the later task to compare with (default: --task + 1)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    run_dir = RunDir(args.run_dir)
    config = run_dir.config()
    seed = config.seeds[0] if args.seed is None else args.seed
    after = args.task + 1 if args.after is None else args.after
    if not 0 <= args.task < after:
        raise SmopeError(f"--after ({after}) must come after --task ({args.task})")
    finished = run_dir.chain(seed).length
    if after >= finished:
        raise SmopeError(f"seed {seed} of {args.run_dir} has {finished} finished task(s) (0..{finished - 1}); choose --after below {finished}")
    run = SeedRun(config, seed, run_dir)
    run.build()
    before_features, labels = features_of_test_images(run, args.task, args.task)
    after_features, _ = features_of_test_images(run, args.task, after, first=args.task + 1)
    result = drift(before_features, after_features, labels)
    shifts = ", ".join(f"{c}: {s:.2f}" for c, s in zip(result["classes"], result["mean_shift"]))
    print(f"{config.method.name}, seed {seed}, task {args.task}'s test images, after task {args.task} -> after task {after}:")
    print(f"  same-image cosine {result['cosine']:.3f}")
    print(f"  class-mean shift (label: distance moved) {shifts}")
    print(f"  mean distance between these class means after task {args.task}: {result['class_distance']:.2f}")
    return result


if __name__ == "__main__":
    exit_on_user_error(main)
