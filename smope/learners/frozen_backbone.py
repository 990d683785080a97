"""Floors on the frozen backbone: a nearest-class-mean classifier, sequential head tuning, and head
tuning with classifier alignment (SMoPE with the prompts taken away).

All three only need the frozen model's pooled features (the normalised class token), which do not
change during a task, so each training image goes through the backbone once per task.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ..backbones import frozen_backbone
from ..runconfig import RunConfig
from ..trainer import Trainer
from ..vit import unfreeze_classifier
from .alignment import ClassStatistics, DiagonalStatistics, KeepsClassStatistics, class_statistics
from .base import Learner, TaskContext, cross_entropy_on
from .heads import AlignedLinearHead


def cosine_to_means(features: torch.Tensor, stats: ClassStatistics) -> torch.Tensor:
    """Cosine similarity to every class mean; classes without a mean yet score -inf."""
    scores = F.normalize(features, dim=-1) @ F.normalize(stats.mean.to(features.device), dim=-1).T
    return scores.masked_fill(stats.count.to(features.device) == 0, float("-inf"))


class PrototypeLearner(Learner):
    """Nearest class mean with *cosine* similarity on frozen features; nothing is trained.

    This is SimpleCIL (Zhou et al., "Revisiting class-incremental learning with pre-trained
    models", 2023), registered under both names. The class means are the whole state. Old
    classes cannot be forgotten (their means never change), so this is the floor any prompt
    method must beat.
    """

    def __init__(self, config: RunConfig, num_classes: int, trainer: Trainer | None = None) -> None:
        super().__init__(config, num_classes, trainer)
        self.model = frozen_backbone(config.model, self.device)
        self.stats = DiagonalStatistics(num_classes, self.model.num_features, self.device)

    def train_task(self, ctx: TaskContext) -> None:
        self.stats.update(*self.features_and_labels(ctx.train_data, self.model))

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return cosine_to_means(super().logits(images), self.stats)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.stats.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.check_state(state)
        self.stats.load_state_dict(state)


class HeadOnlyLearner(Learner):
    """Sequential fine-tuning of the linear head alone: the forgetting floor.

    Each task trains the head with cross-entropy on its own classes (earlier ones masked, as for
    every learner) on features computed once per task; nothing protects old classes.
    """

    def __init__(self, config: RunConfig, num_classes: int, trainer: Trainer | None = None) -> None:
        super().__init__(config, num_classes, trainer)
        self.model = unfreeze_classifier(frozen_backbone(config.model, self.device, num_classes))

    def train_task(self, ctx: TaskContext) -> None:
        self.train_head(ctx, *self.features_and_labels(ctx.train_data, self.pooled_features))

    def train_head(self, ctx: TaskContext, features: torch.Tensor, labels: torch.Tensor) -> None:
        head, criterion = self.model.get_classifier(), cross_entropy_on(ctx.classes)
        head.train()
        groups = [{"params": list(head.parameters()), "lr": self.config.train.lr, "lr_key": "train.lr"}]
        data, epochs = TensorDataset(features, labels), self.config.train.epochs
        self.trainer.fit(groups, data, epochs, lambda x, y: criterion(head(x), y), ctx.seed, f"task {ctx.task + 1}")


class AlignedHeadLearner(KeepsClassStatistics, HeadOnlyLearner):
    """``head-only`` plus SMoPE's classifier alignment (``method.align*``): SMoPE without its prompts.

    The ablation that says how much of a prompt method's accuracy the alignment alone gives: the
    same head training, the same class statistics and the same alignment step, on the frozen
    backbone. Its statistics never go stale (the features never change), which is the point of
    comparison with methods whose prompts or weights move the features of earlier classes.
    """

    def __init__(self, config: RunConfig, num_classes: int, trainer: Trainer | None = None) -> None:
        super().__init__(config, num_classes, trainer)
        self.stats = class_statistics(config.method.align_covariance, num_classes, self.model.num_features, self.device)
        self.output_head = AlignedLinearHead(self.model.get_classifier(), config, self.trainer)

    def train_task(self, ctx: TaskContext) -> None:
        features, labels = self.features_and_labels(ctx.train_data, self.pooled_features)
        self.train_head(ctx, features, labels)
        self.stats.update(features, labels)
        self.output_head.after_task(ctx, features, labels, self.stats)
