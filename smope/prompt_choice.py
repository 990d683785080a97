"""Prompt-choice analytics: which task's prompt each test image chose (hide-prompt, norga), and which pool prompt (vq-prompt).

Those methods first predict a task for every test image and then run that task's prompt, so
their accuracy is bounded by how often the prediction is right. A :class:`PromptChoiceTracker`
counts, at every evaluation, the test images of each task that chose each task's prompt; the
diagonal share is the task-identity accuracy. The counts go into the task checkpoints, so a
resumed run reports the same numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import distributed


class PromptChoiceTracker:
    """Per evaluation, a (tasks so far x tasks so far) count matrix: test task j's images that chose task k's prompt.

    Inert for a model whose prompt pool records no per-image choice (``pool.last_choice``).
    """

    def __init__(self, model: nn.Module) -> None:
        pool = getattr(model, "pool", None)
        self.pool = pool if hasattr(pool, "last_choice") else None
        self.records: list[list[list[int]]] = []
        self._counts: torch.Tensor | None = None

    @property
    def enabled(self) -> bool:
        return self.pool is not None

    def restore(self, records: list | None, tasks_done: int) -> None:
        """Records saved with the last finished task; a run written without them stops tracking."""
        if records is not None and len(records) == tasks_done:
            self.records = [list(map(list, r)) for r in records]
        elif self.enabled:
            self.pool = None  # earlier evaluations are unknown: report none rather than a partial record

    def begin_evaluation(self, task: int) -> None:
        if self.enabled:
            self._counts = torch.zeros(task + 1, task + 1, dtype=torch.int64)

    def observe_test(self, test_tasks: torch.Tensor) -> None:
        """After each test forward on images of ``test_tasks`` (one task per image): count the prompt each image chose."""
        if self._counts is not None:
            tasks = len(self._counts)
            choice, test_tasks = self.pool.last_choice.cpu(), test_tasks.cpu()
            known = choice < tasks  # a prompt of a task not yet seen is not counted
            pairs = test_tasks[known] * tasks + choice[known]
            self._counts += torch.bincount(pairs, minlength=tasks * tasks)[: tasks * tasks].view(tasks, tasks)

    def end_evaluation(self) -> None:
        if self._counts is not None:
            self.records.append(distributed.all_reduce_sum(self._counts).tolist())
            self._counts = None

    def checkpoint_meta(self) -> dict:
        return {"records": self.records}


def task_identity_accuracy(counts: list[list[int]]) -> list[float]:
    """Per test task, the percentage of its images that chose its own task's prompt."""
    matrix = np.asarray(counts, dtype=np.float64)
    return (100 * np.diag(matrix) / np.maximum(matrix.sum(1), 1)).tolist()


def prompt_choice_metrics(seed_records: list[tuple[int, list | None]]) -> dict | None:
    """metrics.json's ``prompt_choice``: the final evaluation's counts and task-identity accuracy per seed and their mean.

    ``seed_records`` pairs each seed with its tracker's records (None where the method chooses no prompt).
    """
    done = [(seed, records) for seed, records in seed_records if records]
    if not done:
        return None
    per_seed = [
        {"seed": seed, "choice_counts": records[-1], "task_identity_accuracy": task_identity_accuracy(records[-1]),
         "task_identity_accuracy_after_task": [float(np.mean(task_identity_accuracy(r))) for r in records]}
        for seed, records in done
    ]  # fmt: skip
    accuracy = np.mean([run["task_identity_accuracy"] for run in per_seed], axis=0)
    return {"task_identity_accuracy": accuracy.round(4).tolist(), "task_identity_accuracy_mean": round(float(accuracy.mean()), 4), "per_seed": per_seed}


def prompt_choice_markdown(choice: dict) -> list[str]:
    """The report's section: task-identity accuracy per test task, and seed 0's choice shares."""
    seed = choice["per_seed"][0]
    counts = np.asarray(seed["choice_counts"], dtype=np.float64)
    shares = 100 * counts / np.maximum(counts.sum(1, keepdims=True), 1)
    tasks = range(1, len(counts) + 1)
    lines = [
        "## Prompt choice",
        "",
        "| test task | task-identity accuracy (%, mean over seeds) |",
        "|---|---|",
        *(f"| {t} | {a:.2f} |" for t, a in zip(tasks, choice["task_identity_accuracy"])),
        f"| mean | {choice['task_identity_accuracy_mean']:.2f} |",
        "",
        f"Share of each test task's images (rows) that chose each task's prompt (columns), %, seed {seed['seed']}, after the last task:",
        "",
        *per_task_table([f"prompt {t}" for t in tasks], [[f"{v:.1f}" for v in row] for row in shares]),
    ]
    return lines


def per_task_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table with one row per test task (numbered from 1) under ``columns``, and a blank line."""
    return [
        "| test task | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
        *(f"| {t} | " + " | ".join(row) + " |" for t, row in enumerate(rows, 1)),
        "",
    ]


@torch.no_grad()
def pool_prompt_choices(run_dir: Path, seed: int) -> dict:
    """``{"blocks": prompted blocks, "counts": counts[task][i][prompt]}``: test images of ``task`` that chose pool ``prompt`` in block ``blocks[i]``.

    For methods that snap each input to one pool prompt per block (vq-prompt): one prompt for
    every image means the pool acts as a single learned prompt. Counted with the seed's last
    checkpoint over each task's test images, in evaluation mode.
    """
    from .errors import SmopeError
    from .experiment import SeedRun  # the run loop imports this module
    from .rundir import RunDir

    config = RunDir(run_dir).config()
    run = SeedRun(config, seed, run_dir)
    chain = run.chain()
    if not chain.length:
        raise SmopeError(f"{run_dir} has no task checkpoints for seed {seed}: nothing to count")
    run.build(restore=chain.length - 1)
    pool = getattr(run.learner.model, "pool", None)
    if not hasattr(pool, "chosen"):
        raise SmopeError(f"{run_dir} is a {config.method.name} run: its learner does not snap to pool prompts (only vq-prompt does)")
    counts = []
    for task in range(chain.length):
        per_block = torch.zeros(len(pool.layers), pool.prompts.shape[1], dtype=torch.int64)
        for images, _ in run.loader(run.scenario.test_dataset(task)):
            run.learner.logits(images)
            per_block.scatter_add_(1, pool.chosen.cpu(), torch.ones_like(pool.chosen.cpu()))
        counts.append(per_block.tolist())
    return {"blocks": list(pool.layers), "counts": counts}


def pool_choice_lines(choices: dict) -> list[str]:
    """One line per test task: how many pool prompts its images chose in each block, and the counts."""
    return [
        f"test task {task + 1}: pool prompts chosen "
        + ", ".join(f"block {b}: {sum(1 for n in row if n)} of {len(row)}" for b, row in zip(choices["blocks"], rows))
        + f"; counts {rows}"
        for task, rows in enumerate(choices["counts"])
    ]


def pool_choice_markdown(choices: dict, seed: int) -> list[str]:
    """The report's section for vq-prompt runs: pool prompts each test task's images chose per block."""
    blocks = choices["blocks"]
    return [
        "## Pool prompt choice",
        "",
        f"Pool prompts chosen by each test task's images (of {len(choices['counts'][0][0])} per block), seed {seed}, last checkpoint:",
        "",
        *per_task_table([f"block {b}" for b in blocks], [[str(sum(1 for n in row if n)) for row in rows] for rows in choices["counts"]]),
    ]

