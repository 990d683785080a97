"""APER (Zhou et al., "Revisiting class-incremental learning with pre-trained models: generalizability
and adaptivity are all you need", IJCV 2024; first published as ADAM).

The pre-trained model is adapted on the first task only, then frozen; every class is represented
by the mean of the concatenated [frozen ; adapted] features of its training images, and a test
image is assigned to the class mean closest in cosine similarity (SimpleCIL's classifier on the
merged feature). The adaptation is the one ``ranpac`` uses, SMoPE's prompt in dense mode trained
with a linear head (:class:`~smope.learners.smope_learner.FirstTaskPrompt`; APER's paper offers VPT, SSF, adapters and full fine-tuning; this is the
VPT-deep-like one). Inference runs both models, so it costs two backbone passes per image.
"""

from __future__ import annotations

import torch

from ..backbones import frozen_backbone
from ..runconfig import RunConfig
from ..trainer import Trainer
from ..vit import pooled_features
from .alignment import DiagonalStatistics
from .base import Learner, TaskContext
from .frozen_backbone import cosine_to_means
from .smope_learner import FirstTaskPrompt, without_unused_statistics

PROTOTYPES = "prototypes."  # checkpoint prefix of the merged-feature class means


class APERLearner(Learner):
    """Cosine prototypes on the concatenation of the frozen and the first-task-adapted model's features."""

    def __init__(self, config: RunConfig, num_classes: int, trainer: Trainer | None = None) -> None:
        super().__init__(config, num_classes, trainer)
        self.adapter = FirstTaskPrompt(config, num_classes, self.trainer)
        self.model = self.adapter.model
        self.frozen = frozen_backbone(config.model, self.device)
        self.stats = DiagonalStatistics(num_classes, self.frozen.num_features + self.model.num_features, self.device)

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """[frozen ; adapted] class-token features: the generalisable and the adapted view of the image."""
        return torch.cat([pooled_features(self.frozen, images), super().pooled_features(images)], dim=-1)

    def train_task(self, ctx: TaskContext) -> None:
        self.adapter.train_task(ctx)

    def after_task(self, ctx: TaskContext) -> None:
        self.stats.update(*self.features_and_labels(ctx.train_data, self.pooled_features))

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return cosine_to_means(self.eval_features(images), self.stats)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.adapter.state_dict(), **self.stats.state_dict(PROTOTYPES)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = without_unused_statistics(state)
        self.check_state(state)
        self.adapter.load_state_dict(state)
        self.stats.load_state_dict(state, PROTOTYPES)
