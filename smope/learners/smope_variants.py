"""Baselines built on SMoPE's own model: the dense "one prompt" and the joint-training ceiling."""

from __future__ import annotations

from dataclasses import replace

from ..errors import SmopeError
from ..model import set_mode
from ..runconfig import RunConfig
from ..trainer import Trainer
from .base import TaskContext
from .smope_learner import PromptLearner, SMoPELearner


class DensePromptLearner(PromptLearner):
    """One shared prompt for all tasks: SMoPE's experts, all of them active for the whole run.

    Dense mode has no routing, so there is no router or prototype loss and no adaptive noise;
    classifier alignment is kept, so the comparison with ``smope`` isolates the sparsity.
    """

    def __init__(self, config: RunConfig, num_classes: int, trainer: Trainer | None = None) -> None:
        super().__init__(config, num_classes, trainer)
        set_mode(self.model, "dense")

    def train_task(self, ctx: TaskContext) -> None:
        self.train_phase(ctx, self.config.train.epochs, f"task {ctx.task + 1}")


class JointLearner(SMoPELearner):
    """The ceiling: SMoPE trained once, at the first task, on every class's training data.

    Later tasks change nothing, so the model is the same after every task. The accuracy matrix
    is flat up to the evaluation protocol: after task t predictions are restricted to the classes
    seen so far, so earlier rows are easier and its "forgetting" only reflects that restriction.
    The last row is the joint-training accuracy over all classes.
    """

    def joint_context(self, ctx: TaskContext) -> TaskContext:
        if ctx.all_train_data is None:
            raise SmopeError("method.name=joint needs every task's training data, but the trainer did not pass all_train_data")
        every = range(self.num_classes)
        return replace(ctx, classes=every, seen=every, train_data=ctx.all_train_data)

    def train_task(self, ctx: TaskContext) -> None:
        if ctx.task == 0:
            super().train_task(self.joint_context(ctx))

    def after_task(self, ctx: TaskContext) -> None:
        if ctx.task == 0:
            super().after_task(self.joint_context(ctx))
