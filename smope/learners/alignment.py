"""Classifier alignment from per-class Gaussian feature statistics (docs/method.md#classifier-alignment).

After each task the learner stores the mean and the spread of every new class's features;
from the second task on it retrains only the head on features sampled from those Gaussians
for every class seen so far. This replaces a replay buffer: no image is kept.

The spread is either the per-dimension variance (:class:`DiagonalStatistics`, ``diag``) or the full
covariance (:class:`FullCovarianceStatistics`, ``full``).
Where classes differ only along correlated directions (small features, few classes per
task), a diagonal Gaussian fills the space between them with noise and the aligned head
cannot separate them; the full covariance keeps that structure at ``d x d`` floats per class.
Checkpoints therefore hold only the statistics of the classes a task added
(:meth:`ClassStatistics.state_dict`), and a resumed run reads them back from every task's
checkpoint in turn.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..runconfig import RunConfig, TrainConfig
from ..schedule import cosine_multipliers, lagged
from ..trainer import OptimizerFactory, Trainer, adamw

if TYPE_CHECKING:
    from ..methods import AlignmentSettings
    from .base import TaskContext

RELEASE_ALIGN_START = 10.0
"""The releases' alignment optimiser is built at ``--ca_lr`` (1e-4), ten times its cosine's base ``ca_lr / 10``."""

VARIANCE_FLOOR = 1e-4
"""Added to every variance (diag) or to the covariance's diagonal (full) before sampling."""


class ClassStatistics(ABC):
    """Per-class feature mean and spread, kept as tensors so checkpoints carry them.

    They live on ``device`` (the training device), where alignment samples from them: sampled
    features never cross to the host. The subclasses differ only in the spread
    (:class:`DiagonalStatistics`, :class:`FullCovarianceStatistics`); :func:`class_statistics`
    chooses one from ``method.align_covariance``.
    """

    spread_key: str
    """The checkpoint entry of the spread, after the prefix."""

    def __init__(self, num_classes: int, dim: int, device: torch.device | str = "cpu") -> None:
        self.mean = torch.zeros(num_classes, dim, device=device)
        self.count = torch.zeros(num_classes, dtype=torch.int64, device=device)
        self.latest: list[int] = []  # labels of the last update: what the next checkpoint stores

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Mean and spread of each label's rows."""
        features, labels = features.to(self.device), labels.to(self.device)
        self.latest = sorted(labels.unique().tolist())
        for label in self.latest:
            rows = features[labels == label].float()
            self.mean[label] = rows.mean(0)
            self.count[label] = len(rows)
            self.store_spread(label, rows)

    def sample(self, classes: range, per_class: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_class`` features from each class's Gaussian for every class in ``classes``, grouped by class.

        ``generator`` lives on :attr:`device`; on the CPU the draws are those of a CPU generator with the same seed.
        """
        labels = torch.arange(classes.start, classes.stop, device=self.device).repeat_interleave(per_class)
        noise = torch.randn(len(labels), self.mean.shape[1], generator=generator, device=self.device)
        return self.mean[labels] + self.spread(noise, classes, labels), labels

    def stored_means(self, classes: range) -> torch.Tensor:
        """The means of ``classes``, one row each."""
        return self.mean[classes.start : classes.stop]

    def state_dict(self, prefix: str = "class_stats.") -> dict[str, torch.Tensor]:
        """The statistics of the classes of the last update only (one task's classes)."""
        rows = torch.tensor(self.latest, dtype=torch.int64, device=self.device)
        state = {f"{prefix}classes": rows, f"{prefix}mean": self.mean[rows], f"{prefix}count": self.count[rows]}
        state[f"{prefix}{self.spread_key}"] = self.spread_state(rows)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str = "class_stats.") -> None:
        """Merge one checkpoint's classes into these statistics (earlier classes are kept)."""
        rows = state[f"{prefix}classes"]
        self.latest = rows.tolist()
        rows = rows.to(self.device)
        self.mean[rows] = state[f"{prefix}mean"].to(self.device, torch.float32)
        self.count[rows] = state[f"{prefix}count"].to(self.device)
        self.load_spread(rows, state[f"{prefix}{self.spread_key}"])

    @abstractmethod
    def store_spread(self, label: int, rows: torch.Tensor) -> None:
        """Keep the spread of one class's feature rows."""

    @abstractmethod
    def spread(self, noise: torch.Tensor, classes: range, labels: torch.Tensor) -> torch.Tensor:
        """Standard normal ``noise`` (one row per entry of ``labels``, grouped by class) shaped by each class's spread."""

    @abstractmethod
    def spread_state(self, rows: torch.Tensor) -> torch.Tensor:
        """The spread of the classes ``rows`` (the last update's), as one checkpoint tensor."""

    @abstractmethod
    def load_spread(self, rows: torch.Tensor, spread: torch.Tensor) -> None:
        """Take the spread of the classes ``rows`` from a checkpoint tensor of :meth:`spread_state`."""


class DiagonalStatistics(ClassStatistics):
    """Mean and population variance per dimension: ``d`` floats per class, correlations dropped."""

    spread_key = "var"

    def __init__(self, num_classes: int, dim: int, device: torch.device | str = "cpu") -> None:
        super().__init__(num_classes, dim, device)
        self.var = torch.zeros(num_classes, dim, device=device)

    def store_spread(self, label: int, rows: torch.Tensor) -> None:
        self.var[label] = rows.var(0, unbiased=False)

    def spread(self, noise: torch.Tensor, classes: range, labels: torch.Tensor) -> torch.Tensor:
        return noise * (self.var[labels] + VARIANCE_FLOOR).sqrt()

    def spread_state(self, rows: torch.Tensor) -> torch.Tensor:
        return self.var[rows]

    def load_spread(self, rows: torch.Tensor, spread: torch.Tensor) -> None:
        self.var[rows] = spread.to(self.device, torch.float32)


class FullCovarianceStatistics(ClassStatistics):
    """Mean and unbiased covariance: ``d x d`` floats per class, kept only for the classes seen.

    A covariance's Cholesky factor is computed once per class and task, at the first draw after
    its statistics arrived (an update or a checkpoint).
    """

    spread_key = "cov"

    def __init__(self, num_classes: int, dim: int, device: torch.device | str = "cpu") -> None:
        super().__init__(num_classes, dim, device)
        self.cov: dict[int, torch.Tensor] = {}  # label -> (dim, dim)
        self._factors: dict[int, torch.Tensor] = {}

    def store_spread(self, label: int, rows: torch.Tensor) -> None:
        self.cov[label] = torch.cov(rows.T, correction=1 if len(rows) > 1 else 0)
        self._factors.pop(label, None)

    def _factorize(self, classes: range) -> None:
        """Cholesky factors of the covariances plus the floor of the classes that lack one, in float64, in one batched call."""
        labels = [c for c in classes if c not in self._factors]
        if not labels:
            return
        eye = VARIANCE_FLOOR * torch.eye(self.mean.shape[1], dtype=torch.float64, device=self.device)
        factors = torch.linalg.cholesky(torch.stack([self.cov[label] for label in labels]).double() + eye).float()
        self._factors.update(zip(labels, factors))

    def spread(self, noise: torch.Tensor, classes: range, labels: torch.Tensor) -> torch.Tensor:
        self._factorize(classes)
        factors = torch.stack([self._factors[c] for c in classes])  # (C, d, d)
        return torch.bmm(noise.view(len(classes), -1, noise.shape[1]), factors.transpose(1, 2)).reshape(len(labels), -1)

    def spread_state(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.cov[c] for c in self.latest]) if self.latest else torch.zeros(0, *self.mean.shape[1:] * 2)

    def load_spread(self, rows: torch.Tensor, spread: torch.Tensor) -> None:
        for label, cov in zip(self.latest, spread):
            self.cov[label] = cov.to(self.device, copy=True)
            self._factors.pop(label, None)


COVARIANCES: dict[str, type[ClassStatistics]] = {"diag": DiagonalStatistics, "full": FullCovarianceStatistics}
"""The statistics of each ``method.align_covariance`` value."""


def class_statistics(covariance: str, num_classes: int, dim: int, device: torch.device | str = "cpu") -> ClassStatistics:
    """The class statistics ``covariance`` (``diag`` or ``full``) names, for ``num_classes`` classes of ``dim`` features."""
    try:
        kind = COVARIANCES[covariance]
    except KeyError:
        raise ValueError(f"covariance must be 'diag' or 'full', got {covariance!r}") from None
    return kind(num_classes, dim, device)


class KeepsClassStatistics:
    """Learner mix-in: checkpoints hold the trainable weights and the class statistics of the task just finished.

    Put it before :class:`~smope.learners.base.Learner` (or a subclass) in the bases; the learner
    sets ``self.stats``.
    """

    stats: ClassStatistics

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict(), **self.stats.state_dict()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.check_state(state)
        self.stats.load_state_dict(state)
        self.model.load_state_dict({k: v for k, v in state.items() if not k.startswith("class_stats.")}, strict=False)


Batches = Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]
"""An epoch's batches of (features, labels), given the epoch."""


def sampled_batches(
    stats: ClassStatistics,
    classes: range,
    samples_per_class: int,
    batch_size: int,
    steps: int,
    generator: torch.Generator,
    shift: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> Batches:
    """The batches of one alignment epoch: fresh draws of ``samples_per_class`` features for every class
    of ``classes`` (``shift(features, labels)`` moves them, when given), shuffled, then ``steps`` batches of ``batch_size``."""

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        features, labels = stats.sample(classes, samples_per_class, generator)
        if shift is not None:
            features = shift(features, labels)
        order = torch.randperm(len(labels), generator=generator, device=stats.device)
        for step in range(steps):
            batch = order[step * batch_size : (step + 1) * batch_size]
            yield features[batch], labels[batch]

    return batches


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
    iterations_per_epoch: int | None = None,
    trainer: Trainer | None = None,
    lag: bool = False,
    optimizer: OptimizerFactory = adamw,
    per_epoch_cosine: bool = False,
    lr_key: str = "method.align_lr",
) -> None:
    """Retrain ``head`` on freshly sampled features each epoch (AdamW, per-iteration cosine to ``min_lr``).

    Every epoch draws ``samples_per_class`` features for each class in ``seen`` and shuffles
    them; it then runs ``iterations_per_epoch`` batches of ``batch_size`` (None: all of them).
    The authors' rule is one batch of ``samples_per_class`` per class of earlier tasks. The
    steps run through ``trainer`` (the run's precision, progress bar and divergence guard); by
    default a plain fp32 trainer on the head's device. ``lag`` (``train.schedule_lag``): the
    authors' scheduler, one step late, whose first step runs at the optimiser's starting rate,
    :data:`RELEASE_ALIGN_START` x ``lr``. ``optimizer`` and ``per_epoch_cosine`` (torch's
    ``CosineAnnealingLR`` over epochs, stepped once per epoch, to 0) give other methods' recipes.
    ``lr_key``: the config key ``lr`` comes from, named by the divergence advice.
    """
    if trainer is None:
        trainer = Trainer(RunConfig(train=TrainConfig(device=str(next(head.parameters()).device), progress=False)))
    generator = torch.Generator(stats.device).manual_seed(seed)  # draws where the statistics and the head are
    groups = [{"params": [p for p in head.parameters() if p.requires_grad], "lr": lr, "lr_key": lr_key}]
    available = -(-len(seen) * samples_per_class // batch_size)
    per_epoch = available if iterations_per_epoch is None else min(iterations_per_epoch, available)

    batches = sampled_batches(stats, seen, samples_per_class, batch_size, per_epoch, generator)

    def loss_fn(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(features)[:, : seen.stop].float(), labels)

    head.train()
    if per_epoch_cosine:
        multipliers = [epoch_cosine(epochs, per_epoch)]
    else:
        multipliers = cosine_multipliers(min_lr, [lr], max(1, epochs * per_epoch))
    if lag:
        multipliers = [lagged(m, start=RELEASE_ALIGN_START) for m in multipliers]
    trainer.optimize(groups, optimizer(groups, weight_decay), multipliers, epochs, per_epoch, batches, loss_fn, f"align {len(seen)} classes")


def epoch_cosine(epochs: int, per_epoch: int) -> Callable[[int], float]:
    """torch's ``CosineAnnealingLR(T_max=epochs)`` stepped once per epoch, as a multiplier of step ``k``."""
    return lambda step: 0.5 * (1 + math.cos(math.pi * (step // per_epoch) / epochs))


def align_after_task(
    head: nn.Module, stats: ClassStatistics, ctx: TaskContext, method: AlignmentSettings, batch_size: int, trainer: Trainer | None = None
) -> None:
    """:func:`align_head` after task ``ctx`` with a run's ``method.align*`` settings (``batch_size``: ``train.batch_size``).

    ``method.align_steps: old_classes`` is the authors' rule: one batch of ``align_samples_per_class``
    features per class of the earlier tasks in each epoch.
    """
    authors_rule = method.align_steps == "old_classes"
    align_head(
        head,
        stats,
        ctx.seen,
        epochs=method.align_epochs,
        lr=method.align_lr,
        samples_per_class=method.align_samples_per_class,
        batch_size=method.align_samples_per_class if authors_rule else batch_size,
        seed=ctx.seed,
        iterations_per_epoch=ctx.classes.start if authors_rule else None,
        trainer=trainer,
        lag=trainer is not None and trainer.config.train.schedule_lag,
    )
