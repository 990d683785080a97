"""The metric formulas of SPEC section 7 on hand-made accuracy matrices."""

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
