"""Classifier alignment from per-class Gaussian feature statistics (SPEC section 6).

After each task the learner stores the mean and per-dimension variance of every new class's
features; from the second task on it retrains only the head on features sampled from those
Gaussians for every class seen so far. This replaces a replay buffer: no image is kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import cosine_multipliers

VARIANCE_FLOOR = 1e-4


class ClassStatistics:
    """Per-class feature mean and variance, kept as tensors so checkpoints carry them."""

    def __init__(self, num_classes: int, dim: int) -> None:
        self.mean = torch.zeros(num_classes, dim)
        self.var = torch.zeros(num_classes, dim)
        self.count = torch.zeros(num_classes, dtype=torch.int64)

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        for label in labels.unique().tolist():
            rows = features[labels == label]
            self.mean[label] = rows.mean(0)
            self.var[label] = rows.var(0, unbiased=False)
            self.count[label] = len(rows)

    def sample(self, classes: range, per_class: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_class`` features from N(mean, diag(var) + floor) for each class in ``classes``."""
        labels = torch.arange(classes.start, classes.stop).repeat_interleave(per_class)
        noise = torch.randn(len(labels), self.mean.shape[1], generator=generator)
        return self.mean[labels] + noise * (self.var[labels] + VARIANCE_FLOOR).sqrt(), labels

    def state_dict(self, prefix: str = "class_stats.") -> dict[str, torch.Tensor]:
        return {f"{prefix}mean": self.mean, f"{prefix}var": self.var, f"{prefix}count": self.count}

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str = "class_stats.") -> None:
        self.mean, self.var, self.count = (state[f"{prefix}{k}"].clone() for k in ("mean", "var", "count"))


def align_head(
    head: nn.Module,
    stats: ClassStatistics,
    seen: range,
    epochs: int,
    lr: float,
    samples_per_class: int,
    batch_size: int,
    seed: int,
    min_lr: float = 1e-6,
    weight_decay: float = 5e-4,
) -> None:
    """Retrain ``head`` on freshly sampled features each epoch (AdamW, cosine to ``min_lr``)."""
    generator = torch.Generator().manual_seed(seed)
    device = next(head.parameters()).device
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(seen) * samples_per_class / batch_size)
    total = max(1, epochs * steps_per_epoch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_multipliers(min_lr, [lr], total))
    head.train()
    for _ in range(epochs):
        features, labels = stats.sample(seen, samples_per_class, generator)
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            logits = head(features[batch].to(device))[:, : seen.stop]
            loss = F.cross_entropy(logits.float(), labels[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
