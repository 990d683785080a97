"""Continual-learning metrics from the accuracy matrix (docs/method.md#metrics).

``matrix[t][j]`` is the accuracy (percent) on task j's test set after training task t, for
j <= t; rows are ragged lists, exactly as written to ``metrics.json``.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

Matrix = Sequence[Sequence[float]]


def final_average_accuracy(matrix: Matrix) -> float:
    """FAA: mean accuracy over all tasks after the last one."""
    return statistics.fmean(matrix[-1])


def cumulative_average_accuracy(matrix: Matrix) -> float:
    """CAA: the average-accuracy curve, averaged over tasks."""
    return statistics.fmean(statistics.fmean(row) for row in matrix)


def final_forgetting(matrix: Matrix) -> float:
    """FFM: mean over old tasks of (best accuracy before the last task - final accuracy)."""
    last = len(matrix) - 1
    if last == 0:
        return 0.0
    return statistics.fmean(max(matrix[t][j] for t in range(j, last)) - matrix[last][j] for j in range(last))


def backward_transfer(matrix: Matrix) -> float:
    """BWT: mean over old tasks of (final accuracy - accuracy right after learning the task)."""
    last = len(matrix) - 1
    if last == 0:
        return 0.0
    return statistics.fmean(matrix[last][j] - matrix[j][j] for j in range(last))


def pooled_accuracy(matrix: Matrix, test_sizes: Sequence[int]) -> float:
    """Accuracy over all seen test samples pooled: the final row weighted by test-set size."""
    row = matrix[-1]
    return sum(a * n for a, n in zip(row, test_sizes)) / sum(test_sizes[: len(row)])


def summarize(matrix: Matrix, test_sizes: Sequence[int]) -> dict:
    """All metrics of one run, in the field names of ``metrics.json``."""
    return {
        "accuracy_matrix": [list(map(float, row)) for row in matrix],
        "average_accuracy": [statistics.fmean(row) for row in matrix],
        "final_average_accuracy": final_average_accuracy(matrix),
        "cumulative_average_accuracy": cumulative_average_accuracy(matrix),
        "final_forgetting": final_forgetting(matrix),
        "bwt": backward_transfer(matrix),
        "pooled_accuracy": pooled_accuracy(matrix, test_sizes),
    }


SCALARS = ("final_average_accuracy", "cumulative_average_accuracy", "final_forgetting", "bwt", "pooled_accuracy")


def aggregate(per_seed: Sequence[dict]) -> dict:
    """Mean (and population std) of every metric over seeds; the matrix is averaged entry-wise."""
    result: dict = {}
    matrices = [run["accuracy_matrix"] for run in per_seed]
    result["accuracy_matrix"] = [
        [statistics.fmean(m[t][j] for m in matrices) for j in range(len(matrices[0][t]))] for t in range(len(matrices[0]))
    ]
    result["average_accuracy"] = [statistics.fmean(row) for row in result["accuracy_matrix"]]
    for key in SCALARS:
        values = [run[key] for run in per_seed]
        result[key] = statistics.fmean(values)
        result[f"{key}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
    return result


def format_mean_std(metrics: dict, key: str, unit: str = "", sign: str = "±", with_std: bool = True) -> str:
    """``metrics[key]`` with two decimals and ``unit``, then ``sign`` and its spread over seeds ``metrics[key + "_std"]``
    (unless not ``with_std``): ``73.20 ± 1.05`` in reports, ``73.20% +- 1.05`` in the run's printed summary."""
    mean = f"{metrics[key]:.2f}{unit}"
    return f"{mean} {sign} {metrics[key + '_std']:.2f}" if with_std else mean
