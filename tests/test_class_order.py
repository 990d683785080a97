"""The class order of a seed is pinned: a library update must not silently reshuffle every split.

The rule is Python's ``random.seed(seed); random.shuffle(order)`` over ``list(range(num_classes))``
(stable across Python versions); the lists below were computed once with it and pasted.
"""

from smope.data.scenario import class_order

SEED_0_10 = [7, 8, 1, 5, 3, 4, 2, 0, 9, 6]
SEED_1_10 = [6, 8, 9, 7, 5, 3, 0, 4, 1, 2]
SEED_0_100 = [
    23, 8, 11, 7, 48, 13, 1, 91, 94, 54, 16, 63, 52, 41, 80, 2, 47, 87, 78, 66, 19, 6, 24, 10, 59,
    30, 22, 29, 83, 37, 93, 81, 43, 99, 86, 28, 34, 88, 44, 14, 84, 70, 4, 20, 15, 21, 31, 76, 57, 67,
    73, 50, 69, 25, 98, 46, 96, 0, 72, 35, 58, 92, 3, 95, 56, 90, 26, 40, 55, 89, 75, 71, 60, 42, 9,
    82, 39, 18, 77, 68, 32, 79, 12, 85, 36, 17, 64, 27, 74, 45, 61, 38, 51, 62, 65, 33, 5, 53, 97, 49,
]  # fmt: skip


def test_class_order_pinned():
    assert class_order(10, 0) == SEED_0_10
    assert class_order(10, 1) == SEED_1_10
    assert class_order(100, 0) == SEED_0_100
