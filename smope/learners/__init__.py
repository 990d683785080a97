"""Continual learners, selected by ``method.name`` through the registry in :mod:`smope.methods`.

Each learner's module is imported when that learner is first asked for (:meth:`MethodSpec.load`),
so importing this package imports only the base classes.
"""

from __future__ import annotations

from ..methods import BY_NAME, spec_for
from ..runconfig import RunConfig
from ..trainer import Trainer
from .base import Learner, TaskContext


def create_learner(config: RunConfig, num_classes: int, trainer: Trainer | None = None) -> Learner:
    """The learner of ``config.method.name``; ``trainer`` is the run's (a learner built alone makes its own)."""
    return spec_for(config.method.name).load()(config, num_classes, trainer)


def __getattr__(name: str):
    """``LEARNERS`` (name, aliases included -> learner class) and ``SMoPELearner``, loaded on first use."""
    if name == "LEARNERS":
        return {method: spec.load() for method, spec in BY_NAME.items()}
    if name == "SMoPELearner":
        return spec_for("smope").load()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LEARNERS", "Learner", "SMoPELearner", "TaskContext", "create_learner"]
