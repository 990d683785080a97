"""The SMoPE learner: one shared sparse prompt for all tasks (docs/method.md#protocol)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .. import distributed
from ..backbones import create_backbone
from ..config import SMoPEConfig
from ..errors import InvalidSettingError, SmopeError
from ..model import (
    PEFT_KEY_PREFIX,
    accumulate_usage,
    attach,
    auxiliary_loss,
    begin_task,
    expert_usage,
    prompt_parameters,
    prompted_layers,
    set_mode,
)
from ..runconfig import RunConfig, TrainConfig
from ..trainer import Trainer
from ..vit import trainable_outside
from .alignment import class_statistics
from .base import Learner, TaskContext, training_loss
from .heads import prompt_head
from .ridge import RidgeHead


@contextmanager
def after_task_noise(model: nn.Module, noise: float | None) -> Iterator[None]:
    """Within the block every prompted layer routes with evaluation noise ``noise`` (None: its own, ``method.eval_noise``)."""
    layers = prompted_layers(model)
    own = [layer.eval_noise for layer in layers]
    if noise is not None:
        for layer in layers:
            layer.eval_noise = noise
    try:
        yield
    finally:
        for layer, value in zip(layers, own):
            layer.eval_noise = value


def smope_config(config: RunConfig) -> SMoPEConfig:
    """The adapter config of a run's ``method`` section (its prompt-expert fields; a dense prompt's leave the rest at their defaults)."""
    return SMoPEConfig(**config.method.prompt_expert_settings())


def prompted_backbone(config: RunConfig, num_classes: int, device: torch.device) -> nn.Module:
    """The frozen backbone with a ``num_classes`` head and SMoPE's prompt experts (the ``method.*`` prompt settings), on ``device``."""
    backbone = create_backbone(config.model, num_classes)
    try:
        return attach(backbone, smope_config(config)).to(device)
    except InvalidSettingError as exc:  # block indices beyond this backbone
        raise SmopeError(f"invalid method.layers: {exc}") from exc


def prompt_param_groups(model: nn.Module, train: TrainConfig) -> list[dict]:
    """The prompt experts at ``train.prompt_lr_scale`` x ``train.lr``, the rest that trains (the head) at ``train.lr``."""
    prompts = list(prompt_parameters(model))
    return [
        {"params": prompts, "lr": train.lr * train.prompt_lr_scale, "lr_key": "train.lr"},
        {"params": trainable_outside(model, prompts), "lr": train.lr, "lr_key": "train.lr"},
    ]


UNUSED_STATISTICS = "class_stats."
"""``ranpac`` and ``aper`` checkpoints may also hold empty class statistics under this prefix (those of a prompt
learner that their adaptation never fills); :func:`without_unused_statistics` drops them, so such run folders load."""


def without_unused_statistics(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(UNUSED_STATISTICS)}


class FirstTaskPrompt:
    """SMoPE's prompt in dense mode (every expert on, no routing losses), trained with a linear head on the first task only.

    The parameter-efficient adaptation that ``ranpac`` and ``aper`` share: after the first task the
    prompted model is frozen and they predict with heads of their own. Its checkpoint entries are
    the prompt's and the head's (:meth:`state_dict`).
    """

    def __init__(self, config: RunConfig, num_classes: int, trainer: Trainer) -> None:
        self.config, self.trainer = config, trainer
        self.model = prompted_backbone(config, num_classes, trainer.device)
        set_mode(self.model, "dense")

    def train_task(self, ctx: TaskContext) -> None:
        if ctx.task == 0:
            loss_fn = training_loss(self.model, ctx.classes, lambda: auxiliary_loss(self.model))
            groups = prompt_param_groups(self.model, self.config.train)
            self.trainer.fit(groups, ctx.train_data, self.config.train.epochs, loss_fn, ctx.seed, f"task {ctx.task + 1}")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.adapter_state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load the prompt's and the head's entries of ``state`` (the learner checks the whole of it)."""
        self.model.load_adapter_state_dict({k: v for k, v in state.items() if k.startswith(PEFT_KEY_PREFIX)})


class PromptLearner(Learner):
    """Shared machinery of learners built on prompt experts plus a head (:mod:`smope.learners.heads`, ``method.head``)."""

    def __init__(self, config: RunConfig, num_classes: int, trainer: Trainer | None = None) -> None:
        super().__init__(config, num_classes, trainer)
        self.model = prompted_backbone(config, num_classes, self.device)
        self.stats = class_statistics(config.method.align_covariance, num_classes, self.model.num_features, self.device)
        self.output_head = prompt_head(config, self.model, num_classes, self.trainer)

    def param_groups(self) -> list[dict]:
        return prompt_param_groups(self.model, self.config.train)

    def train_phase(self, ctx: TaskContext, epochs: int, description: str) -> None:
        loss_fn = training_loss(self.model, ctx.classes, lambda: auxiliary_loss(self.model))
        self.trainer.fit(self.param_groups(), ctx.train_data, epochs, loss_fn, ctx.seed, description)

    def usage_pass(self, ctx: TaskContext) -> None:
        """The task's usage pass: its training images add their top-K experts to the counts (then summed over processes).

        It runs before :meth:`after_task`, in its own sweep: evaluation-mode routing reads the
        usage counts, so statistics taken while the counts still grow would depend on the order
        of the batches. It routes with ``method.after_task_eval_noise`` (docs/method.md#after-task-passes).
        """
        with after_task_noise(self.model, self.after_task_eval_noise()):
            usage_before = expert_usage(self.model)
            self.count_usage(ctx)
            self.merge_usage(usage_before)

    def after_task(self, ctx: TaskContext) -> None:
        """Class statistics with the final usage counts, then the head's update (alignment or the ridge solve).

        The statistics sweep routes with ``method.after_task_eval_noise``, as the usage pass does.
        """
        with after_task_noise(self.model, self.after_task_eval_noise()):
            features, labels = self.features_and_labels(ctx.train_data, self.pooled_features)
        self.stats.update(features, labels)
        self.output_head.after_task(ctx, features, labels, self.stats)

    def after_task_eval_noise(self) -> float | None:
        """The evaluation noise of the after-task passes; None: the layers' own (a dense prompt has no such setting)."""
        return None

    def count_usage(self, ctx: TaskContext) -> None:
        """One eval-mode sweep over the task's training images that adds each batch's top-K experts to the counts.

        The counts grow batch by batch, so the order matters: by default the unshuffled images at
        ``train.eval_batch_size``; with ``train.drop_last`` the release's, the shuffled training
        batches without the last partial one.
        """

        def usage_only(images: torch.Tensor) -> torch.Tensor:
            self.model(images)
            accumulate_usage(self.model)
            return images.new_empty(len(images), 0)

        if not self.config.train.drop_last:
            self.features_and_labels(ctx.train_data, usage_only)
            return
        self.model.eval()
        with torch.no_grad(), self.trainer.autocast():
            for images, _ in self.trainer.loader(ctx.train_data, self.config.train.batch_size, shuffle=True, seed=ctx.seed):
                usage_only(images.to(self.device))

    def merge_usage(self, before: torch.Tensor) -> None:
        """Add up the usage counts that each process of a data-parallel run collected on its shard."""
        total = before + distributed.all_reduce_sum(expert_usage(self.model) - before)
        for layer, counts in zip(prompted_layers(self.model), total):
            layer.experts.counts.copy_(counts)

    @property
    def ridge(self) -> RidgeHead | None:
        """:attr:`Head.ridge <smope.learners.heads.Head.ridge>` of the head, read by the run's narrow-projection warning."""
        return self.output_head.ridge

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.output_head.logits(self, images)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.model.adapter_state_dict(), **self.stats.state_dict(), **self.output_head.state_dict()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.check_state(state)
        self.stats.load_state_dict(state)
        self.output_head.load_state_dict(state)
        self.model.load_adapter_state_dict({k: v for k, v in state.items() if k.startswith(PEFT_KEY_PREFIX)})


class SMoPELearner(PromptLearner):
    """Sparse prompt experts with adaptive noise, router and prototype losses."""

    def after_task_eval_noise(self) -> float | None:
        return self.config.method.after_task_eval_noise

    def train_task(self, ctx: TaskContext) -> None:
        if ctx.task > 0:
            begin_task(self.model)
        epochs = self.config.train.epochs
        warmup = self.config.method.warmup_epochs
        warmup = epochs // 2 if warmup is None else warmup
        if ctx.task == 0 and warmup > 0:
            set_mode(self.model, "dense")
            self.train_phase(ctx, warmup, f"task {ctx.task + 1} dense warm-up")
        set_mode(self.model, "sparse")
        self.train_phase(ctx, epochs, f"task {ctx.task + 1}")
