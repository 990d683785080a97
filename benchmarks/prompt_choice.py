"""Which pool prompt each test image of a finished vq-prompt run chose, per test task and prompted block.

    python benchmarks/prompt_choice.py benchmarks/results/runs/full/Split-MNIST/vq-prompt
    python benchmarks/prompt_choice.py RUN_DIR --seed 1 --json

VQ-Prompt snaps each input's soft mixture of pool prompts to one pool prompt per block
(docs/baselines.md#vq-prompt). Whether the inputs choose different prompts, and whether a task's
images keep to their own, is what the method's selection is for: one prompt for every image
means the pool acts as a single learned prompt. Counts come from the seed's last checkpoint over
each task's test images, in evaluation mode.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from smope.errors import SmopeError, exit_on_user_error
from smope.experiment import SeedRun
from smope.rundir import RunDir


@torch.no_grad()
def prompt_choices(run_dir: Path, seed: int) -> dict:
    """``{"blocks": prompted blocks, "counts": counts[task][i][prompt]}``: test images of ``task`` that chose pool ``prompt`` in block ``blocks[i]``."""
    config = RunDir(run_dir).config()
    run = SeedRun(config, seed, run_dir)
    chain = run.chain()
    if not chain.length:
        raise SmopeError(f"{run_dir} has no task checkpoints for seed {seed}: nothing to count")
    run.build()
    pool = getattr(run.learner.model, "pool", None)
    if not hasattr(pool, "chosen"):
        raise SmopeError(f"{run_dir} is a {config.method.name} run: its learner does not snap to pool prompts (only vq-prompt does)")
    run.restore(chain.length - 1)
    counts = []
    for task in range(chain.length):
        per_block = torch.zeros(len(pool.layers), pool.prompts.shape[1], dtype=torch.int64)
        for images, _ in run.learner.trainer.loader(run.scenario.test_dataset(task), config.train.eval_batch_size, shuffle=False):
            run.learner.logits(images)
            per_block.scatter_add_(1, pool.chosen.cpu(), torch.ones_like(pool.chosen.cpu()))
        counts.append(per_block.tolist())
    return {"blocks": list(pool.layers), "counts": counts}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--seed", type=int, default=None, help="default: the run's first seed")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    args = parser.parse_args(argv)
    seed = RunDir(args.run_dir).config().seeds[0] if args.seed is None else args.seed
    choices = prompt_choices(args.run_dir, seed)
    if args.json:
        print(json.dumps(choices))
        return choices
    for task, rows in enumerate(choices["counts"]):
        used = ", ".join(f"block {b}: {sum(1 for n in row if n)} of {len(row)}" for b, row in zip(choices["blocks"], rows))
        print(f"test task {task + 1}: pool prompts chosen {used}; counts {rows}")
    return choices


if __name__ == "__main__":
    exit_on_user_error(main)
