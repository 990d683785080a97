"""Continual learners, selected by ``method.name``."""

from __future__ import annotations

from ..errors import SmopeError
from ..runconfig import RunConfig
from .aper import APERLearner
from .base import Learner, TaskContext
from .frozen_backbone import HeadOnlyLearner, PrototypeLearner
from .lora import LoRALearner
from .prompt_pool import CodaPromptLearner, DualPromptLearner, L2PLearner
from .ranpac import RanPACLearner
from .slca import SLCALearner
from .smope_learner import SMoPELearner
from .smope_variants import DensePromptLearner, JointLearner

LEARNERS: dict[str, type[Learner]] = {
    cls.name: cls
    for cls in (
        SMoPELearner,
        DensePromptLearner,
        L2PLearner,
        DualPromptLearner,
        CodaPromptLearner,
        PrototypeLearner,
        HeadOnlyLearner,
        LoRALearner,
        JointLearner,
        RanPACLearner,
        APERLearner,
        SLCALearner,
    )
}
LEARNERS["simplecil"] = PrototypeLearner  # SimpleCIL's published name for the same method


def create_learner(config: RunConfig, num_classes: int) -> Learner:
    try:
        cls = LEARNERS[config.method.name]
    except KeyError:
        raise SmopeError(f"unknown method.name '{config.method.name}'; choose one of {', '.join(sorted(LEARNERS))}") from None
    return cls(config, num_classes)


__all__ = ["LEARNERS", "Learner", "SMoPELearner", "TaskContext", "create_learner"]
