"""What every continual learner shares: the task context, the checkpoint state and the hooks.

A learner owns its network and implements :meth:`Learner.train_task`; its
:class:`~smope.trainer.Trainer` runs the optimisation and data passes, and the experiment
(:mod:`smope.experiment`) drives tasks, evaluation, metrics and checkpoints, so methods
differ only in what they train.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data import ClassIncrementalScenario
from ..errors import SmopeError
from ..runconfig import RunConfig
from ..trainer import Trainer
from ..vit import pooled_features, state_mismatch


@dataclass
class TaskContext:
    """Everything a learner is told about the task at hand (never the test data)."""

    task: int
    classes: range  # labels of this task
    seen: range  # labels of tasks 0..task
    train_data: Dataset
    seed: int
    # The classes of every task so far, this one last (SLCA's alignment treats each task's logits apart).
    task_ranges: tuple[range, ...] = ()


def masked_logits(logits: torch.Tensor, classes: range) -> torch.Tensor:
    """Logits of the classes seen so far, with earlier tasks' classes masked out (docs/method.md#protocol)."""
    logits = logits[:, : classes.stop]
    if classes.start == 0:
        return logits
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[:, : classes.start] = True
    return logits.masked_fill(mask, float("-inf"))


class Learner:
    """Base class of continual-learning methods.

    Subclasses build ``self.model`` in ``__init__`` and implement :meth:`train_task`; they may
    extend :meth:`after_task`, :meth:`logits` and the checkpoint state. Training loops, loaders
    and feature passes are the :attr:`trainer`'s.
    """

    def __init__(self, config: RunConfig, num_classes: int, trainer: Trainer | None = None) -> None:
        self.config = config
        self.num_classes = num_classes
        self.trainer = trainer or Trainer(config)
        self.model: nn.Module

    @property
    def device(self) -> torch.device:
        return self.trainer.device

    # Hooks -------------------------------------------------------------------------------
    def train_task(self, ctx: TaskContext) -> None:
        raise NotImplementedError

    def training_data(self, scenario: ClassIncrementalScenario, task: int) -> Dataset:
        """The images :meth:`train_task` gets as ``ctx.train_data``: the task's own, for a continual learner."""
        return scenario.train_dataset(task)

    def usage_pass(self, ctx: TaskContext) -> None:
        """The sweep after training that counts which prompt experts the task's images choose; nothing without experts.

        The run's routing analytics watch exactly this step (:class:`~smope.experiment.RoutingAnalytics`).
        """

    def after_task(self, ctx: TaskContext) -> None:
        """Work between tasks after the usage pass (statistics, alignment); nothing by default."""

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        with self.trainer.autocast():
            return self.model(self.trainer.inputs(images)).float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything the next task needs, nothing frozen: the trainable parameters and buffers."""
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return {n: t for n, t in self.model.state_dict().items() if n in trainable}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.check_state(state)
        self.model.load_state_dict(state, strict=False)

    def check_state(self, state: dict[str, torch.Tensor]) -> None:
        """Refuse a checkpoint whose entries are not the ones :meth:`state_dict` writes, naming them.

        A missing entry would otherwise keep its fresh value silently and the run would go on from
        a state it never had. Only names are compared: per-task entries (class statistics) change
        shape from task to task, and the loaders check shapes.
        """
        problems = state_mismatch(dict.fromkeys(self.state_dict(), ()), dict.fromkeys(state, ()), limit=3)
        if problems:
            raise SmopeError(
                f"checkpoint does not fit this {self.config.method.name} model ({problems}): it was written by another method, "
                "configuration or smope version. Restore the configuration (or version) it was trained with, "
                "or set output_dir to another folder for this one"
            )

    # Shared machinery ----------------------------------------------------------------------
    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """The feature this learner's head sees (class statistics, head training, probes)."""
        return pooled_features(self.model, images)

    @torch.no_grad()
    def eval_features(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`pooled_features` in eval mode, for classifiers kept outside the model (prototypes, ridge)."""
        self.model.eval()
        with self.trainer.autocast():
            return self.pooled_features(self.trainer.inputs(images)).float()

    def features_and_labels(self, data: Dataset, forward: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` over ``data`` with this learner's model in eval mode (:meth:`Trainer.features_and_labels`)."""
        return self.trainer.features_and_labels(self.model, data, forward)

    def compile(self) -> None:
        """``torch.compile`` the model's forward in place (``train.compile``: true or a mode); parameter names are kept."""
        mode = self.config.train.compile
        self.model.compile(mode=None if mode is True else mode)


def cross_entropy_on(classes: range) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy over the seen classes with earlier tasks masked, as a function of logits."""
    return lambda logits, labels: F.cross_entropy(masked_logits(logits.float(), classes), labels)


def training_loss(
    model: nn.Module, classes: range, extra: Callable[[], torch.Tensor | None] | None = None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A training step's loss: ``model`` in train mode, :func:`cross_entropy_on` ``classes``, plus ``extra()``
    (read after the forward, e.g. the router's or the pool's own loss) when it gives one."""
    criterion = cross_entropy_on(classes)

    def loss_fn(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        model.train()
        loss = criterion(model(images), labels)
        added = None if extra is None else extra()
        return loss if added is None else loss + added

    return loss_fn
