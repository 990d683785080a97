"""RanPAC (McDonnell et al., NeurIPS 2023): first-task adaptation, then a random-projection ridge head.

Phase 1 adapts the backbone parameter-efficiently on the first task only and freezes it. RanPAC's
paper offers AdaptFormer adapters, SSF and VPT; here the adaptation is SMoPE's prompt in dense
mode (all experts on, prefix-style on ``method.layers``), trained with a linear head as
``dense-prompt`` trains it (:class:`~smope.learners.smope_learner.FirstTaskPrompt`). That is the VPT-deep-like option, and it reuses this package's prompt,
so ``ranpac`` and ``smope`` with ``method.head=ridge`` differ only in when and how the prompt is
trained (first task, dense) versus every task, sparse. Its optimizer is the harness's (AdamW with
``train.lr`` and ``train.prompt_lr_scale``), not RanPAC's SGD at 0.01.

Phase 2, after every task: the frozen model's features of the task's training images feed
:class:`~smope.learners.ridge.RidgeHead`; the linear head of phase 1 is not used for prediction.
``method.first_task_adapt: false`` skips phase 1 and uses the frozen backbone (RanPAC's "no Phase 1").
"""

from __future__ import annotations

import torch

from ..backbones import frozen_backbone
from ..runconfig import RunConfig
from ..trainer import Trainer
from .base import Learner, TaskContext
from .ridge import RidgeHead
from .smope_learner import FirstTaskPrompt, without_unused_statistics


class RanPACLearner(Learner):
    """Frozen (or first-task-adapted) features, random projection, ridge head from accumulated statistics."""

    def __init__(self, config: RunConfig, num_classes: int, trainer: Trainer | None = None) -> None:
        super().__init__(config, num_classes, trainer)
        self.adapter = FirstTaskPrompt(config, num_classes, self.trainer) if config.method.first_task_adapt else None
        self.model = frozen_backbone(config.model, self.device) if self.adapter is None else self.adapter.model
        self.ridge = RidgeHead(self.model.num_features, num_classes, config.method.rp_dim)

    def train_task(self, ctx: TaskContext) -> None:
        if self.adapter is not None:
            self.adapter.train_task(ctx)

    def after_task(self, ctx: TaskContext) -> None:
        self.ridge.update(*self.features_and_labels(ctx.train_data, self.pooled_features), ctx.seed)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.ridge.logits(self.eval_features(images))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**({} if self.adapter is None else self.adapter.state_dict()), **self.ridge.state_dict()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = without_unused_statistics(state)
        self.check_state(state)
        self.ridge.load_state_dict(state)
        if self.adapter is not None:
            self.adapter.load_state_dict(state)
