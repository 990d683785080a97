"""Compare finished runs with the paper: one Markdown table over every RUNS_DIR/*/metrics.json.

    python experiments/collect.py [RUNS_DIR]     (default: runs)

Only the metrics.json files are read and smope is not imported (its import loads torch,
timm and peft), so the table can be made quickly anywhere the run folders were copied to.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# SMoPE's final average accuracy (%) in the paper, ViT-B/16; it reports 10-task splits only
# (docs/method.md#paper-numbers). Its 0.38M trainable parameters are for a 200-class head.
PAPER_FAA = {("imagenet-r", 10): 79.32, ("cifar100", 10): 89.23, ("cub200", 10): 87.43}
PAPER_PARAMS = "0.38M"

HEADER = [
    "setting",
    "method",
    "seeds",
    "FAA (%)",
    "CAA (%)",
    "forgetting",
    "trainable params",
    "paper SMoPE FAA (%)",
    "FAA - paper",
    "paper params",
]


def mean_std(metrics: dict, key: str) -> str:
    """``mean ± std`` over seeds, as in ``smope report``'s summary."""
    return f"{metrics[key]:.2f} ± {metrics[key + '_std']:.2f}"


def row(setting: str, metrics: dict) -> list[str]:
    paper = PAPER_FAA.get((metrics["dataset"], metrics["num_tasks"]))
    return [
        setting,
        metrics["method"],
        str(len(metrics["seeds"])),
        mean_std(metrics, "final_average_accuracy"),
        mean_std(metrics, "cumulative_average_accuracy"),
        mean_std(metrics, "final_forgetting"),
        f"{metrics['trainable_parameters']:,d}",
        "-" if paper is None else f"{paper:.2f}",
        "-" if paper is None else f"{metrics['final_average_accuracy'] - paper:+.2f}",
        "-" if paper is None else PAPER_PARAMS,
    ]


def markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def table(runs_dir: Path) -> str:
    """The comparison table, one row per run folder holding a metrics.json, in name order."""
    paths = sorted(runs_dir.glob("*/metrics.json"))
    if not paths:
        raise SystemExit(f"no {runs_dir}/*/metrics.json: finish a run first, e.g. experiments/run_paper.sh")
    rows = [row(path.parent.name, json.loads(path.read_text())) for path in paths]
    return "\n".join(markdown_row(cells) for cells in [HEADER, ["---"] * len(HEADER), *rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One Markdown table of finished runs next to the paper's SMoPE numbers.")
    parser.add_argument("runs_dir", nargs="?", default=Path("runs"), type=Path, help="folder of run folders (default: runs)")
    print(table(parser.parse_args(argv).runs_dir))


if __name__ == "__main__":
    main()
