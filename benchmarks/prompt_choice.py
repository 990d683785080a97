"""Which pool prompt each test image of a finished vq-prompt run chose, per test task and prompted block.

    python benchmarks/prompt_choice.py benchmarks/results/runs/full/Split-MNIST/vq-prompt
    python benchmarks/prompt_choice.py RUN_DIR --seed 1 --json

VQ-Prompt snaps each input's soft mixture of pool prompts to one pool prompt per block
(docs/baselines.md#vq-prompt); :func:`smope.prompt_choice.pool_prompt_choices` counts the choices
(``smope report`` shows the same as its "Pool prompt choice" section).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from smope.errors import exit_on_user_error
from smope.prompt_choice import pool_choice_lines, pool_prompt_choices
from smope.rundir import RunDir


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--seed", type=int, default=None, help="default: the run's first seed")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    args = parser.parse_args(argv)
    seed = RunDir(args.run_dir).config().seeds[0] if args.seed is None else args.seed
    choices = pool_prompt_choices(args.run_dir, seed)
    print(json.dumps(choices) if args.json else "\n".join(pool_choice_lines(choices)))
    return choices


if __name__ == "__main__":
    exit_on_user_error(main)
