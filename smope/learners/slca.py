"""SLCA (Zhang et al., "Slow Learner with Classifier Alignment for Continual Learning on a Pre-trained
Model", ICCV 2023): sequential fine-tuning of the whole backbone, slowly, then classifier alignment.

Numbers from the authors' release (github.com/GengDavid/SLCA, models/slca.py and exps/slca/*.json):

- Training: SGD with momentum 0.9 and weight decay 5e-4, batch 128, head learning rate 0.01 and
  backbone learning rate 0.01 / 100 = 1e-4 (the "slow learner"); 20 epochs per task on CIFAR-100,
  50 on ImageNet-R and CUB-200 (``experiments/run_baselines.sh`` sets these). The two rates are
  ``method.slca_head_lr`` and ``method.slca_backbone_lr`` (0 freezes the backbone). The schedule
  is ``train.schedule``; the release's is ``step`` with ``train.milestones`` [18] of 20 epochs and
  [40] of 50 (``run_baselines.sh`` sets them).
- Statistics: after every task the mean and full covariance of each new class's features, from
  the backbone of that moment (later tasks move the backbone; the statistics stay as stored).
- Alignment (:func:`slca_align`), from the second task on: ``method.slca_align_epochs`` (5) epochs;
  each draws ``method.align_samples_per_class`` (256) features per seen class and makes one pass
  over them in batches of that size (as many batches as seen classes); SGD with momentum 0.9 and
  weight decay 5e-4 at the head's rate, cosine over epochs; every class mean scaled by
  ``0.9 + 0.1 (t + 1) / T`` for a class of task ``t`` of the ``T`` seen so far (older classes are
  drawn closer to the origin); logits divided by the mean over tasks of each task's logit norm and
  by ``method.slca_logit_norm`` (0.1; 0 turns this off). This is SLCA's own step, not the harness's
  :func:`~smope.learners.alignment.align_head`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backbones import create_backbone
from ..runconfig import RunConfig
from ..trainer import Trainer
from ..vit import trainable_outside, unfreeze_classifier
from .alignment import ClassStatistics, FullCovarianceStatistics, KeepsClassStatistics, epoch_cosine, sampled_batches
from .base import Learner, TaskContext, training_loss

MOMENTUM = 0.9  # SLCA's release
WEIGHT_DECAY = 5e-4  # SLCA's release
OLDEST_MEAN_SCALE = 0.9  # SLCA's release: class means of the oldest task scaled towards 0.9, the newest kept at 1


def sgd(param_groups: list[dict], weight_decay: float) -> torch.optim.Optimizer:
    """SLCA's optimiser: SGD with momentum (the harness's AdamW does not apply)."""
    return torch.optim.SGD(param_groups, lr=param_groups[0]["lr"], momentum=MOMENTUM, weight_decay=weight_decay)


def slca_align(
    head: torch.nn.Module,
    stats: ClassStatistics,
    tasks: tuple[range, ...],
    epochs: int,
    lr: float,
    samples_per_class: int,
    logit_norm: float,
    seed: int,
    trainer: Trainer,
) -> None:
    """SLCA's classifier alignment of ``head`` over the classes of ``tasks`` (every task so far, in order)."""
    if epochs < 1:
        return
    seen = range(tasks[0].start, tasks[-1].stop)
    scale = torch.ones(seen.stop, device=stats.device)
    for t, classes in enumerate(tasks):
        scale[classes.start : classes.stop] = OLDEST_MEAN_SCALE + (1 - OLDEST_MEAN_SCALE) * (t + 1) / len(tasks)
    generator = torch.Generator(stats.device).manual_seed(seed)
    per_epoch = len(seen)

    def scaled_mean(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return features + (scale[labels] - 1).unsqueeze(1) * stats.mean[labels]  # the same spread around a scaled mean

    batches = sampled_batches(stats, seen, samples_per_class, samples_per_class, per_epoch, generator, scaled_mean)

    def loss_fn(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = head(features)[:, : seen.stop].float()
        if logit_norm > 0:
            norms = torch.stack([logits[:, c.start : c.stop].norm(dim=-1) + 1e-7 for c in tasks], dim=-1).mean(-1, keepdim=True)
            logits = logits / norms / logit_norm
        return F.cross_entropy(logits, labels)

    groups = [{"params": [p for p in head.parameters() if p.requires_grad], "lr": lr, "lr_key": "method.slca_head_lr"}]
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    multipliers = [epoch_cosine(epochs, per_epoch)]  # as the release steps it
    trainer.optimize(groups, optimizer, multipliers, epochs, per_epoch, batches, loss_fn, f"align {len(seen)} classes")


class SLCALearner(KeepsClassStatistics, Learner):
    """Every backbone weight trains at a 100x smaller learning rate than the head; alignment fixes the head's bias."""

    def __init__(self, config: RunConfig, num_classes: int, trainer: Trainer | None = None) -> None:
        super().__init__(config, num_classes, trainer)
        self.model = create_backbone(config.model, num_classes).to(self.device)
        if config.method.slca_backbone_lr == 0:  # the ablation without the slow learner: only the head trains
            self.model.requires_grad_(False)
            unfreeze_classifier(self.model)
        self.stats = FullCovarianceStatistics(num_classes, self.model.num_features, self.device)

    @property
    def head(self) -> torch.nn.Module:
        return self.model.get_classifier()

    def train_task(self, ctx: TaskContext) -> None:
        loss_fn = training_loss(self.model, ctx.classes)
        backbone = trainable_outside(self.model, self.head.parameters())
        groups = [{"params": backbone, "lr": self.config.method.slca_backbone_lr, "lr_key": "method.slca_backbone_lr"}] if backbone else []
        groups.append({"params": list(self.head.parameters()), "lr": self.config.method.slca_head_lr, "lr_key": "method.slca_head_lr"})
        self.trainer.fit(groups, ctx.train_data, self.config.train.epochs, loss_fn, ctx.seed, f"task {ctx.task + 1}", weight_decay=WEIGHT_DECAY, optimizer=sgd)

    def after_task(self, ctx: TaskContext) -> None:
        self.stats.update(*self.features_and_labels(ctx.train_data, self.pooled_features))
        method = self.config.method
        if ctx.task > 0 and method.align:
            slca_align(
                self.head,
                self.stats,
                ctx.task_ranges,
                method.slca_align_epochs,
                method.slca_head_lr,
                method.align_samples_per_class,
                method.slca_logit_norm,
                ctx.seed,
                self.trainer,
            )
