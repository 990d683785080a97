"""Continual learners, selected by ``method.name`` through the registry in :mod:`smope.methods`."""

from __future__ import annotations

from ..methods import BY_NAME, spec_for
from ..runconfig import RunConfig
from .base import Learner, TaskContext
from .smope_learner import SMoPELearner

# name (aliases included) -> learner class; importing this package imports every learner.
LEARNERS: dict[str, type[Learner]] = {name: spec.load() for name, spec in BY_NAME.items()}


def create_learner(config: RunConfig, num_classes: int) -> Learner:
    return spec_for(config.method.name).load()(config, num_classes)


__all__ = ["LEARNERS", "Learner", "SMoPELearner", "TaskContext", "create_learner"]
