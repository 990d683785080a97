"""Learning-rate schedules, as multipliers of each parameter group's base rate per iteration.

Two rules cover the paper's runs (docs/method.md#optimiser-and-schedule):

- ``cosine``: hold the first ``hold`` iterations at ``floor``, then a cosine from the base rate
  down to ``floor`` over the remaining ``total - hold`` iterations, and ``floor`` after that.
  The authors fix ``total`` as an assumed number of iterations per epoch times the epochs, not
  the loader's real length, so a run can end its cosine early and finish at ``floor``.
- ``epoch_cosine`` (their CUB-200 runs): constant within an epoch, ``cos(99 pi e / (200 (E - 1)))``
  of the base rate at epoch ``e`` of ``E``, which ends at 1.6% of the base.

A third, ``step``, is SLCA's (torch's ``MultiStepLR`` with gamma 0.1, stepped once per epoch): the
base rate, multiplied by 0.1 from each milestone epoch on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence


def cosine_multipliers(floor: float, base_lrs: list[float], total: int, hold: int = 0) -> list[Callable[[int], float]]:
    """Per-group multipliers: ``hold`` iterations at ``floor``, then cosine from the base to ``floor``."""
    span = max(1, total - hold)

    def multiplier(base: float) -> Callable[[int], float]:
        low = min(floor / base, 1.0) if base > 0 else 1.0  # a zero rate stays zero (a frozen group)

        def at(step: int) -> float:
            if step < hold:
                return low
            progress = min(step - hold, span) / span
            return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))

        return at

    return [multiplier(lr) for lr in base_lrs]


def epoch_cosine_multiplier(epochs: int, iters_per_epoch: int) -> Callable[[int], float]:
    """The per-epoch rule ``cos(99 pi e / (200 (E - 1)))``, looked up from the iteration index."""

    def at(step: int) -> float:
        epoch = min(step // max(1, iters_per_epoch), epochs - 1)
        return math.cos(99 * math.pi * epoch / (200 * (epochs - 1))) if epochs > 1 else 1.0

    return at


def step_multiplier(milestones: Sequence[int], iters_per_epoch: int) -> Callable[[int], float]:
    """0.1 to the number of milestones at or before the iteration's (0-based) epoch."""

    def at(step: int) -> float:
        epoch = step // max(1, iters_per_epoch)
        return 0.1 ** sum(epoch >= milestone for milestone in milestones)

    return at


def lr_multipliers(
    rule: str,
    base_lrs: list[float],
    epochs: int,
    loader_length: int,
    floor: float,
    iters_per_epoch: int | None = None,
    hold: int = 0,
    milestones: Sequence[int] = (),
) -> list[Callable[[int], float]]:
    """The multipliers of ``rule`` for a phase of ``epochs`` over a loader of ``loader_length`` batches.

    ``iters_per_epoch`` is the epoch length the cosine assumes (None: the loader's length).
    """
    if rule == "epoch_cosine":
        return [epoch_cosine_multiplier(epochs, loader_length)] * len(base_lrs)
    if rule == "step":
        return [step_multiplier(milestones, loader_length)] * len(base_lrs)
    total = epochs * (loader_length if iters_per_epoch is None else iters_per_epoch)
    return cosine_multipliers(floor, base_lrs, total, hold)
