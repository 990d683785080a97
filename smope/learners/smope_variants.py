"""Baselines built on SMoPE's own model: the dense "one prompt" and the joint-training ceiling."""

from __future__ import annotations

from dataclasses import replace

from torch.utils.data import Dataset

from ..data import ClassIncrementalScenario
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

    def training_data(self, scenario: ClassIncrementalScenario, task: int) -> Dataset:
        """Every class's training images: the ceiling's data, whatever the task."""
        return scenario.all_train_dataset()

    def joint_context(self, ctx: TaskContext) -> TaskContext:
        every = range(self.num_classes)
        return replace(ctx, classes=every, seen=every)

    def train_task(self, ctx: TaskContext) -> None:
        if ctx.task == 0:
            super().train_task(self.joint_context(ctx))

    def usage_pass(self, ctx: TaskContext) -> None:
        if ctx.task == 0:
            super().usage_pass(self.joint_context(ctx))

    def after_task(self, ctx: TaskContext) -> None:
        if ctx.task == 0:
            super().after_task(self.joint_context(ctx))
