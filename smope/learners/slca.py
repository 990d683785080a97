"""SLCA (Zhang et al., "Slow Learner with Classifier Alignment for Continual Learning on a Pre-trained
Model", ICCV 2023): sequential fine-tuning of the whole backbone, slowly, then classifier alignment.

Numbers from the authors' release (github.com/GengDavid/SLCA, models/slca.py and exps/slca/*.json):
SGD with momentum 0.9 and weight decay 5e-4, batch 128, head learning rate 0.01 and backbone
learning rate 0.01 / 100 = 1e-4 (the "slow learner"); 20 epochs per task on CIFAR-100, 50 on
ImageNet-R and CUB-200 (``experiments/run_baselines.sh`` sets these). The two rates are
``method.slca_head_lr`` and ``method.slca_backbone_lr``; the schedule is the harness's
(``train.schedule``) rather than the release's step decay. After every task the class-wise Gaussian statistics of the new classes
are stored (from the backbone of that moment, as SLCA does) and, from the second task on, the head
is re-trained on features sampled from them by the harness's :func:`~smope.learners.alignment.align_head`
with the ``method.align*`` settings (SLCA: full covariance, 5 epochs, 256 samples per class, SGD at
0.01 with logit normalisation; the harness's step is AdamW without logit normalisation).
"""

from __future__ import annotations

import torch

from ..backbones import create_backbone
from ..runconfig import RunConfig
from ..trainer import Trainer
from ..vit import unfreeze_classifier
from .alignment import ClassStatistics, align_after_task
from .base import Learner, TaskContext, cross_entropy_on

MOMENTUM = 0.9  # SLCA's release
WEIGHT_DECAY = 5e-4  # SLCA's release


def sgd(param_groups: list[dict], weight_decay: float) -> torch.optim.Optimizer:
    """SLCA's optimiser: SGD with momentum (the harness's AdamW does not apply)."""
    return torch.optim.SGD(param_groups, lr=param_groups[0]["lr"], momentum=MOMENTUM, weight_decay=weight_decay)


class SLCALearner(Learner):
    """Every backbone weight trains at a 100x smaller learning rate than the head; alignment fixes the head's bias."""

    name = "slca"

    def __init__(self, config: RunConfig, num_classes: int, trainer: Trainer | None = None) -> None:
        super().__init__(config, num_classes, trainer)
        self.model = create_backbone(config.model, num_classes).to(self.device)
        if config.method.slca_backbone_lr == 0:  # the ablation without the slow learner: only the head trains
            self.model.requires_grad_(False)
            unfreeze_classifier(self.model)
        self.stats = ClassStatistics(num_classes, self.model.num_features, config.method.align_covariance)

    @property
    def head(self) -> torch.nn.Module:
        return self.model.get_classifier()

    def train_task(self, ctx: TaskContext) -> None:
        criterion = cross_entropy_on(ctx.classes)

        def loss_fn(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            self.model.train()
            return criterion(self.model(images), labels)

        head_ids = {id(p) for p in self.head.parameters()}
        backbone = [p for p in self.model.parameters() if id(p) not in head_ids and p.requires_grad]
        groups = [{"params": backbone, "lr": self.config.method.slca_backbone_lr}] if backbone else []
        groups.append({"params": list(self.head.parameters()), "lr": self.config.method.slca_head_lr})
        self.trainer.fit(groups, ctx.train_data, self.config.train.epochs, loss_fn, ctx.seed, f"task {ctx.task + 1}", weight_decay=WEIGHT_DECAY, optimizer=sgd)

    def after_task(self, ctx: TaskContext) -> None:
        self.stats.update(*self.features_and_labels(ctx.train_data, self.pooled_features))
        method = self.config.method
        if ctx.task > 0 and method.align:
            align_after_task(self.head, self.stats, ctx, method, self.config.train.batch_size, self.trainer)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict(), **self.stats.state_dict()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.check_state(state)
        self.stats.load_state_dict(state)
        self.model.load_state_dict({k: v for k, v in state.items() if not k.startswith("class_stats.")}, strict=False)
