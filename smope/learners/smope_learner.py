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
from ..runconfig import MethodConfig, RunConfig, TrainConfig
from ..trainer import Trainer
from ..vit import trainable_outside
from .alignment import ClassStatistics, align_after_task
from .base import Learner, TaskContext, training_loss
from .ridge import RidgeHead


@contextmanager
def after_task_noise(model: nn.Module, method: MethodConfig) -> Iterator[None]:
    """Within the block every prompted layer routes with ``method.after_task_eval_noise`` (null: ``method.eval_noise``)."""
    layers = prompted_layers(model)
    noise = method.eval_noise if method.after_task_eval_noise is None else method.after_task_eval_noise
    for layer in layers:
        layer.eval_noise = noise
    try:
        yield
    finally:
        for layer in layers:
            layer.eval_noise = method.eval_noise


def smope_config(config: RunConfig) -> SMoPEConfig:
    """The adapter config of a run's ``method`` section (both share :class:`~smope.settings.PromptExpertSettings`)."""
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
    """Shared machinery of learners built on prompt experts plus a linear head with alignment."""

    def __init__(self, config: RunConfig, num_classes: int, trainer: Trainer | None = None) -> None:
        super().__init__(config, num_classes, trainer)
        self.model = prompted_backbone(config, num_classes, self.device)
        self.stats = ClassStatistics(num_classes, self.model.num_features, config.method.align_covariance, self.device)
        self.ridge = RidgeHead(self.model.num_features, num_classes, config.method.rp_dim) if config.method.head == "ridge" else None

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
        with after_task_noise(self.model, self.config.method):
            usage_before = expert_usage(self.model)
            self.count_usage(ctx)
            self.merge_usage(usage_before)

    def after_task(self, ctx: TaskContext) -> None:
        """Class statistics with the final usage counts, then classifier alignment.

        The statistics sweep routes with ``method.after_task_eval_noise``, as the usage pass does.
        """
        with after_task_noise(self.model, self.config.method):
            features, labels = self.features_and_labels(ctx.train_data, self.pooled_features)
        self.stats.update(features, labels)
        if self.ridge is not None:  # method.head=ridge: the analytic head replaces the trained one and its alignment
            self.ridge.update(features, labels, ctx.seed)
            return
        method = self.config.method
        if ctx.task > 0 and method.align:
            align_after_task(self.head, self.stats, ctx, method, self.config.train.batch_size, self.trainer)

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
    def head(self) -> nn.Module:
        return self.model.get_classifier()

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return super().logits(images) if self.ridge is None else self.ridge.logits(self.eval_features(images))

    def state_dict(self) -> dict[str, torch.Tensor]:
        ridge = {} if self.ridge is None else self.ridge.state_dict()
        return {**self.model.adapter_state_dict(), **self.stats.state_dict(), **ridge}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.check_state(state)
        self.stats.load_state_dict(state)
        if self.ridge is not None:
            self.ridge.load_state_dict(state)
        self.model.load_adapter_state_dict({k: v for k, v in state.items() if k.startswith(PEFT_KEY_PREFIX)})


class SMoPELearner(PromptLearner):
    """Sparse prompt experts with adaptive noise, router and prototype losses."""

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
