"""Learning-rate schedules, as multipliers of each parameter group's base rate per iteration.

Two rules cover the paper's runs (docs/method.md#optimiser-and-schedule):

- ``cosine``: hold the first ``hold`` iterations at ``floor``, then a cosine from the base rate
  down to ``floor`` over the remaining ``total - hold`` iterations, and ``floor`` after that.
  The authors fix ``total`` as an assumed number of iterations per epoch times the epochs, not
  the loader's real length, so a run can end its cosine early and finish at ``floor``.
- ``epoch_cosine`` (their CUB-200 runs): constant within an epoch, ``cos(99 pi e / (200 (E - 1)))``
  of the base rate at epoch ``e`` of ``E``, which ends at 1.6% of the base.

``lag`` (``train.schedule_lag``) reproduces the authors' scheduler, which sets the rate once when it
is built and then restarts its step counter: update 0 runs at the optimiser's starting rate and
update k at the rule's step k - 1 (``epoch_cosine``: epoch e at the rule's epoch e - 1, so epochs 0
and 1 at the base rate and the last one at 9.7% of it rather than 1.6% over 20 epochs).

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


def lagged(multiplier: Callable[[int], float], start: float = 1.0, period: int = 1) -> Callable[[int], float]:
    """``multiplier`` one scheduler step late: ``start`` for the first ``period`` iterations, then the rule shifted by ``period``.

    ``period`` is the scheduler's step in iterations: 1 for a per-iteration rule, an epoch's
    length for a per-epoch one. ``start`` is the rate the optimiser was built with, as a multiple
    of the rule's base.
    """
    return lambda step: start if step < period else multiplier(step - period)


def lr_multipliers(
    rule: str,
    base_lrs: list[float],
    epochs: int,
    loader_length: int,
    floor: float,
    iters_per_epoch: int | None = None,
    hold: int = 0,
    milestones: Sequence[int] = (),
    lag: bool = False,
) -> list[Callable[[int], float]]:
    """The multipliers of ``rule`` for a phase of ``epochs`` over a loader of ``loader_length`` batches.

    ``iters_per_epoch`` is the epoch length the cosine assumes (None: the loader's length);
    ``lag``: the authors' scheduler, one step late (see the module's docstring).
    """
    if rule == "epoch_cosine":
        epoch_rule = epoch_cosine_multiplier(epochs, loader_length)
        return [lagged(epoch_rule, period=max(1, loader_length)) if lag else epoch_rule] * len(base_lrs)
    if rule == "step":
        return [step_multiplier(milestones, loader_length)] * len(base_lrs)
    total = epochs * (loader_length if iters_per_epoch is None else iters_per_epoch)
    multipliers = cosine_multipliers(floor, base_lrs, total, hold)
    return [lagged(m) for m in multipliers] if lag else multipliers
