"""The metric formulas of docs/method.md#metrics on hand-made accuracy matrices."""

import math

import pytest

from smope import metrics

MATRIX = [
    [90.0],
    [80.0, 70.0],
    [60.0, 65.0, 50.0],
]


def test_final_average_accuracy():
    assert metrics.final_average_accuracy(MATRIX) == pytest.approx((60 + 65 + 50) / 3)


def test_cumulative_average_accuracy():
    assert metrics.cumulative_average_accuracy(MATRIX) == pytest.approx((90 + 75 + 175 / 3) / 3)


def test_final_forgetting_uses_best_earlier_accuracy():
    # task 0: best 90 -> 60 = 30; task 1: best 70 -> 65 = 5
    assert metrics.final_forgetting(MATRIX) == pytest.approx(17.5)
    assert metrics.final_forgetting([[42.0]]) == 0.0


def test_backward_transfer():
    assert metrics.backward_transfer(MATRIX) == pytest.approx(((60 - 90) + (65 - 70)) / 2)


def test_pooled_accuracy_weights_by_test_size():
    assert metrics.pooled_accuracy(MATRIX, [100, 300, 100]) == pytest.approx((60 * 100 + 65 * 300 + 50 * 100) / 500)


def test_aggregate_mean_and_std_over_seeds():
    runs = [metrics.summarize(MATRIX, [1, 1, 1]), metrics.summarize([[100.0], [90.0, 80.0], [70.0, 75.0, 60.0]], [1, 1, 1])]
    result = metrics.aggregate(runs)
    assert result["final_average_accuracy"] == pytest.approx((175 / 3 + 205 / 3) / 2)
    assert result["final_average_accuracy_std"] == pytest.approx(5.0)
    assert result["accuracy_matrix"][1] == [85.0, 75.0]
    assert math.isclose(result["final_forgetting_std"], 0.0, abs_tol=1e-12)


# Best accuracy before the last task (not right after learning it), last row excluded from the best:
# task 0 peaks at t=1, and task 2's final accuracy is above its only earlier one.
TELLING = [
    [50.0],
    [70.0, 60.0],
    [65.0, 80.0, 40.0],
    [30.0, 50.0, 45.0, 70.0],
]


def test_final_forgetting_tells_the_formula_from_near_misses():
    # task 0: max(50, 70, 65) - 30 = 40; task 1: max(60, 80) - 50 = 30; task 2: 40 - 45 = -5
    assert metrics.final_forgetting(TELLING) == pytest.approx((40 + 30 - 5) / 3)
    # the near misses give other numbers: A[j][j] (25/3), the last row among the best (70/3),
    # the last task among the old ones (65/4)
    for wrong in (25 / 3, 70 / 3, 65 / 4):
        assert metrics.final_forgetting(TELLING) != pytest.approx(wrong)


def test_backward_transfer_uses_accuracy_right_after_learning():
    assert metrics.backward_transfer(TELLING) == pytest.approx(((30 - 50) + (50 - 60) + (45 - 40)) / 3)
