"""What a learner classifies with once its features are trained (``method.head``), chosen once by :func:`prompt_head`.

:class:`AlignedLinearHead` is the model's own linear classifier: it trains by gradient with the
rest of the model, and after every task from the second it is realigned on features sampled from
the class statistics (:mod:`smope.learners.alignment`). :class:`RidgeOutputHead` replaces it with
RanPAC's ridge head on the pooled features (:mod:`smope.learners.ridge`): solved in closed form
after every task, so it needs no alignment and the trained linear head is not used to predict.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from ..runconfig import RunConfig
from ..trainer import Trainer
from .alignment import ClassStatistics, align_after_task
from .base import Learner, TaskContext
from .ridge import RidgeHead


class Head(ABC):
    """The head's part of a learner's task steps: what it does after a task, how it predicts, what checkpoints hold."""

    ridge: RidgeHead | None = None
    """The ridge head it predicts with, if any: the run warns when its projection is narrower than the features."""

    @abstractmethod
    def after_task(self, ctx: TaskContext, features: torch.Tensor, labels: torch.Tensor, stats: ClassStatistics) -> None:
        """Update from the task's training ``features`` and ``labels``, after ``stats`` took them in."""

    @abstractmethod
    def logits(self, learner: Learner, images: torch.Tensor) -> torch.Tensor:
        """``learner``'s logits of ``images`` through this head."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Checkpoint entries beyond the model's trainable weights."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Read the entries of :meth:`state_dict` from one task's checkpoint, on top of the earlier tasks'."""


class AlignedLinearHead(Head):
    """The model's linear classifier, trained with the model; ``method.align*`` realigns it after each task from the second."""

    def __init__(self, classifier: nn.Module, config: RunConfig, trainer: Trainer) -> None:
        self.classifier, self.config, self.trainer = classifier, config, trainer

    def after_task(self, ctx: TaskContext, features: torch.Tensor, labels: torch.Tensor, stats: ClassStatistics) -> None:
        method = self.config.method
        if ctx.task > 0 and method.align:
            align_after_task(self.classifier, stats, ctx, method, self.config.train.batch_size, self.trainer)

    def logits(self, learner: Learner, images: torch.Tensor) -> torch.Tensor:
        return Learner.logits(learner, images)  # the model's forward, which ends in the classifier


class RidgeOutputHead(Head):
    """RanPAC's ridge head on the pooled features, re-solved after every task; the checkpoints hold its state."""

    def __init__(self, ridge: RidgeHead) -> None:
        self.ridge = ridge

    def after_task(self, ctx: TaskContext, features: torch.Tensor, labels: torch.Tensor, stats: ClassStatistics) -> None:
        self.ridge.update(features, labels, ctx.seed)

    def logits(self, learner: Learner, images: torch.Tensor) -> torch.Tensor:
        return self.ridge.logits(learner.eval_features(images))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.ridge.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ridge.load_state_dict(state)


def prompt_head(config: RunConfig, model: nn.Module, num_classes: int, trainer: Trainer) -> Head:
    """The head ``method.head`` names for ``model``: ``linear`` (:class:`AlignedLinearHead`) or ``ridge`` (:class:`RidgeOutputHead`).

    The ridge head draws its random projection from torch's global generator here.
    """
    if config.method.head == "ridge":
        return RidgeOutputHead(RidgeHead(model.num_features, num_classes, config.method.rp_dim))
    return AlignedLinearHead(model.get_classifier(), config, trainer)
